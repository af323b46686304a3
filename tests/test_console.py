"""What a person sees in the terminal: each stage's own lines and summary, not Ray's internals."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

# Lines Ray, Ray Train and their workers print on their own (all stay in Ray's log folder).
RAY_NOISE = [r"\(\w+ pid=\d+(, ip=[\d.]+)?\)", r"Reporting training result", r"core_worker\.cc", r"PreemptionWatcher",
             r"\bINFO\b", r"\bWARNING\b", r"Traceback", r"raylet", r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"]


def phreg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PHREG_DEBUG")}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "stages", *args], capture_output=True, text=True, env=env, timeout=600)


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for p in RAY_NOISE)]


def tiny_yaml(folder) -> str:
    """The tiny pipeline of tests/conftest.py as a config file (the subprocess starts its own Ray)."""
    from tests.conftest import TINY

    config = {
        "storage": {"run_root": str(folder / "run")},
        "shard": {"input": ["sample:photos"], "sample_size": 12, "shard_size": 4},
        "teacher": {"model": "vit_tiny_patch16_224", "img_size": 64, "model_kwargs": TINY},
        "tta": {"counts": 4}, "cache": {"batch_images": 2, "num_actors": 1}, "student": {"registers": 4},
        "distill": {"epochs": 2, "batch_size": 2, "checkpoint_every": 4, "log_every": 2},
        "evaluate": {"num_images": 4, "pca_images": 2},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_names_the_extra(tmp_path):
    proc = phreg("shard", "--storage.run_root", "gs://some-bucket/run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "phreg shard: error: gs:// URLs need gcsfs, the 'gcs' extra: pip install -e '.[gcs]'"


@pytest.mark.slow
def test_demo_console_is_the_stages_own(tmp_path):
    config = tiny_yaml(tmp_path)
    demo = phreg("demo", "--config", config)
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = demo.stdout + demo.stderr
    assert noise(out) == []
    # Ray's log folder is named once; each stage says what it did; the table is printed once
    logs = re.findall(r"^ray: logs in (\S+) ", demo.stdout, re.M)
    assert len(logs) == 1 and os.path.isdir(logs[0])
    for line in ("shard: 12 images in 3 shards", "teacher-cache: 12 images in", "distill: student r16",
                 f"distill: {tmp_path}/run/students/r16: step 12", "export: ", "evaluate: report -> ", "demo finished in"):
        assert line in demo.stdout, line
    assert demo.stdout.count("| model |") == 1
    assert f"tensorboard --logdir {tmp_path}/run" in demo.stdout
    for bar in ("shard", "teacher-cache", "r16", "evaluate"):  # each stage's progress bar (tqdm, on stderr)
        assert re.search(rf"^{bar}: *100%", demo.stderr.replace("\r", "\n"), re.M), bar

    # a failure inside a Ray Train worker (a shard of the store is gone) reaches the user as one
    # sentence, and with PHREG_DEBUG=1 as the workers' lines and a traceback: two runs side by
    # side, each with a student and a Ray of its own
    (store,) = (tmp_path / "run" / "cache").iterdir()
    os.remove(store / "targets.zarr" / "crops" / "c" / "1" / "0" / "0" / "0" / "0")
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(phreg, "distill", "--config", config, "--student.name", "other", "--distill.max_failures", "0"),
                pool.submit(phreg, "distill", "--config", config, "--student.name", "third", "--distill.max_failures", "0",
                            env={"PHREG_DEBUG": "1"})]
        failed, debug = (run.result() for run in runs)
    assert failed.returncode == 1
    assert noise(failed.stdout + failed.stderr) == []
    errors = [line for line in failed.stderr.replace("\r", "\n").splitlines() if line.startswith("phreg distill:")]
    assert len(errors) == 1 and "storage error: FileNotFoundError" in errors[0] and "crops/c/1/0/0/0/0" in errors[0], \
        failed.stderr

    # PHREG_DEBUG=1: the workers' lines and the whole traceback
    assert debug.returncode == 1
    assert re.search(r"\((RayTrainWorker|TrainController) pid=\d+", debug.stdout + debug.stderr)
    assert "Traceback" in debug.stderr and "crops/c/1/0/0/0/0" in debug.stderr
