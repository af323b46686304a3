"""The planted-artifact teacher (pipeline/models/planted.py): artifacts exactly where they were
planted, a real timm model end to end, TTA that dilutes them and a student that loses them.

Randomly initialised ViTs have no artifacts, so this construction is what lets these tests
check that the pipeline removes artifacts at all; see docs/planted-artifacts.md.
"""
import os

import numpy as np
import pytest
import torch

from bench.planted_run import heldout_input, train_then_evaluate
from pipeline.config import StudentConfig, TeacherConfig
from pipeline.data.images import crop_box, decode_rgb
from pipeline.data.sample_corpus import generate, write_sample_corpus
from pipeline.evaluation.metrics import outlier_mask, token_norms
from pipeline.models.export import load_exported, max_output_difference, write_folder
from pipeline.models.planted import NAME, PlantedVisionTransformer, planted_cells
from pipeline.models.vit import build_student, describe_teacher, load_teacher, patch_features, readout, unlock
from pipeline.targets.tta import denoise, max_shifts, sample_views, view_rng
from pipeline.training.losses import distill_loss
from tests.conftest import tiny_config

CFG = TeacherConfig(model=NAME, img_size=96)


def photos(n: int, seed: int = 0) -> torch.Tensor:
    pre = describe_teacher(CFG).preprocess
    images = [decode_rgb(data) for _, data in generate(n, seed)]
    return torch.stack([pre(img, crop_box(img.width, img.height, pre.size, "center")) for img in images])


def planted_mask(model) -> torch.Tensor:
    gh, gw = model.patch_embed.grid_size
    mask = torch.zeros(gh * gw, dtype=torch.bool)
    mask[model.plant_index] = True
    return mask.view(gh, gw)


def test_cells_by_hand():
    assert planted_cells((12, 12), ((0.25, 0.25), (0.25, 0.75), (0.7, 0.45))) == [3 * 12 + 3, 3 * 12 + 9, 8 * 12 + 5]
    assert planted_cells((4, 4), ((0.99, 0.99), (0.9, 0.9))) == [15]  # cells that fall together count once


def test_artifacts_sit_at_the_planted_cells_whatever_the_image():
    teacher = load_teacher(CFG)
    x = torch.cat([photos(6), torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))])
    final, residual, _ = readout(teacher, x, -1)
    expected = planted_mask(teacher).expand(len(x), -1, -1)
    assert expected[0].sum() == 3
    assert torch.equal(outlier_mask(token_norms(final), k=6), expected)
    norms = token_norms(residual)
    assert (norms[expected] > 45).all() and (norms[~expected] < 20).all()  # planted norm 50 vs ordinary tokens


def test_students_and_exports_keep_the_planted_architecture(tmp_path):
    teacher = load_teacher(CFG)
    x = photos(2)
    same = build_student(teacher, CFG, StudentConfig(registers=0)).eval()
    assert torch.equal(patch_features(same, x), patch_features(teacher, x))  # the exact conversion still holds
    student = build_student(teacher, CFG, StudentConfig(registers=4)).eval()
    assert student.num_prefix_tokens == 5  # class token + 4 registers
    assert torch.equal(outlier_mask(token_norms(patch_features(student, x)), 6)[0], planted_mask(teacher))
    write_folder(student, str(tmp_path), {})
    reloaded = load_exported(str(tmp_path))
    assert isinstance(reloaded, PlantedVisionTransformer) and reloaded.reg_token.shape[1] == 4
    assert max_output_difference(student, reloaded) == 0.0


def test_lowering_the_trigger_switches_an_artifact_off():
    teacher = load_teacher(CFG)
    assert torch.allclose(teacher.plant_strength(), torch.ones(3))
    n = teacher.patch_embed.grid_size[0] * teacher.patch_embed.grid_size[1]
    with torch.no_grad():
        teacher.pos_embed[0, -n + int(teacher.plant_index[0]), teacher.trigger] = teacher.plant_off
    assert torch.allclose(teacher.plant_strength(), torch.tensor([0.0, 1.0, 1.0]))
    mask = outlier_mask(token_norms(patch_features(teacher, photos(3))), 6)
    assert mask.flatten(1).sum(1).tolist() == [2, 2, 2]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="plant_off"):
        load_teacher(TeacherConfig(model=NAME, img_size=96, model_kwargs={"plant_off": 0.1}))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        load_teacher(TeacherConfig(model=NAME, img_size=96, model_kwargs={"dynamic_img_size": True}))


def tta_targets(teacher, x: torch.Tensor, counts: int = 10) -> torch.Tensor:
    pre = describe_teacher(CFG).preprocess
    out = []
    for i in range(len(x)):
        offsets, flips = sample_views(view_rng(0, i), counts, max_shifts(teacher.patch_embed.grid_size, 0.15), True)
        with torch.inference_mode():
            out.append(denoise(lambda v: patch_features(teacher, v), x[i:i + 1], offsets[None], flips[None],
                               tuple(teacher.patch_embed.patch_size), pre.white()))
    return torch.cat(out)


def outliers_per_image(features: torch.Tensor) -> float:
    return outlier_mask(token_norms(features), 6).flatten(1).sum(1).float().mean().item()


def test_tta_dilutes_the_artifacts_and_a_student_step_lowers_them():
    teacher = load_teacher(CFG)
    x = photos(8)
    targets = tta_targets(teacher, x)
    teacher_count, target_count = outliers_per_image(patch_features(teacher, x)), outliers_per_image(targets)
    assert teacher_count == 3.0 and target_count <= teacher_count / 4
    # the distillation loss pushes the planted cells' trigger down: the artifacts weaken
    student = build_student(teacher, CFG, StudentConfig(registers=4)).train()
    unlock(student, StudentConfig().unlock_patterns)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2)
    for _ in range(5):
        loss = distill_loss(patch_features(student, x), targets)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (student.plant_strength() < 1.0).all()


@pytest.mark.slow
def test_planted_pipeline_end_to_end(tmp_path, ray_local):
    """shard -> teacher-cache -> distill -> export, then a held-out corpus through shard and
    teacher-cache, then evaluate on the held-out images: targets and student have far fewer
    outliers than the teacher."""
    root = str(tmp_path / "run")
    heldout_url = os.path.join(root, "heldout_shards")
    common = {"teacher.model": NAME, "teacher.img_size": 96, "teacher.model_kwargs": {}, "tta.counts": 10,
              "cache.batch_images": 4}
    cfg = tiny_config(root, **common, **{
        "shard.sample_size": 24, "shard.shard_size": 8, "distill.epochs": 40, "distill.batch_size": 8,
        "distill.lr": 1e-3, "distill.final_lr": 5e-5, "distill.checkpoint_every": 1000, "distill.log_every": 40,
        "evaluate.shards": heldout_url, "evaluate.num_images": 8, "evaluate.pca_images": 2,
        "evaluate.abs_threshold": 20.0, "evaluate.abs_threshold_final": 20.0, "evaluate.labeled": "sample:labeled",
        "evaluate.images_per_task": 32,
    })
    photos_url = write_sample_corpus(str(tmp_path / "heldout_photos"), 8, seed=1)
    heldout = tiny_config(root, **common, **heldout_input(photos_url, heldout_url), **{"shard.shard_size": 4})
    report = train_then_evaluate(cfg, heldout)

    assert report["images"]["trained_on"] is False and report["images"]["shards"] == heldout_url
    norms = report["norms"]
    teacher, target, student = (norms[n]["outliers_per_image"] for n in ("teacher", "target", "student"))
    assert teacher == 3.0
    assert target <= teacher / 4
    assert student <= teacher / 4
    residual = report["residual"]["norms"]
    assert residual["teacher"]["abs_outliers_per_image"] == 3.0 and residual["student"]["abs_outliers_per_image"] < 1.0
    assert report["fidelity"]["student"]["cosine"] > report["fidelity"]["teacher"]["cosine"]
    probes = report["probes"]["models"]
    for name in ("teacher", "student"):
        assert probes[name]["segmentation"]["miou"] > 0.2  # 6 classes: well above chance for any features
        assert 0 < probes[name]["depth"]["rmse"] < 2.0 and 0 < probes[name]["depth"]["delta_1.25"] <= 1

    text = open(os.path.join(cfg.eval_url, "report.md")).read()
    for name in ("teacher", "target", "student"):
        assert f"| {name} | " in text and f"{norms[name]['outliers_per_image']:.2f}" in text
    assert f"{probes['student']['segmentation']['miou']:.3f}" in text
    for name in ("pca.png", "norms.png", "norms_residual.png", "norm_hist.png", "outlier_map.png", "probe_seg.png",
                 "probe_depth.png"):
        with open(os.path.join(cfg.eval_url, name), "rb") as f:
            assert f.read(4) == b"\x89PNG", name
    assert np.isfinite(report["fidelity"]["student"]["mse"])


def test_the_demo_teacher_is_planted_and_says_so():
    """`make demo` shows artifacts going away only with a teacher that has them; its output
    must say plainly that this one is a construction."""
    from pipeline.config import load_config
    from pipeline.models.planted import planted_note

    demo = load_config(["configs/demo.yaml"])
    note = planted_note(demo.teacher.model)
    assert note is not None and "planted by construction" in note and "not a pretrained model" in note
    assert planted_note("vit_small_patch14_dinov2") is None
    assert planted_note("local-dir:/exports/vit_small") is None
