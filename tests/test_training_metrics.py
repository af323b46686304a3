"""What a distill run records: windows of steps averaged (hand-worked), metric rows kept across
a resume, events appended. No Ray, no GPU."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.training.metrics import METRICS, Meter, MetricsLog, record_event, scalars


def test_a_window_averages_its_steps_and_its_data_wait():
    meter = Meter()
    meter.add(torch.tensor([1.0, 0.5, 0.25]), waited=0.0)
    meter.add(torch.tensor([3.0, 0.7, 0.75]), waited=0.0)
    meter.start -= 2.0  # the window lasted (at least) 2 s
    row = meter.row(step=10, epoch=1, lr=1e-4, samples_per_step=8)
    assert (row["loss"], row["cosine"], row["mse"]) == (2.0, 0.6, 0.5)
    assert row["step"] == 10 and row["epoch"] == 1 and row["lr"] == "1.000e-04"
    assert row["samples_per_s"] == pytest.approx(8.0, rel=0.05)  # 2 steps x 8 samples in ~2 s
    assert set(row) == set(METRICS)
    meter.reset()
    meter.add(torch.tensor([4.0, 0.0, 0.0]), waited=1.0)
    meter.start -= 1.0
    assert meter.row(11, 1, 1e-4, 8)["loss"] == 4.0 and meter.row(11, 1, 1e-4, 8)["data_wait_fraction"] <= 1.0


def test_metric_rows_survive_a_resume_up_to_its_step(tmp_path):
    url = str(tmp_path / "metrics.csv")
    log = MetricsLog(url, None, resume_step=0)
    for step in (5, 10, 15):
        log.append({k: step if k == "step" else 0 for k in METRICS})
    assert [int(r["step"]) for r in MetricsLog(url, None, resume_step=10).rows] == [5, 10]  # rows past the checkpoint dropped
    assert [int(r["step"]) for r in MetricsLog(url, None).rows] == [5, 10, 15]
    assert scalars(log.rows[0], "train")["train/loss"] == 0.0


def test_events_are_appended(tmp_path):
    url = str(tmp_path / "events.jsonl")
    record_event(url, None, {"event": "start", "step": 0})
    record_event(url, None, {"event": "resume", "step": 20})
    assert [json.loads(line)["event"] for line in open(url)] == ["start", "resume"]
