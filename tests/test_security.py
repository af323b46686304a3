"""What must not get in or out: outputs and keys that try to escape the run root, code inside a
checkpoint, and secrets (storage keys, session tokens) in any file or log a run writes."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import s3fs
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError, UnsafeWeightsError
from pipeline.models.vit import load_teacher
from stages import shard
from tests.conftest import new_bucket, tiny_config
from tests.corpus import encode, img2dataset_tar, photo
from tests.test_models import FAMILIES


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


STAGES_WITH_SECRET = """
import sys
from pipeline.config import dump_config
from stages import distill, export, shard, teacher_cache
from tests.conftest import tiny_config
options = {"client_kwargs": {"endpoint_url": sys.argv[2]}, "key": "testing", "secret": sys.argv[3]}
cfg = tiny_config(sys.argv[1], options, **{"distill.epochs": 1})
print(dump_config(cfg))
shard.run(cfg)
teacher_cache.run(cfg)
distill.run(cfg)
export.run(cfg)
print("stages done")
"""


@pytest.mark.slow  # the process starts a Ray of its own
def test_no_secret_reaches_any_file_of_a_fresh_process_and_its_ray(s3_endpoint, tmp_path):
    """The secret is in the environment of a new process before its own local Ray starts, so
    every Ray worker inherits it; every file that process tree writes is scanned: the run root,
    the store, Ray's whole session folder and temporary files, and the console, where the
    process also prints its config (the storage secret redacted)."""
    import shutil
    import tempfile

    secret_env, secret_option = "PLANTED-ENV-SECRET-c81d", "PLANTED-OPTION-SECRET-3e57"
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": secret_option}
    root = new_bucket(options, "faults") + "/run"
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
        assert "<redacted>" in proc.stdout
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
