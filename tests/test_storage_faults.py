"""Object storage that fails a long job: flaky (errors and dropped connections at random), dead
from the start, or dying in the middle of a run. Every stage must retry and finish, or fail
with a clear message and leave only markers that match their rows."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import s3fs
import yaml

from stages import caches, distill, evaluate, export, shard, teacher_cache
from tests.conftest import new_bucket, on_session_ray, tiny_config
from tests.test_pipeline import check_outputs
from tests.faults import FaultyProxy


@pytest.fixture
def proxy(s3_endpoint):
    p = FaultyProxy(s3_endpoint, seed=1).start()
    yield p
    p.stop()


def test_flaky_storage_every_stage_retries_and_finishes(proxy, ray_local):
    """The whole pipeline on S3 (two teacher actors, two training workers) through an endpoint
    that fails one request in seven: every output is checked as the local run's are
    (tests/test_pipeline.py), and nothing is lost."""
    options = {"client_kwargs": {"endpoint_url": proxy.url}}
    root = new_bucket(options, "faults") + "/run"
    proxy.error_rate, proxy.drop_rate = 0.1, 0.05
    cfg = tiny_config(root, options, **{"distill.num_workers": 2, "cache.num_actors": 2})
    manifest = shard.run(cfg)
    store = teacher_cache.run(cfg)
    (result,) = distill.run(cfg)
    (url,) = export.run(cfg)
    check_outputs(cfg, manifest, store, url, evaluate.run(cfg))
    assert caches.verify(cfg) == []
    assert proxy.counts["errors"] > 10 and proxy.counts["drops"] > 5, proxy.counts
    # nothing lost: no input rejected, every image in the manifest, every step trained, and
    # the targets equal a fault-free computation's
    fs = s3fs.S3FileSystem(**options)
    shards = cfg.shards_url.removeprefix("s3://")
    assert fs.cat_file(f"{shards}/rejects.jsonl").strip() == b""
    assert manifest.num_images == cfg.shard.sample_size
    d = cfg.distill
    assert result.metrics["step"] == d.epochs * cfg.shard.sample_size // (d.batch_size * d.num_workers)
    proxy.error_rate = proxy.drop_rate = 0.0
    clean = teacher_cache.run(tiny_config(root, options, **{"cache.root": root + "/clean"}))
    for name in ("targets", "boxes"):
        assert np.array_equal(clean.group[name][:], store.group[name][:]), name


def test_dead_storage_fails_with_a_clear_message_and_marks_nothing(proxy, ray_local, tmp_path):
    options = {"client_kwargs": {"endpoint_url": proxy.url},
               "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    root = new_bucket(options, "faults") + "/run"
    cfg = tiny_config(root, options)
    shard.run(cfg)
    store = teacher_cache.run(cfg)
    before = store.completed()

    other = tiny_config(root, options, **{"tta.counts": 2})
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other.model_dump(mode="json")))
    proxy.down = True
    proc = subprocess.run([sys.executable, "-m", "stages", "teacher-cache", "--config", str(path)],
                          capture_output=True, text=True, timeout=600, env=on_session_ray(ray_local))
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
    root = new_bucket(options, "faults") + "/run"
    cfg = tiny_config(root, options, **{"shard.shard_size": 2, "shard.unit_rows": 2})
    shard.run(cfg)
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
                          capture_output=True, text=True, timeout=600, env=on_session_ray(ray_local))
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
