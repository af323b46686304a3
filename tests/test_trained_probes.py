"""The trained probe protocols: their math on hand-worked cases, a separable segmentation case
the trained head must solve, and evaluate with `probes.protocol: trained` through real Ray."""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import EvaluateConfig
from pipeline.errors import ConfigError
from pipeline.evaluation.probes import DepthSums, confusion, mean_iou
from pipeline.evaluation.trained_probes import (
    LinearHead,
    TrainedProbeSettings,
    bin_centres,
    cosine_lr,
    decode_bins,
    eigen_crop,
    estimate_depth,
    eval_size,
    gradient_loss,
    lr_at,
    poly_lr,
    schedule_of,
    scored_depth,
    segment,
    siglog_loss,
    slide,
    train_depth,
    train_segmentation,
    window_starts,
)
from stages import evaluate
from tests.conftest import tiny_config

SETTINGS = TrainedProbeSettings(iterations=100, batch_size=8, lr=3e-2, stride=2 / 3, bins=256, min_depth=0.001,
                                max_depth=10.0, siglog_lambda=0.85, gradient_weight=0.5, eigen_crop=False, seed=0)


def test_poly_schedule_by_hand():
    assert poly_lr(1e-3, 0, 100) == pytest.approx(1e-3)
    assert poly_lr(1e-3, 25, 100) == pytest.approx(7.5e-4)
    assert poly_lr(1e-3, 50, 100, power=2.0) == pytest.approx(2.5e-4)
    assert poly_lr(1e-3, 100, 100) == 0.0


def test_poly_schedule_by_hand_at_the_reference_power():
    # mmseg's PolyLR in PH-Reg's segmentation configs: power 0.9, eta_min 0
    assert poly_lr(1e-3, 50, 100, power=0.9) == pytest.approx(1e-3 * 0.5 ** 0.9)  # 5.3589e-4
    assert poly_lr(1e-3, 75, 100, power=0.9) == pytest.approx(2.8717e-4, rel=1e-4)


def test_cosine_schedule_with_warm_up_by_hand():
    """mmcv's CosineAnnealing (min_lr_ratio 1e-8) with a linear warm-up (ratio 1e-3) that scales
    the cosine curve, which itself runs from step 0: PH-Reg's / DINOv2's depth schedule."""
    base, end = 1e-2, 1e-10
    assert cosine_lr(base, 0, 100, 40) == pytest.approx(1e-5)  # warm-up starts at 1e-3 of the lr
    # step 20: cosine 0.5 (1 + cos 0.2 pi) = 0.904508, warm-up factor 1 - 0.5 * 0.999 = 0.5005
    assert cosine_lr(base, 20, 100, 40) == pytest.approx(0.904508 * 0.5005 * base, rel=1e-5)
    assert cosine_lr(base, 40, 100, 40) == pytest.approx(0.654508 * base, rel=1e-5)  # warm-up over
    assert cosine_lr(base, 50, 100, 40) == pytest.approx(0.5 * base, rel=1e-6)
    assert cosine_lr(base, 100, 100, 40) == pytest.approx(end)
    assert cosine_lr(base, 0, 100, 0) == pytest.approx(base)  # no warm-up


def test_each_kind_has_the_reference_schedule():
    s = dataclasses.replace(SETTINGS, iterations=30)  # defaults: depth lr 5e-3, wd 1e-2, warm-up 12800/30000 of the run
    seg, depth = schedule_of("seg", s), schedule_of("depth", s)
    assert (seg.lr, seg.weight_decay, seg.kind) == (3e-2, 1e-4, "poly")
    assert (depth.lr, depth.weight_decay, depth.kind) == (5e-3, 1e-2, "cosine")
    assert lr_at(15, 30, seg) == pytest.approx(3e-2 * 0.5 ** 0.9)
    assert lr_at(15, 30, depth) == pytest.approx(cosine_lr(5e-3, 15, 30, 13))  # 12800 / 30000 of 30 steps: 13
    assert lr_at(13, 30, depth) == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * 13 / 30)), rel=1e-6)


def test_bins_decode_by_relu_plus_a_tenth_normalised_over_the_bins():
    """DINOv2's 'linear' bin normalisation (no softmax): weights relu(logit) + 0.1, divided by their sum."""
    centres = torch.tensor([1.0, 2.0, 3.0, 4.0])
    logits = torch.tensor([-5.0, 0.9, 0.0, 2.9])[None, :, None, None]
    # weights (0.1, 1.0, 0.1, 3.0) / 4.2 -> (0.1 + 2 + 0.3 + 12) / 4.2
    assert decode_bins(logits, centres).item() == pytest.approx(14.4 / 4.2)
    assert decode_bins(torch.full((1, 4, 1, 1), -3.0), centres).item() == pytest.approx(2.5)  # all negative: uniform


def test_one_hot_bin_logits_decode_to_their_centre_in_metres():
    centres = bin_centres(0.001, 10.0, 256)
    assert centres[0] == pytest.approx(0.001) and centres[-1] == pytest.approx(10.0)
    k = torch.tensor([[0, 37], [128, 255]])  # a bin per pixel of a 2x2 map
    # (changed with the relu + 0.1 normalisation: a one-hot logit of 100 no longer decodes to its centre exactly,
    # the other 255 bins keep 0.1 each; 1e6 leaves them a weight of 2.55e-5 in all)
    logits = 1e6 * F.one_hot(k, 256).permute(2, 0, 1)[None].float()  # (1, 256, 2, 2)
    depth = decode_bins(logits, centres)[0]
    step = (10.0 - 0.001) / 255
    expected = [[0.001, 0.001 + 37 * step], [0.001 + 128 * step, 10.0]]  # 37 -> 1.4518 m, 128 -> 5.0201 m
    assert depth.tolist() == [[pytest.approx(v, abs=1e-3) for v in row] for row in expected]
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


DEPTHS = torch.tensor([1.0, 3.0, 5.0, 8.0])  # metres of each class of `separable_image`


def separable_depth(rng: np.random.Generator, size=(64, 80)):
    """`separable_image`'s pixels with a depth per class (0, no ground truth, on the ignored row)."""
    pixels, labels = separable_image(rng, size)
    return pixels, torch.where(labels == 255, 0.0, DEPTHS[labels.clamp(max=3)])


def test_each_head_trains_under_its_kinds_optimiser(monkeypatch):
    """The lr and weight decay AdamW steps with: segmentation poly 0.9 at probes.lr and 1e-4,
    depth cosine with warm-up at 5e-3 and 1e-2 (PH-Reg's ADE20K and NYUv2 configs)."""
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    rng = np.random.default_rng(0)
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    s = dataclasses.replace(SETTINGS, iterations=10, batch_size=2)
    train_segmentation(pooled_colour, 3, [separable_image(rng)], 4, 255, (32, 32), mean, std, s)
    assert [lr for lr, _ in seen] == pytest.approx([3e-2 * (1 - i / 10) ** 0.9 for i in range(10)])
    assert {wd for _, wd in seen} == {1e-4}
    seen.clear()
    train_depth(pooled_colour, 3, [separable_depth(rng)], (32, 32), mean, std, s)
    warm = round(12800 / 30000 * 10)
    assert [lr for lr, _ in seen] == pytest.approx([cosine_lr(5e-3, i, 10, warm) for i in range(10)])
    assert seen[0][0] == pytest.approx(5e-6) and max(lr for lr, _ in seen) == pytest.approx(seen[warm][0])
    assert {wd for _, wd in seen} == {1e-2}


def test_depth_head_is_a_plain_conv_and_learns_a_separable_case():
    """No BatchNorm in the depth head (DINOv2's BNHead keeps its BN commented out); trained on
    depth that is a function of the colour, it beats the best constant by far."""
    rng = np.random.default_rng(0)
    train = [separable_depth(rng) for _ in range(12)]
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    s = dataclasses.replace(SETTINGS, iterations=60, batch_size=4, depth_lr=0.1)  # a lr for a short CPU run
    head = train_depth(pooled_colour, 3, train, (32, 32), mean, std, s)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules())
    assert [type(m) for m in head.children()] == [torch.nn.Identity, torch.nn.Conv2d]
    probe, constant = DepthSums(), DepthSums()
    for pixels, depth in (separable_depth(rng, (72, 100)) for _ in range(4)):
        pred = estimate_depth(head, pooled_colour, (pixels - mean) / std, (32, 32), (16, 16), s)
        assert pred.shape == depth.shape
        probe.add(pred, depth)
        constant.add(torch.full_like(depth, 1.6), depth)  # about the median depth: mostly background at 1 m
    assert probe.scores()["rmse"] < 0.5 * constant.scores()["rmse"]


def test_eval_size_by_hand():
    """mmseg's Resize(scale=(4 s, s), keep_ratio=True): short side s unless the long side would pass 4 s."""
    assert eval_size(480, 640, 518) == (518, 691)  # 640 * 518 / 480 = 690.67
    assert eval_size(640, 480, 518) == (691, 518)
    assert eval_size(100, 1000, 50) == (20, 200)  # capped by the long side: 200 / 1000
    assert eval_size(518, 700, 518) == (518, 700)
    assert eval_size(20, 30, 40) == (40, 60)  # small images are enlarged


def nearest_colour_head() -> LinearHead:
    """A segmentation head that picks the class of the nearest colour: logits 2 x.c - |c|^2."""
    head = LinearHead(3, 4).eval()  # BatchNorm at its initial statistics: the identity up to eps
    with torch.no_grad():
        head.conv.weight.copy_(2 * COLOURS[:, :, None, None])
        head.conv.bias.copy_(-(COLOURS ** 2).sum(1))
    return head


def test_segment_resizes_to_the_short_side_and_back():
    """Evaluation at short side `short_side` ('window': the window's; None: the image's own), the
    logits resized back to the image's pixels, as mmseg's test pipeline and slide inference."""
    sizes = []

    def features(x):
        sizes.append(tuple(x.shape))
        return pooled_colour(x)

    labels = torch.ones(64, 96, dtype=torch.long)
    labels[:, 48:] = 2
    image = COLOURS[labels].permute(2, 0, 1).contiguous()
    head = nearest_colour_head()
    for short_side, resized in (("window", (32, 48)), (None, (64, 96)), (128, (128, 192))):
        sizes.clear()
        pred = segment(head, features, image, (32, 32), (16, 16), short_side=short_side)
        assert pred.shape == labels.shape and (pred == labels).float().mean() > 0.9
        assert (pred[:, :40] == 1).all() and (pred[:, 56:] == 2).all()  # the halves come back where they were
        windows = len(window_starts(resized[0], 32, 16)) * len(window_starts(resized[1], 32, 16))
        assert sum(n for n, *_ in sizes) == windows and {s[1:] for s in sizes} == {(3, 32, 32)}
    assert windows == 7 * 11 and len(window_starts(48, 32, 16)) == 2  # "window": 32x48, two windows


def test_probe_config_defaults_and_settings():
    e = EvaluateConfig()
    assert (e.probes.lr, e.probes.depth_lr, e.probes.depth_weight_decay) == (1e-3, 5e-3, 1e-2)
    assert e.probes.depth_warmup == pytest.approx(12800 / 30000) and e.probes.short_side == "window"
    s = TrainedProbeSettings.from_config(EvaluateConfig(probes={"short_side": 518, "depth_lr": 1e-2, "depth_warmup": 0.0}))
    assert (s.short_side, s.depth_lr, s.depth_warmup, s.lr, s.bins, s.seed) == (518, 1e-2, 0.0, 1e-3, 256, 0)
    assert TrainedProbeSettings.from_config(EvaluateConfig(probes={"short_side": None})).short_side is None
    for bad in ({"short_side": 0}, {"short_side": "image"}, {"depth_warmup": 1.0},
                {"depth_lr": 0}, {"depth_weight_decay": -1}):
        with pytest.raises((ValueError, ConfigError)):
            EvaluateConfig(probes=bad)
    with pytest.raises((ValueError, ConfigError), match="min_depth must be below"):
        EvaluateConfig(probes={"min_depth": 10.0, "max_depth": 1.0})


def test_flat_probe_and_ttr_keys_of_older_configs_still_load_with_a_warning():
    with pytest.warns(FutureWarning, match=r"evaluate\.probe_short_side is now evaluate\.probes\.short_side"):
        e = EvaluateConfig(probe_short_side=518, probes={"lr": 0.1})
    assert (e.probes.short_side, e.probes.lr) == (518, 0.1)
    with pytest.warns(FutureWarning, match=r"evaluate\.ttr_top_k is now evaluate\.ttr\.top_k"):
        assert EvaluateConfig(ttr_top_k=3).ttr.top_k == 3
    with pytest.raises((ValueError, ConfigError)), pytest.warns(FutureWarning):
        EvaluateConfig(probe_no_such_option=1)  # still refused, under its new name


@pytest.mark.slow
def test_evaluate_with_trained_probes(tiny_copy):
    """One model alone (on two images of the sharded tiny corpus), probes trained on the
    generated labeled set: both kinds scored, the report names the protocol, the pictures are
    drawn."""
    cfg = tiny_config(tiny_copy, **{
        "evaluate.model": "vit_tiny_patch16_224", "evaluate.num_images": 2, "evaluate.pca_images": 1,
        "evaluate.residual_block": None, "evaluate.labeled": "sample:labeled", "evaluate.probes.protocol": "trained",
        "evaluate.probes.iterations": 4, "evaluate.probes.batch_size": 2})
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
