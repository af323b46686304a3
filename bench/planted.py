"""Benchmark hook: the planted-artifact pipeline end to end, measured on held-out images.

`planted_outliers(workdir)` runs configs/demo.yaml + configs/planted.yaml (48 training
photographs, a teacher with artifacts planted at 3 grid cells, 150 distillation steps), then
shards a second set of 16 photographs that no stage trained on, computes their targets into
their own store and evaluates teacher, targets and student on them. It returns the mean number
of outlier tokens per image (final layer, relative rule) of each.
"""
from __future__ import annotations

import os

from pipeline.config import load_config
from pipeline.data.sample_corpus import write_sample_corpus
from stages import distill, evaluate, export, shard, teacher_cache

CONFIGS = [os.path.join(os.path.dirname(__file__), "..", "configs", name) for name in ("demo.yaml", "planted.yaml")]
HELDOUT_IMAGES = 16
HELDOUT_SEED = 1  # other crops and flips of the bundled photographs than the training corpus (seed 0)


def planted_outliers(workdir: str) -> dict:
    root = os.path.abspath(os.path.join(workdir, "planted"))
    heldout_shards = os.path.join(root, "heldout_shards")
    photos = write_sample_corpus(os.path.join(root, "heldout_photos"), HELDOUT_IMAGES, seed=HELDOUT_SEED)
    train = load_config(CONFIGS, {"storage.run_root": root, "evaluate.shards": heldout_shards,
                                  "evaluate.num_images": HELDOUT_IMAGES, "evaluate.labeled": None})
    heldout = load_config(CONFIGS, {"storage.run_root": root, "shard.input": [photos], "shard.output": heldout_shards,
                                    "cache.shards": heldout_shards})
    for stage in (shard, teacher_cache, distill, export):
        stage.run(train)
    shard.run(heldout)
    teacher_cache.run(heldout)
    norms = evaluate.run(train)["norms"]
    return {f"planted_outliers_{name}": norms[name]["outliers_per_image"] for name in ("teacher", "target", "student")}
