"""The planted-teacher run that bench sections and tests share: train on one corpus, then
evaluate on held-out photographs that no stage trained on.

The held-out photographs are sharded and their targets computed into their own store (the
held-out config's `cache.shards`), and the training config's `evaluate.shards` names their
shards, so that evaluate measures teacher, targets and student on images the student never saw.
"""
from __future__ import annotations

import os

from pipeline.config import Config, load_config
from pipeline.data.sample_corpus import write_sample_corpus
from stages import distill, evaluate, export, shard, teacher_cache

HELDOUT_IMAGES = 16
HELDOUT_SEED = 1  # other crops and flips of the bundled photographs than the training corpus (seed 0)


def configs(*names: str) -> list[str]:
    """Paths of files in configs/."""
    return [os.path.join(os.path.dirname(__file__), "..", "configs", name) for name in names]


def heldout_corpus(root: str) -> tuple[str, str]:
    """(photographs, shards): HELDOUT_IMAGES photographs written under `root`, and the folder
    their shards go to."""
    photos = write_sample_corpus(os.path.join(root, "heldout_photos"), HELDOUT_IMAGES, seed=HELDOUT_SEED)
    return photos, os.path.join(root, "heldout_shards")


def heldout_input(photos: str, shards: str) -> dict:
    """Overrides that turn a run's config into the held-out corpus's: its photographs sharded
    to `shards` and its targets computed there."""
    return {"shard.input": [photos], "shard.output": shards, "cache.shards": shards}


def train_then_evaluate(train: Config, heldout: Config) -> dict:
    """shard -> teacher-cache -> distill -> export on `train`, the held-out corpus through shard
    and teacher-cache, then evaluate `train` (on the shards its `evaluate.shards` names):
    evaluate's report."""
    for stage in (shard, teacher_cache, distill, export):
        stage.run(train)
    shard.run(heldout)
    teacher_cache.run(heldout)
    return evaluate.run(train)


def planted_run(root: str, config_files: list[str], train_overrides: dict) -> dict:
    """`config_files` trained on under `root`, then evaluated on the held-out corpus: evaluate's
    report."""
    photos, heldout_shards = heldout_corpus(root)
    train = load_config(config_files, {"storage.run_root": root, "evaluate.shards": heldout_shards,
                                       "evaluate.num_images": HELDOUT_IMAGES, **train_overrides})
    heldout = load_config(config_files, {"storage.run_root": root, **heldout_input(photos, heldout_shards)})
    return train_then_evaluate(train, heldout)
