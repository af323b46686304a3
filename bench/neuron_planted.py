"""Benchmark hook: PH-Reg against test-time registers on the neuron-planted teacher.

`neuron_planted(workdir)` runs configs/demo.yaml + configs/neuron-planted.yaml (48 training
photographs; a teacher whose artifacts come from 3 MLP neurons at 3 grid cells; 150
distillation steps), shards 16 held-out photographs, computes their targets into their own
store and evaluates teacher, TTA targets, PH-Reg student and the test-time-registers baseline
(register neurons located on the training images) on them: outlier tokens per image (final
layer, relative rule), cosine to the targets, and the segmentation probe's mIoU.
"""
from __future__ import annotations

import os

from bench.planted_run import configs, planted_run

CONFIGS = configs("demo.yaml", "neuron-planted.yaml")
KEYS = {"teacher": "teacher", "target": "target", "student": "student", "test-time-registers": "test_time_registers"}


def neuron_planted(workdir: str) -> dict:
    root = os.path.abspath(os.path.join(workdir, "neuron_planted"))
    report = planted_run(root, CONFIGS, {})
    out = {}
    for name, key in KEYS.items():
        out[f"neuron_planted_outliers_{key}"] = round(report["norms"][name]["outliers_per_image"], 3)
        if name in report["fidelity"]:
            out[f"neuron_planted_cosine_{key}"] = round(report["fidelity"][name]["cosine"], 4)
        if name in report["probes"]["models"]:
            out[f"neuron_planted_miou_{key}"] = round(report["probes"]["models"][name]["segmentation"]["miou"], 4)
    out["neuron_planted_located"] = [[n["layer"], n["index"]] for n in report["baselines"]["test-time-registers"]["neurons"]]
    return out
