"""Outlier counting and the other evaluation metrics on hand-worked cases, the model readout,
and the evaluate stage on one model alone (no store, no student) through real Ray."""
import os

import pytest
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError
from pipeline.evaluation import metrics
from pipeline.evaluation.plan import export_folder
from pipeline.models.vit import load_teacher, patch_features, readout
from stages import evaluate
from tests.conftest import tiny_config


def test_relative_threshold_by_hand():
    norms = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    # median 3, absolute deviations 2, 1, 0, 1, 97 -> MAD 1 -> threshold 3 + 6 * 1
    assert metrics.relative_thresholds(norms, k=6, min_mad=0.05).tolist() == [9.0]
    assert metrics.outlier_mask(norms, k=6).tolist() == [[False, False, False, False, True]]


def test_mad_floor_keeps_noise_from_counting():
    norms = torch.tensor([[10.0, 10.0, 10.0, 10.0, 10.01, 14.0]])  # MAD 0: constant norms after a LayerNorm
    assert metrics.outlier_mask(norms, k=6, min_mad=0.0).sum() == 2  # 10.01 counts without a floor
    # floor 0.05 * median = 0.5 -> threshold 13: only the clear outlier
    assert metrics.outlier_mask(norms, k=6, min_mad=0.05).tolist() == [[False] * 5 + [True]]


def test_thresholds_are_per_image():
    norms = torch.tensor([[[1.0, 1.0], [1.0, 5.0]], [[10.0, 10.0], [10.0, 12.0]]])  # (N, gh, gw)
    mask = metrics.outlier_mask(norms, k=6)
    assert mask.tolist() == [[[False, False], [False, True]], [[False, False], [False, False]]]  # 12 < 10 * 1.3


def test_norm_summary_and_outlier_frequency():
    norms = torch.tensor([[[1.0, 9.0], [1.0, 1.0]], [[1.0, 9.0], [9.0, 1.0]]])
    mask = metrics.outlier_mask(norms, k=6)
    s = metrics.norm_summary(norms, mask, abs_threshold=5.0)
    # first image: median 1, MAD 0 (floored at 0.05) -> one outlier; second: median 5, MAD 4 -> none
    assert s["outliers_per_image"] == 0.5 and s["outliers_per_image_max"] == 1
    assert s["abs_outliers_per_image"] == 1.5 and s["norm_max"] == 9.0
    assert metrics.outlier_frequency(mask).tolist() == [[0.0, 0.5], [0.0, 0.0]]
    assert "abs_outliers_per_image" not in metrics.norm_summary(norms, mask)


def test_attention_share_on_outliers():
    mask = torch.tensor([[[True, False], [False, False]]])
    assert metrics.attention_on(mask, torch.tensor([[[0.5, 0.25], [0.25, 0.0]]])) == pytest.approx(0.5)
    # only the patch part of the attention counts (the rest went to prefix tokens)
    assert metrics.attention_on(mask, torch.tensor([[[0.2, 0.1], [0.1, 0.0]]])) == pytest.approx(0.5)


def test_fidelity_by_hand():
    a = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])  # (1, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [2.0, 0.0]]]])
    assert metrics.cosine_per_image(a, b).tolist() == [0.5]
    assert metrics.mse_per_image(a, b).tolist() == [pytest.approx((0 + 0 + 4 + 4) / 4)]


def test_pca_colours_share_one_projection():
    gen = torch.Generator().manual_seed(0)
    feats = {"a": torch.randn(2, 3, 3, 8, generator=gen), "b": torch.randn(1, 3, 3, 8, generator=gen)}
    rgb = metrics.pca_rgb(feats)
    assert rgb["a"].shape == (2, 3, 3, 3) and rgb["b"].shape == (1, 3, 3, 3)
    assert all(0 <= m.min() and m.max() <= 1 for m in rgb.values())
    same = metrics.pca_rgb({"a": feats["a"], "copy": feats["a"].clone()})
    assert torch.equal(same["a"], same["copy"])


def test_readout_views_of_one_forward():
    cfg = TeacherConfig(model="vit_tiny_patch16_224", img_size=64, model_kwargs={"depth": 2})
    model = load_teacher(cfg)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    final, residual, attention = readout(model, x, -1)
    assert torch.equal(final, patch_features(model, x))
    assert torch.allclose(model.norm(residual), final, atol=1e-6)  # the residual stream is the pre-norm output
    assert attention.shape == (2, 4, 4) and (attention.sum((1, 2)) < 1).all()  # the rest goes to the class token
    assert readout(model, x, None)[1] is None


def test_class_attention_is_uniform_when_queries_and_keys_vanish():
    cfg = TeacherConfig(model="vit_tiny_patch16_224", img_size=64, model_kwargs={"depth": 2, "reg_tokens": 3})
    model = load_teacher(cfg)
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight[: 2 * model.embed_dim] = 0  # q = k = 0 ...
        model.blocks[-1].attn.qkv.bias[: 2 * model.embed_dim] = 0  # ... so softmax is uniform
    attention = readout(model, torch.randn(1, 3, 64, 64), None)[2]
    assert torch.allclose(attention, torch.full((1, 4, 4), 1 / (1 + 3 + 16)))  # 1 class token, 3 registers, 16 patches


def test_no_class_token_no_attention():
    cfg = TeacherConfig(model="vit_tiny_patch16_224", img_size=64,
                        model_kwargs={"depth": 2, "class_token": False, "global_pool": "avg"})
    assert readout(load_teacher(cfg), torch.randn(1, 3, 64, 64), -2)[2] is None


def test_model_or_export_folder(tmp_path):
    assert export_folder("vit_small_patch14_dinov2") is None
    assert export_folder(str(tmp_path)) == str(tmp_path)
    assert export_folder("local-dir:relative/folder") == os.path.abspath("relative/folder")
    assert export_folder("s3://bucket/exports/r16") == "s3://bucket/exports/r16"


@pytest.mark.slow
def test_one_model_alone(tmp_path, tiny_copy):
    """`evaluate.model` checks a model for artifacts without a store or a student (on the
    sharded tiny corpus: the stage reads only its shards)."""
    cfg = tiny_config(tiny_copy, **{"evaluate.model": "vit_planted_tiny_patch8", "teacher.img_size": 96,
                                    "teacher.model_kwargs": {}, "evaluate.num_images": 6,
                                    "evaluate.abs_threshold": 20.0})
    report = evaluate.run(cfg)
    assert report["mode"] == "model" and list(report["norms"]) == ["vit_planted_tiny_patch8"]
    s = report["norms"]["vit_planted_tiny_patch8"]
    assert s["outliers_per_image"] == 3.0 and s["outliers_per_image_max"] == 3  # exactly the planted cells
    assert report["residual"]["norms"]["vit_planted_tiny_patch8"]["abs_outliers_per_image"] == 3.0
    assert report["fidelity"] == {} and report["images"]["trained_on"] is None
    out = cfg.under_root("eval", "vit_planted_tiny_patch8")
    for name in ("report.md", "report.json", "pca.png", "norms.png", "norms_residual.png", "norm_hist.png",
                 "outlier_map.png", "attention.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    text = open(os.path.join(out, "report.md")).read()
    assert "| vit_planted_tiny_patch8 | " in text and "3.00" in text

    with pytest.raises(ConfigError, match="timm model name"):
        evaluate.run(tiny_config(tiny_copy, **{"evaluate.model": str(tmp_path), "evaluate.pretrained": True}))
