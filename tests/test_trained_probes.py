"""The trained probe protocols: their math on hand-worked cases, a separable segmentation case
the trained head must solve, and evaluate with `probe_protocol: trained` through real Ray."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.probes import confusion, mean_iou
from pipeline.evaluation.trained_probes import (
    TrainedProbeSettings,
    bin_centres,
    decode_bins,
    eigen_crop,
    gradient_loss,
    poly_lr,
    scored_depth,
    segment,
    siglog_loss,
    slide,
    train_segmentation,
    window_starts,
)
from stages import evaluate, shard
from tests.conftest import tiny_config

SETTINGS = TrainedProbeSettings(iterations=100, batch_size=8, lr=3e-2, stride=2 / 3, bins=256, min_depth=0.001,
                                max_depth=10.0, siglog_lambda=0.85, gradient_weight=0.5, eigen_crop=False, seed=0)


def test_poly_schedule_by_hand():
    assert poly_lr(1e-3, 0, 100) == pytest.approx(1e-3)
    assert poly_lr(1e-3, 25, 100) == pytest.approx(7.5e-4)
    assert poly_lr(1e-3, 50, 100, power=2.0) == pytest.approx(2.5e-4)
    assert poly_lr(1e-3, 100, 100) == 0.0


def test_one_hot_bin_logits_decode_to_their_centre_in_metres():
    centres = bin_centres(0.001, 10.0, 256)
    assert centres[0] == pytest.approx(0.001) and centres[-1] == pytest.approx(10.0)
    k = torch.tensor([[0, 37], [128, 255]])  # a bin per pixel of a 2x2 map
    logits = 100.0 * F.one_hot(k, 256).permute(2, 0, 1)[None].float()  # (1, 256, 2, 2)
    depth = decode_bins(logits, centres)[0]
    step = (10.0 - 0.001) / 255
    expected = [[0.001, 0.001 + 37 * step], [0.001 + 128 * step, 10.0]]  # 37 -> 1.4518 m, 128 -> 5.0201 m
    assert depth.tolist() == [[pytest.approx(v, abs=1e-5) for v in row] for row in expected]
    uniform = decode_bins(torch.zeros(1, 256, 1, 1), centres)
    assert uniform.item() == pytest.approx((0.001 + 10.0) / 2, abs=1e-5)  # equal weights: the mean centre


def test_siglog_by_hand():
    gt = torch.tensor([1.0, 2.0, 4.0, 3.0])
    valid = torch.tensor([True, True, True, False])
    wrong_where_invalid = torch.tensor([2.0, 4.0, 8.0, 100.0])
    # pred = 2 gt on the valid pixels: g = log 2 everywhere -> sqrt(log^2 2 - 0.85 log^2 2)
    assert siglog_loss(wrong_where_invalid, gt, valid, 0.85).item() == pytest.approx(math.sqrt(0.15) * math.log(2))
    assert siglog_loss(wrong_where_invalid, gt, valid, 1.0).item() == pytest.approx(0.0, abs=1e-5)  # fully scale-invariant
    # g = (0, 1): mean g^2 = 0.5, mean g = 0.5 -> sqrt(0.5 - 0.85 * 0.25)
    pred = torch.tensor([1.0, 2.0 * math.e])
    assert siglog_loss(pred, gt[:2], valid[:2], 0.85).item() == pytest.approx(math.sqrt(0.5 - 0.85 * 0.25))


def test_gradient_loss_by_hand():
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 16, 16, generator=gen) + 0.5
    valid = torch.rand(2, 16, 16, generator=gen) > 0.2
    assert gradient_loss(gt.clone(), gt, valid).item() == 0.0
    assert gradient_loss(3.0 * gt, gt, valid).item() == pytest.approx(0.0, abs=1e-6)  # a constant log error has no gradient
    # log error [[0, 1], [0, 1]]: two horizontal steps of 1 over 4 valid pixels at full resolution; coarser scales
    # are single pixels without neighbours
    ones = torch.ones(2, 2)
    error = torch.tensor([[1.0, math.e], [1.0, math.e]])
    assert gradient_loss(error, ones, ones.bool()).item() == pytest.approx(0.5)


def test_windows_cover_every_pixel_and_line_up():
    assert window_starts(100, 64, 43) == [0, 36] and window_starts(64, 64, 43) == [0] and window_starts(50, 64, 43) == [0]
    assert window_starts(150, 64, 43) == [0, 43, 86]
    gen = torch.Generator().manual_seed(0)
    for size in ((100, 150), (64, 64), (50, 70)):
        image = torch.rand(3, *size, generator=gen)
        # the identity comes back unchanged only if every pixel is covered and every window is put back where it was cut
        assert torch.allclose(slide(lambda x: x, image, (64, 64), (43, 43)), image)


def test_one_window_is_one_forward():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    image = torch.rand(3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(slide(conv, image, (32, 48), (21, 32)), conv(image[None])[0], atol=1e-6)


def test_depth_scoring_masks():
    crop = eigen_crop(480, 640)
    assert crop.sum() == (471 - 45) * (601 - 41) and crop[45, 41] and not crop[44, 41] and not crop[45, 601]
    assert eigen_crop(240, 320).float().mean().item() == pytest.approx(crop.float().mean().item(), rel=0.01)
    gt = torch.tensor([[0.0005, 5.0, 12.0, float("nan")]])
    assert scored_depth(gt, SETTINGS).tolist() == [[0.0, 5.0, 0.0, 0.0]]  # only (min_depth, max_depth) is scored


COLOURS = torch.tensor([[0.2, 0.2, 0.2], [0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])


def separable_image(rng: np.random.Generator, size=(64, 80)):
    """Pixels coloured by their class (grey background, rectangles of the other classes on the
    4-px grid) and the labels, with an ignored row (cross-entropy fails on label 255 unless it
    is ignored)."""
    labels = torch.zeros(size, dtype=torch.long)
    for _ in range(3):
        h, w = (int(v) * 4 for v in rng.integers(4, 9, 2))
        y, x = int(rng.integers(0, (size[0] - h) // 4 + 1)) * 4, int(rng.integers(0, (size[1] - w) // 4 + 1)) * 4
        labels[y:y + h, x:x + w] = int(rng.integers(1, 4))
    pixels = COLOURS[labels].permute(2, 0, 1).contiguous()
    labels[int(rng.integers(0, size[0]))] = 255
    return pixels, labels


def pooled_colour(x: torch.Tensor):
    """Features that encode the class linearly: each 4x4 patch's mean colour (and the image's as its 'class token')."""
    patches = F.avg_pool2d(x, 4)
    return patches, patches.mean((2, 3))


def test_trained_head_solves_a_separable_case():
    rng = np.random.default_rng(0)
    train = [separable_image(rng) for _ in range(12)]
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    window = (32, 32)
    head = train_segmentation(pooled_colour, 3, train, 4, 255, window, mean, std, SETTINGS)
    conf = 0
    for pixels, labels in (separable_image(rng, (72, 100)) for _ in range(6)):  # val at their own, larger size
        # windows on the 4-px grid, so the patches do not straddle the rectangles' edges
        pred = segment(head, pooled_colour, (pixels - mean) / std, window, (16, 16))
        assert pred.shape == labels.shape
        conf = conf + confusion(pred, labels, 4, 255)
    assert mean_iou(conf) > 0.95


@pytest.mark.slow
def test_evaluate_with_trained_probes(tmp_path, ray_local):
    """One model alone, probes trained on the generated labeled set: both kinds scored, the
    report names the protocol, the pictures are drawn."""
    cfg = tiny_config(str(tmp_path / "run"), **{
        "evaluate.model": "vit_tiny_patch16_224", "shard.sample_size": 4, "evaluate.num_images": 2, "evaluate.pca_images": 1,
        "evaluate.residual_block": None, "evaluate.labeled": "sample:labeled", "evaluate.probe_protocol": "trained",
        "evaluate.probe_iterations": 4, "evaluate.probe_batch_size": 2})
    shard.run(cfg)
    report = evaluate.run(cfg)
    probes = report["probes"]
    assert probes["probe_protocol"] == "trained" and "ridge" not in probes and "trained linear heads" in probes["protocol"]
    scores = probes["models"]["vit_tiny_patch16_224"]
    assert 0 <= scores["segmentation"]["miou"] <= 1 and scores["depth"]["pixels"] > 0
    assert np.isfinite(scores["depth"]["rmse"]) and 0 <= scores["depth"]["delta_1.25"] <= 1
    out = cfg.under_root("eval", "vit_tiny_patch16_224")
    assert probes["figures"] == ["probe_seg.png", "probe_depth.png"]
    for name in probes["figures"]:
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "report.md")) as f:
        assert "trained linear heads" in f.read()
