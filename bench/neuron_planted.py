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

from bench.planted import HELDOUT_IMAGES, HELDOUT_SEED
from pipeline.config import load_config
from pipeline.data.sample_corpus import write_sample_corpus
from stages import distill, evaluate, export, shard, teacher_cache

CONFIGS = [os.path.join(os.path.dirname(__file__), "..", "configs", name) for name in ("demo.yaml", "neuron-planted.yaml")]
KEYS = {"teacher": "teacher", "target": "target", "student": "student", "test-time-registers": "test_time_registers"}


def neuron_planted(workdir: str) -> dict:
    root = os.path.abspath(os.path.join(workdir, "neuron_planted"))
    heldout_shards = os.path.join(root, "heldout_shards")
    photos = write_sample_corpus(os.path.join(root, "heldout_photos"), HELDOUT_IMAGES, seed=HELDOUT_SEED)
    train = load_config(CONFIGS, {"storage.run_root": root, "evaluate.shards": heldout_shards,
                                  "evaluate.num_images": HELDOUT_IMAGES})
    heldout = load_config(CONFIGS, {"storage.run_root": root, "shard.input": [photos], "shard.output": heldout_shards,
                                    "cache.shards": heldout_shards})
    for stage in (shard, teacher_cache, distill, export):
        stage.run(train)
    shard.run(heldout)
    teacher_cache.run(heldout)
    report = evaluate.run(train)
    out = {}
    for name, key in KEYS.items():
        out[f"neuron_planted_outliers_{key}"] = round(report["norms"][name]["outliers_per_image"], 3)
        if name in report["fidelity"]:
            out[f"neuron_planted_cosine_{key}"] = round(report["fidelity"][name]["cosine"], 4)
        if name in report["probes"]["models"]:
            out[f"neuron_planted_miou_{key}"] = round(report["probes"]["models"][name]["segmentation"]["miou"], 4)
    out["neuron_planted_located"] = [[n["layer"], n["index"]] for n in report["baselines"]["test-time-registers"]["neurons"]]
    return out
