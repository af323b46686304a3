"""Faults a long job meets: flaky or dead object storage, concurrent runs, leaked secrets,
paths and keys that try to escape."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import s3fs
import yaml

from pipeline.config import dump_config, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.targets.lease import Lease
from stages import caches, distill, export, shard, teacher_cache
from tests.conftest import tiny_config
from tests.corpus import encode, img2dataset_tar, photo
from tests.faults import FaultyProxy

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(s3_endpoint):
    p = FaultyProxy(s3_endpoint, seed=1).start()
    yield p
    p.stop()


def _bucket(options) -> str:
    import uuid

    name = f"faults-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return f"s3://{name}"


def test_flaky_storage_every_stage_retries_and_finishes(proxy, ray_local):
    options = {"client_kwargs": {"endpoint_url": proxy.url}}
    root = _bucket(options) + "/run"
    proxy.error_rate, proxy.drop_rate = 0.1, 0.05  # one request in seven fails
    cfg = tiny_config(root, options, **{"distill.epochs": 1})
    manifest = shard.run(cfg)
    store = teacher_cache.run(cfg)
    (result,) = distill.run(cfg)
    (url,) = export.run(cfg)
    assert caches.verify(cfg) == []
    assert proxy.counts["errors"] > 10 and proxy.counts["drops"] > 5, proxy.counts
    fs = s3fs.S3FileSystem(**options)
    assert fs.exists(url.removeprefix("s3://") + "/model.safetensors")
    # nothing lost: no input rejected, every image in the manifest, every step trained, and
    # the targets equal a fault-free computation's
    shards = cfg.shards_url.removeprefix("s3://")
    assert fs.cat_file(f"{shards}/rejects.jsonl").strip() == b""
    assert manifest.num_images == cfg.shard.sample_size
    assert result.metrics["step"] == cfg.shard.sample_size // cfg.distill.batch_size
    proxy.error_rate = proxy.drop_rate = 0.0
    clean = teacher_cache.run(tiny_config(root, options, **{"distill.epochs": 1, "cache.root": root + "/clean"}))
    for name in ("targets", "boxes"):
        assert np.array_equal(clean.group[name][:], store.group[name][:]), name


def test_dead_storage_fails_with_a_clear_message_and_marks_nothing(proxy, ray_local, tmp_path):
    options = {"client_kwargs": {"endpoint_url": proxy.url},
               "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    root = _bucket(options) + "/run"
    cfg = tiny_config(root, options)
    shard.run(cfg)
    store = teacher_cache.run(cfg)
    before = store.completed()

    other = tiny_config(root, options, **{"tta.counts": 2})
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other.model_dump(mode="json")))
    proxy.down = True
    proc = subprocess.run([sys.executable, "-m", "stages", "teacher-cache", "--config", str(path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "storage error" in proc.stderr and "Traceback" not in proc.stderr
    proxy.down = False
    assert store.completed() == before and caches.verify(cfg) == []
    fs = s3fs.S3FileSystem(**options)
    assert not fs.glob(root.removeprefix("s3://") + "/cache/*/complete/*.json") or all(
        p.startswith(store.url.removeprefix("s3://")) for p in fs.glob(root.removeprefix("s3://") + "/cache/*/complete/*.json"))


def test_storage_that_dies_mid_run_leaves_only_markers_that_match_their_rows(proxy, ray_local, tmp_path):
    """Target writes start failing for good once a first unit is marked: the stage fails with
    a storage error, and every marker on storage describes rows that are really there."""
    from pipeline.data.manifest import Manifest
    from pipeline.targets.store import TargetStore
    from pipeline.targets.store_check import check_unit

    options = {"client_kwargs": {"endpoint_url": proxy.url},
               "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    root = _bucket(options) + "/run"
    cfg = tiny_config(root, options, **{"shard.shard_size": 2, "shard.unit_rows": 2})
    manifest = shard.run(cfg)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    marked = []

    def refuse(method, url):
        if method == "PUT" and "/complete/" in url:
            marked.append(url)
            return False
        return bool(marked) and method in ("PUT", "POST") and "/targets.zarr/" in url

    proxy.refuse = refuse
    proc = subprocess.run([sys.executable, "-m", "stages", "teacher-cache", "--config", str(path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    proxy.refuse = None
    assert marked, proc.stderr[-2000:]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "storage error" in proc.stderr and "Traceback" not in proc.stderr
    fs = s3fs.S3FileSystem(**options)
    (folder,) = {p.split("/complete/")[0] for p in fs.glob(root.removeprefix("s3://") + "/cache/*/complete/*.json")}
    store = TargetStore("s3://" + folder, options)
    units = {u.id: u for u in Manifest.load(cfg.shards_url, options).units()}
    done = store.completed()
    assert 0 < len(done) < len(units)
    for unit_id in done:
        assert check_unit(store, units[unit_id], store.marker(unit_id)) == [], unit_id


def test_a_second_concurrent_run_is_refused_and_the_store_verifies(tmp_path, ray_local):
    settings = {"teacher.img_size": 224, "teacher.model_kwargs": {}, "tta.counts": 6, "shard.sample_size": 16,
                "shard.shard_size": 2}
    cfg = tiny_config(str(tmp_path / "run"), **settings)
    shard.run(cfg)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    first = subprocess.Popen([sys.executable, "-m", "stages", "teacher-cache", "--config", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    leases = lambda: glob.glob(os.path.join(cfg.cache_root, "*", "lease.json"))  # noqa: E731
    import time

    while not leases():
        assert first.poll() is None, first.stdout.read().decode()[-2000:]
        time.sleep(0.05)
    with pytest.raises(PipelineError, match="another teacher-cache run holds"):
        teacher_cache.run(cfg)
    assert first.wait(timeout=600) == 0
    assert not leases()  # released at the end
    assert caches.verify(cfg) == []


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Lease(str(tmp_path))
    dead.me["pid"] = int(proc.stdout)
    dead._write()
    with Lease(str(tmp_path), ttl=600) as lease:  # no wait although the heartbeat is fresh
        assert json.load(open(tmp_path / "lease.json"))["id"] == lease.me["id"]
    assert not os.path.exists(tmp_path / "lease.json")


def test_outputs_cannot_escape_the_run_root(tmp_path):
    root = str(tmp_path / "run")
    for field, value in [("export.output", f"{root}/../../elsewhere"), ("cache.root", "/etc/phreg"),
                         ("shard.output", "s3://other-bucket/x")]:
        with pytest.raises(ConfigError, match="outside storage.run_root"):
            load_config([], {"storage.run_root": root, field: value})
    ok = load_config([], {"storage.run_root": root, "cache.root": str(tmp_path / "shared"),
                          "storage.extra_roots": [str(tmp_path / "shared")]})
    assert ok.cache_root == str(tmp_path / "shared")


def test_keys_that_try_to_escape_are_rejected(tmp_path, ray_local):
    folder = tmp_path / "tars"
    folder.mkdir()
    img2dataset_tar(folder / "00000.tar", {"000000001": encode(photo(), "JPEG"), "../../escape": encode(photo(), "JPEG"),
                                           "/abs/path": encode(photo(), "JPEG")})
    cfg = tiny_config(str(tmp_path / "run"), **{"shard.input": [str(folder)], "shard.max_reject_fraction": 0.9})
    manifest = shard.run(cfg)
    assert manifest.counts == {0: 1}
    rejects = [json.loads(line) for line in open(os.path.join(cfg.shards_url, "rejects.jsonl"))]
    assert sorted(r["reason"] for r in rejects) == ["unsafe_key", "unsafe_key"]
    assert sorted(os.listdir(tmp_path)) == ["run", "tars"] and not os.path.exists("/abs")


def test_no_secret_reaches_a_file_or_a_log(s3_endpoint, ray_local, tmp_path, capfd):
    secret_env, secret_option = "PLANTED-ENV-SECRET-7f3a", "PLANTED-OPTION-SECRET-91c2"
    os.environ["AWS_SESSION_TOKEN"] = secret_env  # moto ignores it; botocore sends it on every request
    try:
        options = {"client_kwargs": {"endpoint_url": s3_endpoint},
                   "key": "testing", "secret": secret_option}
        root = _bucket(options) + "/run"
        cfg = tiny_config(root, options, **{"distill.epochs": 1})
        shard.run(cfg)
        teacher_cache.run(cfg)
        distill.run(cfg)
        export.run(cfg)
        written = {"config": dump_config(cfg)}
        fs = s3fs.S3FileSystem(**options)
        for path in fs.find(root.removeprefix("s3://")):
            written[path] = fs.cat_file(path).decode("latin-1")
        import ray

        logs = ray._private.worker._global_node.get_logs_dir_path()
        for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
            if os.path.isfile(path):
                written[path] = open(path, "rb").read().decode("latin-1")
        out, err = capfd.readouterr()
        written["stdout"], written["stderr"] = out, err
        leaks = [name for name, text in written.items() if secret_env in text or secret_option in text]
        assert not leaks, leaks
        assert "<redacted>" in written["config"]
    finally:
        del os.environ["AWS_SESSION_TOKEN"]


STAGES_WITH_SECRET = """
import sys
from stages import distill, export, shard, teacher_cache
from tests.conftest import tiny_config
options = {"client_kwargs": {"endpoint_url": sys.argv[2]}, "key": "testing", "secret": sys.argv[3]}
cfg = tiny_config(sys.argv[1], options, **{"distill.epochs": 1})
shard.run(cfg)
teacher_cache.run(cfg)
distill.run(cfg)
export.run(cfg)
print("stages done")
"""


def test_no_secret_reaches_any_file_of_a_fresh_process_and_its_ray(s3_endpoint, tmp_path):
    """The secret is in the environment of a new process before its own local Ray starts, so
    every Ray worker inherits it; every file that process tree writes is scanned: the run root,
    the store, Ray's whole session folder and temporary files, and the console."""
    import shutil
    import tempfile

    secret_env, secret_option = "PLANTED-ENV-SECRET-c81d", "PLANTED-OPTION-SECRET-3e57"
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": secret_option}
    root = _bucket(options) + "/run"
    scratch = tempfile.mkdtemp(prefix="phs", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        ray_tmp, tmp = os.path.join(scratch, "r"), os.path.join(scratch, "t")
        os.makedirs(ray_tmp), os.makedirs(tmp)
        env = {**os.environ, "RAY_ADDRESS": "", "AWS_SESSION_TOKEN": secret_env, "RAY_TMPDIR": ray_tmp,
               "TMPDIR": tmp, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-c", STAGES_WITH_SECRET, root, s3_endpoint, secret_option],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0 and "stages done" in proc.stdout, proc.stderr[-3000:]
        written = {"stdout": proc.stdout, "stderr": proc.stderr}
        fs = s3fs.S3FileSystem(**options)
        for path in fs.find(root.removeprefix("s3://")):
            written[path] = fs.cat_file(path).decode("latin-1")
        for path in glob.glob(os.path.join(scratch, "**", "*"), recursive=True):
            if os.path.isfile(path) and not os.path.islink(path):
                written[path] = open(path, "rb").read().decode("latin-1")
        assert glob.glob(os.path.join(ray_tmp, "**", "session_*", "logs", "*"), recursive=True), "Ray wrote elsewhere"
        assert sum(p.endswith(".tar") for p in written) and sum(p.endswith(".safetensors") for p in written)
        leaks = [name for name, text in written.items() if secret_env in text or secret_option in text]
        assert not leaks, leaks
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
