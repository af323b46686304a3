"""What a distill run records as it trains: metric rows (CSV in the run folder), windows of
steps averaged over ranks, and the run's start/resume events."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import time

import torch
import torch.distributed as dist

from pipeline.storage import read_bytes, write_bytes_atomic

METRICS = ["step", "epoch", "loss", "cosine", "mse", "lr", "samples_per_s", "data_wait_fraction", "seconds"]


class MetricsLog:
    """Rank 0 keeps a CSV of metric rows in the run folder (`metrics.csv`: one row per
    `log_every` steps; `epochs.csv`: one per epoch), rewritten whole at each row."""

    def __init__(self, url: str, storage_options, resume_step: int | None = None):
        self.url, self.storage_options = url, storage_options
        self.rows: list[dict] = []
        with contextlib.suppress(FileNotFoundError):
            text = read_bytes(url, storage_options).decode()
            self.rows = [r for r in csv.DictReader(io.StringIO(text)) if resume_step is None or int(r["step"]) <= resume_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(self.rows)
        write_bytes_atomic(self.url, buf.getvalue().encode(), self.storage_options)


def scalars(row: dict, prefix: str) -> dict[str, float]:
    """A metrics row as TensorBoard/MLflow scalars, e.g. `train/loss`."""
    return {f"{prefix}/{k}": float(row[k]) for k in ("loss", "cosine", "mse", "lr", "samples_per_s", "data_wait_fraction")}


class Meter:
    """Loss, cosine, MSE and data-wait time summed over a window of steps. The sums stay on the
    device until a row is asked for: reading a loss every step would make the loop wait for
    the GPU, which then idles while the next batch is fetched and launched."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.waited, self.start = None, 0, 0.0, time.perf_counter()

    def add(self, values: torch.Tensor, waited: float) -> None:
        """`values`: (loss, cosine, mse) of one step, a tensor on the model's device."""
        values = values.detach().double()
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1
        self.waited += waited

    def row(self, step: int, epoch: int, lr: float, samples_per_step: int) -> dict:
        """The window's averages over all ranks (a collective: every rank must call it)."""
        loss, cos, mse = mean_across_ranks(self.sums / self.steps)
        elapsed = time.perf_counter() - self.start
        return {"step": step, "epoch": epoch, "loss": round(loss, 6), "cosine": round(cos, 6), "mse": round(mse, 6),
                "lr": f"{lr:.3e}", "samples_per_s": round(self.steps * samples_per_step / elapsed, 2),
                "data_wait_fraction": round(self.waited / elapsed, 4), "seconds": round(elapsed, 2)}


def mean_across_ranks(t: torch.Tensor) -> list[float]:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def record_event(url: str, storage_options, event: dict) -> None:
    """Append `event` to the JSON-lines file `url` (a run's events.jsonl: every (re)start of
    its workers, with its step)."""
    try:
        previous = read_bytes(url, storage_options)
    except FileNotFoundError:
        previous = b""
    write_bytes_atomic(url, previous + (json.dumps(event) + "\n").encode(), storage_options)
