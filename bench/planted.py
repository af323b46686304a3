"""Benchmark hook: the planted-artifact pipeline end to end, measured on held-out images.

`planted_outliers(workdir)` runs configs/demo.yaml + configs/planted.yaml (48 training
photographs, a teacher with artifacts planted at 3 grid cells, 150 distillation steps), then
shards a second set of 16 photographs that no stage trained on, computes their targets into
their own store and evaluates teacher, targets and student on them. It returns the mean number
of outlier tokens per image (final layer, relative rule) of each.
"""
from __future__ import annotations

import os

from bench.planted_run import configs, planted_run

CONFIGS = configs("demo.yaml", "planted.yaml")


def planted_outliers(workdir: str) -> dict:
    root = os.path.abspath(os.path.join(workdir, "planted"))
    norms = planted_run(root, CONFIGS, {"evaluate.labeled": None})["norms"]
    return {f"planted_outliers_{name}": norms[name]["outliers_per_image"] for name in ("teacher", "target", "student")}
