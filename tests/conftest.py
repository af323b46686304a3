"""Shared fixtures: a real local Ray, a real S3 endpoint (moto's server on loopback), tiny configs.

Environment is set at import, before Ray starts, so every Ray worker inherits it.
"""
from __future__ import annotations

import os
import uuid

import pytest

os.environ.update(
    RAY_AUTH_MODE="disabled",
    RAY_USAGE_STATS_ENABLED="0",
    RAY_TRAIN_ENABLE_PRINT_PATCH="0",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
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


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, logging_level="WARNING",
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
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    name = f"test-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    yield f"s3://{name}", options
