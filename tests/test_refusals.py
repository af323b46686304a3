"""Refusals that must say who or what: the lease's holder, a checkpoint's offending global."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

from pipeline.errors import PipelineError, UnsafeWeightsError
from pipeline.models.vit import load_teacher
from pipeline.targets.lease import Lease
from tests.test_models import FAMILIES


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


class _Payload:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def test_a_torch_checkpoint_with_real_tensors_and_a_payload_is_refused_naming_the_global(tmp_path):
    cfg = FAMILIES["class-token p16"]
    canary = tmp_path / "executed"
    path = tmp_path / "weights.pth"
    torch.save({"model": load_teacher(cfg).state_dict(), "extra": _Payload(canary)}, path)
    with pytest.raises(UnsafeWeightsError, match="refusing to load") as info:
        load_teacher(cfg.model_copy(update={"checkpoint": str(path)}))
    assert f"{os.system.__module__}.system" in str(info.value), str(info.value)
    assert not canary.exists()
