"""Leases: one teacher-cache run writes a store at a time. A second run is refused naming the
holder (process and host); a holder that died on this host, or whose heartbeat on another host
is older than the TTL, is taken over."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.targets.lease import Lease
from stages import caches, shard, teacher_cache
from tests.conftest import on_session_ray, tiny_config


def test_a_second_concurrent_run_is_refused_and_the_store_verifies(tmp_path, ray_local):
    settings = {"teacher.img_size": 224, "teacher.model_kwargs": {}, "tta.counts": 6, "shard.sample_size": 16,
                "shard.shard_size": 2}
    cfg = tiny_config(str(tmp_path / "run"), **settings)
    shard.run(cfg)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    first = subprocess.Popen([sys.executable, "-m", "stages", "teacher-cache", "--config", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=on_session_ray(ray_local))
    leases = lambda: glob.glob(os.path.join(cfg.cache_root, "*", "lease.json"))  # noqa: E731
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


def test_a_second_writer_is_refused_naming_the_first_pid_and_host(tmp_path):
    with Lease(str(tmp_path), ttl=600, what="teacher-cache run") as first:
        assert first.me["pid"] == os.getpid()
        # the holder is this live process: another lease object (a second run) is refused
        with pytest.raises(PipelineError) as info:
            Lease(str(tmp_path), ttl=600, what="teacher-cache run").acquire(settle=0)
        message = str(info.value)
        assert f"process {os.getpid()} on {socket.gethostname()}" in message
        assert "another teacher-cache run holds" in message
    assert not os.path.exists(tmp_path / "lease.json")


def _foreign(folder, heartbeat_age: float) -> dict:
    """A lease written by a process on another host (its pid means nothing here)."""
    lease = {"id": "other-host-run", "host": "another-host.invalid", "pid": 1, "started": time.time() - 3600,
             "heartbeat": time.time() - heartbeat_age}
    (folder / "lease.json").write_text(json.dumps(lease))
    return lease


def test_a_lease_from_another_host_holds_until_its_ttl_then_is_taken_over(tmp_path):
    _foreign(tmp_path, heartbeat_age=5)  # fresh: the holder may be alive on its host
    with pytest.raises(PipelineError, match="process 1 on another-host.invalid"):
        Lease(str(tmp_path), ttl=30).acquire(settle=0)
    assert json.loads((tmp_path / "lease.json").read_text())["id"] == "other-host-run"

    _foreign(tmp_path, heartbeat_age=31)  # no heartbeat for longer than the TTL: stale
    with Lease(str(tmp_path), ttl=30) as lease:
        assert json.loads((tmp_path / "lease.json").read_text())["id"] == lease.me["id"]
    assert not os.path.exists(tmp_path / "lease.json")
