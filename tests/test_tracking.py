"""Experiment tracking: TensorBoard event files read back with TensorBoard's own reader (also from
s3://, as a stock `tensorboard` would), and MLflow runs on a real tracking server on loopback."""
from __future__ import annotations

import glob
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline import tracking
from tests.conftest import tiny_config

# Reads a TensorBoard folder the way the tensorboard command does, in a fresh process (its s3
# client reads S3_ENDPOINT when it is imported); prints {tag: [[step, value], ...]} and image sizes.
READ_EVENTS = """
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
acc.Reload()
tags = acc.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "images": {t: [[e.step, e.width, e.height] for e in acc.Images(t)] for t in tags["images"]},
}))
"""


def read_events(url: str, endpoint: str | None = None) -> dict:
    env = {**os.environ, **({"S3_ENDPOINT": endpoint} if endpoint else {})}
    out = subprocess.run([sys.executable, "-c", READ_EVENTS, url], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a sqlite backend and proxied artifacts; yields its URI."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # its job runner (a GenAI feature) polls all the time in processes of its own; unused here
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.time() + 120
        while not tracking.reachable(uri):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# --- pure parts ----------------------------------------------------------------------------

def test_numbers_keeps_numeric_leaves_only():
    report = {"norms": {"teacher": {"norm_max": 7.5, "outliers": 2}}, "images": {"trained_on": True, "indices": [0, 4]},
              "probes": None, "mode": "pipeline", "bad": float("nan")}
    assert tracking.numbers(report) == {"norms/teacher/norm_max": 7.5, "norms/teacher/outliers": 2.0}


def test_config_params_are_flat_and_redacted():
    cfg = load_config([], {"storage.storage_options": {"key": "AKIAEXAMPLE", "secret": "hunter2",
                                                       "client_kwargs": {"endpoint_url": "http://s3.local"}},
                           "distill.lr": 3e-4})
    params = tracking.config_params(cfg)
    assert params["distill.lr"] == "0.0003" and params["student.name"] == "r16"
    assert params["storage.storage_options.key"] == params["storage.storage_options.secret"] == "<redacted>"
    assert params["storage.storage_options.client_kwargs.endpoint_url"] == "http://s3.local"
    assert not any("hunter2" in v or "AKIAEXAMPLE" in v for v in params.values())


# --- TensorBoard ---------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_tensorboard_files_read_back_with_tensorboard(where, tmp_path, request):
    root, so = (str(tmp_path), {}) if where == "local" else request.getfixturevalue("s3_bucket")
    s3_endpoint = request.getfixturevalue("s3_endpoint") if where == "s3" else None
    url = f"{root}/run/tensorboard"
    staging = os.path.join(tempfile.gettempdir(), "phreg-tb-*")
    before = set(glob.glob(staging))
    board = tracking.TensorBoard(url, so)
    board.scalars({"train/loss": 0.5, "train/lr": 1e-4}, 2)
    board.flush()  # what a reader sees mid-run
    assert read_events(url, s3_endpoint)["scalars"]["train/loss"] == [[2, 0.5]]
    # a local run folder gets its files directly: nothing in a temporary folder that a killed run would leave
    assert bool(set(glob.glob(staging)) - before) == (where == "s3")
    board.scalars({"train/loss": 0.25}, 4)
    board.image("eval/pca", png(30, 20), 4)
    board.close()
    events = read_events(url, s3_endpoint)
    assert events["scalars"]["train/loss"] == [[2, 0.5], [4, 0.25]]  # exact in float32
    assert events["scalars"]["train/lr"] == [[2, pytest.approx(1e-4)]]
    assert events["images"]["eval/pca"] == [[4, 30, 20]]
    assert set(glob.glob(staging)) == before


def test_a_restart_replaces_the_steps_after_its_checkpoint(tmp_path):
    """Workers restarted from the checkpoint at step 4 log steps 5.. again: TensorBoard shows them once."""
    url = str(tmp_path / "tensorboard")
    first = tracking.TensorBoard(url)
    first.scalars({"train/loss": 1.0}, 2)
    first.scalars({"train/loss": 0.9}, 4)
    first.scalars({"train/loss": 0.8}, 6)  # lost with the crash
    first.close()
    time.sleep(1.1)  # event file names carry the second they were created in
    second = tracking.TensorBoard(url, resume_step=4)
    second.scalars({"train/loss": 0.7}, 6)
    second.close()
    steps = read_events(url)["scalars"]["train/loss"]
    assert [s for s, _ in steps] == [2, 4, 6] and [v for _, v in steps] == pytest.approx([1.0, 0.9, 0.7])


# --- MLflow: an unreachable server never stops a stage ---------------------------------------

def test_unreachable_server_is_said_once_and_skipped(tmp_path, capsys):
    cfg = load_config([], {"storage.run_root": str(tmp_path), "tracking.mlflow_uri": dead_uri()})
    assert tracking.start_run(cfg, str(tmp_path / "run"), "r16") is None
    out = capsys.readouterr().out
    assert out.count("mlflow:") == 1 and "going on without MLflow" in out
    assert not (tmp_path / "run" / "mlflow.json").exists()

    run = tracking.MLflow(dead_uri(), "0" * 32)  # a server that went away after the run started
    t0 = time.perf_counter()
    for step in range(3):
        run.metrics({"train/loss": 1.0}, step)
    run.artifacts(str(tmp_path), "export")
    run.finish()
    assert capsys.readouterr().out.count("mlflow:") == 1
    assert time.perf_counter() - t0 < 60  # not the client's default minutes of retries


def test_environment_uri_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.mlflow_uri(load_config([], {})) == "http://mlflow.example:5000"
    assert tracking.mlflow_uri(load_config([], {"tracking.mlflow_uri": "http://other:1"})) == "http://other:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.mlflow_uri(load_config([], {})) is None


# --- the whole pipeline on s3:// with a tracking server --------------------------------------

@pytest.mark.slow
def test_pipeline_tracks_to_tensorboard_on_s3_and_mlflow(ray_local, s3_endpoint, s3_bucket, mlflow_server):
    from mlflow import MlflowClient

    from stages import distill, evaluate, export, shard, teacher_cache

    root, so = s3_bucket
    cfg = tiny_config(f"{root}/run", so, **{"tracking.mlflow_uri": mlflow_server, "tracking.mlflow_experiment": "tracking-test"})
    shard.run(cfg)
    store = teacher_cache.run(cfg)
    distill.run(cfg)
    export.run(cfg)
    evaluate.run(cfg)

    # TensorBoard, read from s3:// as `S3_ENDPOINT=... tensorboard --logdir s3://...` would
    run_url = f"{root}/run/students/{cfg.student.name}"
    events = read_events(f"{run_url}/tensorboard", s3_endpoint)
    scalars = events["scalars"]
    for name in ("loss", "cosine", "mse", "lr", "samples_per_s", "data_wait_fraction"):
        assert [s for s, _ in scalars[f"train/{name}"]] == [2, 4, 6, 8, 10, 12], name
    assert [s for s, _ in scalars["epoch/loss"]] == [6, 12]
    assert 0 < scalars["train/cosine"][-1][1] <= 1 and scalars["train/lr"][0][1] > scalars["train/lr"][-1][1]
    assert scalars["eval/norms/student/norm_max"] == [[12, pytest.approx(evaluate_norm_max(cfg), rel=1e-5)]]
    assert {"eval/pca", "eval/norms", "eval/norm_hist", "eval/outlier_map"} <= set(events["images"])
    assert all(steps[0][0] == 12 for steps in events["images"].values())

    # MLflow: the student's run with its metrics, config and export
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracking-test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    student = runs[cfg.student.name]
    assert student.info.status == "FINISHED"
    assert student.data.params["student.registers"] == "4" and student.data.params["distill.epochs"] == "2"
    assert student.data.params["tracking.mlflow_uri"] == mlflow_server
    assert student.data.tags["phreg.targets"] == store.spec.fingerprint
    history = client.get_metric_history(student.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10, 12]
    assert [m.value for m in history] == pytest.approx([v for _, v in scalars["train/loss"]])
    assert "eval/norms/teacher/norm_mean" in student.data.metrics
    artifacts = {a.path for a in client.list_artifacts(student.info.run_id, "export")}
    assert {"export/config.json", "export/model.safetensors", "export/phreg.json"} <= artifacts
    pictures = {a.path for a in client.list_artifacts(student.info.run_id, f"eval/{cfg.student.name}")}
    assert f"eval/{cfg.student.name}/pca.png" in pictures and f"eval/{cfg.student.name}/report.md" in pictures

    # the teacher-cache run: throughput and the store's fingerprint
    cache = runs[f"teacher-cache {store.spec.fingerprint}"]
    assert cache.data.tags["phreg.fingerprint"] == store.spec.fingerprint
    assert cache.data.metrics["cache/images"] == 12 and cache.data.metrics["cache/images_per_s"] > 0


def evaluate_norm_max(cfg) -> float:
    from pipeline.storage import read_json

    return read_json(f"{cfg.eval_url}/report.json", cfg.storage.storage_options)["norms"]["student"]["norm_max"]


def test_the_driver_says_when_mlflow_lost_steps(mlflow_server):
    from mlflow import MlflowClient

    from pipeline.tracking import MLflow

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment(f"gap-{time.time()}")).info.run_id
    tracked = MLflow(mlflow_server, run)
    tracked.metrics({"train/loss": 1.0}, 4)
    assert "up to step 4 of 10" in tracked.missing_steps("train/loss", 10)
    tracked.metrics({"train/loss": 0.5}, 10)
    assert tracked.missing_steps("train/loss", 10) is None
