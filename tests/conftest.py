"""Shared fixtures: a real local Ray, a real S3 endpoint (moto's server on loopback), tiny configs,
and the tiny pipeline's corpus and target store, built once per session.

Environment is set at import, before Ray starts, so every Ray worker inherits it.

Markers are given by what a test uses, so that `make test-fast` (-m "not slow and not s3")
never starts Ray or the S3 server: `slow` for every test that asks for `ray_local` (directly or
through a fixture such as `tiny_run`), `s3` for every test that asks for `s3_endpoint`. A test
that reaches Ray or S3 some other way (a subprocess, request.getfixturevalue) carries the
marker itself.
"""
from __future__ import annotations

import os
import shutil
import uuid

import pytest

os.environ.update(
    RAY_AUTH_MODE="disabled",
    RAY_USAGE_STATS_ENABLED="0",
    RAY_TRAIN_ENABLE_PRINT_PATCH="0",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    # Ray Train's controller polls its workers every 2 s, and a run waits for several polls
    # (workers up, reports, the end): 5 s of every distill run were spent waiting for them.
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
    # Ray Train's watcher of spot-instance preemption: one more actor process per student
    # (~1.5 CPU-s each), for nodes that are never preempted here.
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
)

from pipeline.config import Config, load_config  # noqa: E402

# A ViT small enough to train in seconds on one CPU core: 2 blocks, width 48, 4x4 grid at 64 px.
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}


def parent(url: str) -> str:
    """The folder containing `url` (a bucket is its own parent)."""
    head, _, tail = url.rstrip("/").rpartition("/")
    return url if head.endswith(":/") else head


def tiny_config(root: str, storage_options: dict | None = None, **overrides) -> Config:
    """A full pipeline config on `root` (a folder or an s3:// URL) with a tiny teacher.
    `overrides` are dotted keys, e.g. {"tta.counts": 4}."""
    values = {
        "storage.run_root": root,
        "storage.extra_roots": [parent(root)],  # tests keep caches and inputs beside the run
        "storage.storage_options": storage_options or {},
        "shard.input": ["sample:photos"],
        "shard.sample_size": 12,
        "shard.shard_size": 4,
        "teacher.model": "vit_tiny_patch16_224",
        "teacher.img_size": 64,
        "teacher.model_kwargs": TINY,
        "tta.counts": 4,
        "cache.batch_images": 2,
        "cache.num_actors": 1,
        "student.registers": 4,
        "distill.epochs": 2,
        "distill.batch_size": 2,
        "distill.num_workers": 1,
        "distill.checkpoint_every": 4,
        "distill.log_every": 2,
        "evaluate.num_images": 4,
        "evaluate.pca_images": 2,
    }
    values.update(overrides)
    return load_config([], values)


# Seconds each of the longest test files took in a full `make test` (2 cores), for the order of
# the files below. Stale numbers only make that order worse, never a test wrong.
FILE_SECONDS = {"test_distill.py": 210, "test_cache_stage.py": 175, "test_storage_faults.py": 170, "test_cluster.py": 150,
                "test_clip.py": 135, "test_console.py": 110, "test_pipeline.py": 90, "test_planted.py": 90,
                "test_security.py": 75, "test_tracking.py": 70, "test_trained_probes.py": 40, "test_leases.py": 35}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(items):
    for item in items:
        if "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
        if "s3_endpoint" in item.fixturenames:
            item.add_marker(pytest.mark.s3)
    # Files with slow tests first, the longest first (each file's order kept): `make test`'s
    # workers take files in this order (xdist's own reordering, by test count, is switched off
    # in the Makefile), so the quick files fill the end instead of one long file running alone.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in slow_files, -FILE_SECONDS.get(item.path.name, 0)))


def copy_run(src: str, dst) -> str:
    """A copy of the run root `src` at `dst` (a local folder): the same corpus, stores and
    students, so each stage run on the copy finds what it finds in `src`, and whatever a test
    changes there no other test sees.

    Not for shard.run: the shard records name the inputs by their absolute paths, which are
    those of `src`, so a rerun on the copy would see other inputs and refuse."""
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # No dashboard: its modules cost CPU all session long and no test reads them here.
        ray.init(num_cpus=2, logging_level="WARNING", include_dashboard=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns (s3://bucket URL, storage_options)."""
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    yield new_bucket(options), options


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_local, worker_id) -> str:
    """The run root of `tiny_config` with its corpus sharded and its target store computed.

    Shared by the whole session: read it, never write into it (no stage run on it that would
    add a store, a student or an export). A test that needs to write takes a `copy_run` of it.
    With xdist, the first worker to ask builds it in the session's common temp folder and the
    others wait for it (a file lock), so it is built once per `make test`, not once per worker."""
    from filelock import FileLock

    from stages import shard, teacher_cache

    # under xdist each worker's basetemp is <session temp>/<worker>: their parent is this session's
    folder = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root, done = folder / "tiny" / "run", folder / "tiny" / "done"
    with FileLock(str(folder / "tiny.lock")):
        if not done.exists():
            cfg = tiny_config(str(root))
            shard.run(cfg)
            teacher_cache.run(cfg)
            done.touch()
    return str(root)


@pytest.fixture
def tiny_copy(tiny_run, tmp_path) -> str:
    """This test's own copy of `tiny_run`, at tmp_path/run."""
    return copy_run(tiny_run, tmp_path / "run")


def on_session_ray(ray) -> dict:
    """The environment of a command that joins this session's Ray (`ray_local`) instead of
    starting one of its own: a local Ray start costs a fresh process ~5 CPU-s."""
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def new_bucket(options: dict, prefix: str = "test") -> str:
    """A fresh bucket on the endpoint of `options`; returns its s3:// URL."""
    import s3fs

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return f"s3://{name}"
