"""Experiment tracking at the edge: TensorBoard event files in each run folder, MLflow when configured.

TensorBoard: torch's `SummaryWriter` writes into `<run>/tensorboard/`; for a run root on
object storage it writes into a temporary folder and every flush copies the event files there
through fsspec (TensorBoard's own s3 client cannot take our storage options or endpoint). A
stock `tensorboard --logdir <run_root>` reads them, from s3:// too.

MLflow: one run per student (and one per teacher-cache store), created by the driver, whose
id is kept in `<run>/mlflow.json` so a resumed run goes on logging into the same MLflow run.
A tracking server that cannot be reached never stops a stage: it is said once, and the stage
goes on without MLflow.

It sits in the library's top layer: the distill workers' loop (`pipeline.training.loop`) and
the stage drivers both log through it.
"""
from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
import time
import urllib.request
from typing import Any

import numpy as np
import yaml
from PIL import Image

from pipeline.config import Config, dump_config
from pipeline.storage import (exists, join_url, list_names, local_path, read_bytes, read_json, write_bytes_atomic,
                              write_json)


def say(message: str) -> None:
    print(message, flush=True)


TENSORBOARD = "tensorboard"
MLFLOW_RUN = "mlflow.json"
# MLflow's client retries an unreachable server for minutes by default; a training run must not wait on it.
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as `a.b.c -> leaf` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def numbers(tree: Any) -> dict[str, float]:
    """The numeric leaves of a report (booleans and lists left out), as `a/b/c -> value`."""
    return {k.replace(".", "/"): float(v) for k, v in flat(tree).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def config_params(cfg: Config) -> dict[str, str]:
    """The run's config as MLflow params: dotted keys, storage options redacted as in config.yaml."""
    return {k: str(v)[:6000] for k, v in flat(yaml.safe_load(dump_config(cfg))).items()}


# --- TensorBoard ---------------------------------------------------------------------------

class TensorBoard:
    """A SummaryWriter whose event files live at `url` (a folder or any fsspec URL): written
    there directly when it is local, else in a temporary folder uploaded at each flush."""

    def __init__(self, url: str, storage_options=None, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.url, self.storage_options = url, storage_options
        self.remote = local_path(url) is None
        self.local = tempfile.mkdtemp(prefix="phreg-tb-") if self.remote else local_path(url)
        # Restarted from the checkpoint at resume_step, the steps after it are logged again:
        # purge_step makes TensorBoard drop the earlier files' copies of them.
        self.writer = SummaryWriter(self.local, purge_step=resume_step + 1 if resume_step else None, flush_secs=3600)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    write_bytes_atomic(join_url(self.url, name), f.read(), self.storage_options)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


# --- MLflow --------------------------------------------------------------------------------

def mlflow_uri(cfg: Config) -> str | None:
    return cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class MLflow:
    """One MLflow run through the client API (no global active run: students train side by side)."""

    def __init__(self, uri: str, run_id: str):
        for key, value in MLFLOW_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.uri, self.run_id, self.client, self.failed = uri, run_id, MlflowClient(uri), False

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # a tracking server is never a reason to stop training
            self.failed = True
            say(f"mlflow: {what} failed at {self.uri} ({type(e).__name__}); going on without MLflow")

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self._call("logging metrics", self.client.log_batch, self.run_id, metrics=batch[i:i + 1000])

    def artifacts(self, folder: str, path: str) -> None:
        self._call("uploading artifacts", self.client.log_artifacts, self.run_id, folder, path)

    def finish(self) -> None:
        self._call("closing the run", self.client.set_terminated, self.run_id)

    def missing_steps(self, key: str, last_step: int) -> str | None:
        """A sentence when the run's `key` stops before `last_step`: the workers log into
        MLflow themselves and say a failure only in Ray's logs, so the driver checks after."""
        try:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
        except Exception as e:
            return f"mlflow: cannot read run {self.run_id} back at {self.uri} ({type(e).__name__})"
        if not steps or max(steps) < last_step:
            return (f"mlflow: run {self.run_id} has {key} up to step {max(steps) if steps else 'none'} of {last_step}: "
                    "the workers lost the tracking server (Ray's logs say when); TensorBoard and metrics.csv have every step")
        return None


def reachable(uri: str) -> bool:
    """A file or database URI always is; an http(s) server when its /health answers."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def start_run(cfg: Config, run_url: str | None, name: str, tags: dict[str, str] | None = None) -> dict | None:
    """The MLflow run of the stage run at `run_url` ({uri, run_id}), created with the config as
    params on the first start and reused on a resume (run_url None: always a new run). None
    without a tracking URI, or when the server cannot be reached (said once)."""
    uri, so = mlflow_uri(cfg), cfg.storage.storage_options
    if uri is None:
        return None
    if not reachable(uri):
        say(f"mlflow: no tracking server answers at {uri}; going on without MLflow")
        return None
    record_url = join_url(run_url, MLFLOW_RUN) if run_url else None
    if record_url and exists(record_url, so):
        record = read_json(record_url, so)
        if record.get("uri") == uri:
            return record
    tracker = MLflow(uri, "")
    try:
        experiment = tracker.client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else tracker.client.create_experiment(cfg.tracking.mlflow_experiment)
        run = tracker.client.create_run(experiment_id, run_name=name, tags={"phreg.run": run_url or "", **(tags or {})})
    except Exception as e:
        say(f"mlflow: cannot create a run at {uri} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); going on without MLflow")
        return None
    from mlflow.entities import Param

    tracker.run_id = run.info.run_id
    params = [Param(k, v) for k, v in config_params(cfg).items()]
    for i in range(0, len(params), 100):  # MLflow's limit per batch
        tracker._call("logging params", tracker.client.log_batch, tracker.run_id, params=params[i:i + 100])
    record = {"uri": uri, "run_id": tracker.run_id, "experiment": cfg.tracking.mlflow_experiment}
    if record_url:
        write_json(record_url, record, so)
    say(f"mlflow: run {name} ({tracker.run_id}) in experiment {cfg.tracking.mlflow_experiment} at {uri}")
    return record


def existing_run(cfg: Config, run_url: str) -> MLflow | None:
    """The MLflow run a distill run started (for export and evaluate to add to), if any."""
    uri, so = mlflow_uri(cfg), cfg.storage.storage_options
    record_url = join_url(run_url, MLFLOW_RUN)
    if uri is None or not exists(record_url, so):
        return None
    record = read_json(record_url, so)
    if record.get("uri") != uri or not reachable(uri):
        return None
    return MLflow(uri, record["run_id"])


class Tracker:
    """Where a stage's figures go: TensorBoard (when enabled) and MLflow (when it has a run)."""

    def __init__(self, cfg: Config, run_url: str, mlflow: dict | None = None, resume_step: int = 0):
        so = cfg.storage.storage_options
        self.tensorboard = TensorBoard(join_url(run_url, TENSORBOARD), so, resume_step) if cfg.tracking.tensorboard else None
        self.mlflow = MLflow(mlflow["uri"], mlflow["run_id"]) if mlflow else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard:
            self.tensorboard.scalars(values, step)
        if self.mlflow:
            self.mlflow.metrics(values, step)

    def flush(self) -> None:
        if self.tensorboard:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


# --- the figures of later stages -----------------------------------------------------------

def log_export(cfg: Config, run_url: str, folder: str) -> None:
    """The export folder (local, as written) as artifacts of the student's MLflow run."""
    if (run := existing_run(cfg, run_url)) is not None:
        run.artifacts(folder, "export")


def log_evaluation(cfg: Config, report: dict, output: str, student_export: str | None) -> None:
    """The report's figures as scalars and its pictures as images, into the evaluated student's
    TensorBoard and MLflow runs at its step (`<output>/tensorboard` for a model without a run)."""
    so = cfg.storage.storage_options
    run_url, step = join_url(cfg.students_url, cfg.student.name), 0
    if student_export is None or not exists(join_url(run_url, "run.json"), so):
        run_url = None
    elif exists(provenance := join_url(student_export, "phreg.json"), so):
        step = int(read_json(provenance, so).get("step", 0))
    values = {f"eval/{k}": v for k, v in numbers(report).items()}
    pictures = {name: read_bytes(join_url(output, name), so) for name in list_names(output, so) if name.endswith(".png")}
    if cfg.tracking.tensorboard:
        board = TensorBoard(join_url(run_url or output, TENSORBOARD), so)
        board.scalars(values, step)
        for name, png in pictures.items():
            board.image(f"eval/{name[:-len('.png')]}", png, step)
        board.close()
    if run_url is not None and (run := existing_run(cfg, run_url)) is not None:
        run.metrics(values, step)
        with tempfile.TemporaryDirectory() as folder:
            for name in [*pictures, "report.md", "report.json"]:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(pictures[name] if name in pictures else read_bytes(join_url(output, name), so))
            run.artifacts(folder, posixpath.join("eval", posixpath.basename(output.rstrip("/"))))


def log_cache_run(cfg: Config, fingerprint: str, store_url: str, stats: dict) -> None:
    """A teacher-cache run's throughput, as an MLflow run named for its store's fingerprint."""
    record = start_run(cfg, None, f"teacher-cache {fingerprint}", {"phreg.store": store_url, "phreg.fingerprint": fingerprint})
    if record is not None:
        run = MLflow(record["uri"], record["run_id"])
        run.metrics({f"cache/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}, 0)
        run.finish()
