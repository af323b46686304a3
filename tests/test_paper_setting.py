"""configs/paper-dinov2.yaml: the published DINOv2 setting, checked value by value, and run
end to end here with the model shrunk by overrides (no pretrained weights can be downloaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import PHREG_UNLOCK, load_config
from pipeline.models.vit import describe_teacher
from pipeline.storage import join_url
from pipeline.training import checkpoint

PRESET = Path(__file__).resolve().parents[1] / "configs" / "paper-dinov2.yaml"


def test_preset_is_the_published_setting():
    cfg = load_config([PRESET])
    assert (cfg.teacher.model, cfg.teacher.pretrained, cfg.teacher.img_size) == ("vit_base_patch14_dinov2", True, 518)
    assert (cfg.tta.counts, cfg.tta.shift_frac, cfg.tta.flip, cfg.tta.fps_start) == (10, 0.15, True, "random")
    assert cfg.student.registers == 16  # the paper's unlock set, with its trained class position as the class token
    assert cfg.student.unlock == [*PHREG_UNLOCK, "cls_token"]
    d = cfg.distill
    assert (d.epochs, d.batch_size, d.lr, d.final_lr, d.weight_decay, d.mse_scale) == (100, 8, 1e-4, 5e-6, 1e-2, 1.0)
    assert d.lr_decay == "epoch"
    # one checkpoint per epoch of Flickr30k (31,783 images) at the preset's workers x batch
    steps_per_epoch = 31_783 / (d.num_workers * d.batch_size)
    assert abs(d.checkpoint_every - steps_per_epoch) / steps_per_epoch < 0.05
    assert cfg.cache.crop == "random" and cfg.cache.variants > 1  # the cached stand-in for per-epoch random crops


def test_preset_teacher_has_the_published_grid():
    cfg = load_config([PRESET], {"teacher.pretrained": False})  # shapes only: no weights needed
    spec = describe_teacher(cfg.teacher)
    assert (spec.grid, spec.dim, spec.patch) == ((37, 37), 768, (14, 14))


@pytest.mark.slow
def test_preset_runs_end_to_end_shrunk(tmp_path, ray_local):
    from stages import distill, shard, teacher_cache

    root = str(tmp_path / "run")
    cfg = load_config([PRESET], {
        "storage.run_root": root,
        "shard.input": ["sample:photos"], "shard.sample_size": 8, "shard.shard_size": 4,
        "teacher.pretrained": False,  # random weights, and a DINOv2-family model small enough for the CPU
        "teacher.img_size": 56, "teacher.model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
        "tta.counts": 3, "cache.variants": 2, "cache.num_actors": 1, "cache.batch_images": 2,
        "distill.epochs": 2, "distill.num_workers": 1, "distill.batch_size": 4,
        "distill.checkpoint_every": 100, "distill.log_every": 1,
    })
    assert cfg.teacher.model == "vit_base_patch14_dinov2" and cfg.student.registers == 16  # the rest stays the paper's
    shard.run(cfg)
    store = teacher_cache.run(cfg)
    targets = store.group["targets"]
    assert targets.shape == (8, 2, 4, 4, 48)
    # two variants: each its own random crop and views
    assert not np.array_equal(targets[0, 0], targets[0, 1])
    distill.run(cfg)
    run_url = join_url(cfg.students_url, cfg.student.name)
    student, _, state = checkpoint.load_student(checkpoint.latest(run_url), None)
    assert state["step"] == state["total_steps"] == 2 * 8 // 4
    assert student.reg_token.shape[1] == 16
