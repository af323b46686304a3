"""Linear-probe math on hand-worked cases, and the labeled-set layout (generated set included)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.evaluation.labeled import SEG_CLASSES, load_item, open_labeled, write_labeled_sample
from pipeline.evaluation.probes import (
    DepthSums,
    RidgeSums,
    confusion,
    iou_per_class,
    mean_iou,
    patch_class_fractions,
    patch_mean_depth,
    predict_pixels,
)


def test_patch_class_fractions_leave_out_ignored_pixels():
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 1, 1, 255],
                         [2, 2, 255, 255],
                         [2, 2, 255, 255]])
    fractions, keep = patch_class_fractions(mask, (2, 2), num_classes=3, ignore_index=255)
    assert fractions.shape == (2, 2, 3)
    assert torch.allclose(fractions[0, 0], torch.tensor([0.75, 0.25, 0.0]))
    assert torch.allclose(fractions[0, 1], torch.tensor([0.0, 1.0, 0.0]))  # 3 scored pixels, all class 1
    assert torch.allclose(fractions[1, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert keep.tolist() == [[True, True], [True, False]]  # the last patch has no scored pixel


def test_patch_mean_depth_uses_valid_pixels_only():
    depth = torch.tensor([[1.0, 3.0, 0.0, float("nan")],
                          [0.0, -1.0, float("inf"), 0.0],
                          [2.0, 2.0, 4.0, 4.0],
                          [2.0, 2.0, 4.0, 8.0]])
    mean, keep = patch_mean_depth(depth, (2, 2))
    assert keep.tolist() == [[True, False], [True, True]]
    assert mean[0, 0] == pytest.approx(2.0) and mean[1, 0] == pytest.approx(2.0) and mean[1, 1] == pytest.approx(5.0)


def test_patch_targets_drop_pixels_the_grid_does_not_cover():
    mask = torch.zeros(5, 7, dtype=torch.long)
    fractions, keep = patch_class_fractions(mask, (2, 2), 2, 255)
    assert fractions.shape == (2, 3, 2) and keep.all()


def test_confusion_and_miou_by_hand():
    gt = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 1], [1, 1]])
    conf = confusion(pred, gt, num_classes=3, ignore_index=255)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    iou = iou_per_class(conf)
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == pytest.approx(2 / 3) and np.isnan(iou[2])  # class 2 never seen
    assert mean_iou(conf) == pytest.approx(7 / 12)
    ignored = confusion(pred, torch.tensor([[0, 255], [1, 1]]), 3, 255)
    assert ignored.sum() == 3 and ignored[0, 1] == 0


def test_depth_scores_by_hand():
    sums = DepthSums()
    sums.add(torch.tensor([1.0, 2.6, 2.0, 5.0]), torch.tensor([1.0, 2.0, 4.0, 0.0]))  # the last pixel has no ground truth
    s = sums.scores()
    assert s["pixels"] == 3
    assert s["rmse"] == pytest.approx(((0 + 0.36 + 4) / 3) ** 0.5)
    assert s["abs_rel"] == pytest.approx((0 + 0.3 + 0.5) / 3)
    assert s["delta_1.25"] == pytest.approx(1 / 3)  # ratios 1, 1.3, 2
    merged = sums.merge(sums).scores()
    assert merged["rmse"] == pytest.approx(s["rmse"]) and merged["pixels"] == 6


def test_ridge_recovers_a_linear_map_and_sums_merge():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen)
    y = torch.stack([2 * x[:, 0] - x[:, 1] + 3, x[:, 2] - 0.5], dim=1)
    whole = RidgeSums.empty(3, 2)
    whole.add(x, y)
    w = whole.solve(ridge=0.0)
    assert np.allclose(w, [[2, 0], [-1, 0], [0, 1], [3, -0.5]], atol=1e-6)
    a, b = RidgeSums.empty(3, 2), RidgeSums.empty(3, 2)
    a.add(x[:120], y[:120])
    b.add(x[120:], y[120:])
    merged = a.merge(b)
    assert merged.rows == 200 and np.allclose(merged.xtx, whole.xtx) and np.allclose(merged.solve(0.0), w)
    shrunk = whole.solve(ridge=10.0)  # the penalty shrinks the weights, never the bias
    assert np.abs(shrunk[:3]).sum() < np.abs(w[:3]).sum()


def test_predictions_are_upsampled_bilinearly():
    feats = torch.tensor([[[[0.0], [1.0]], [[2.0], [3.0]]]])  # (1, 2, 2, 1): the feature is the value
    weights = np.array([[1.0], [0.0]])  # identity, no bias
    pixels = predict_pixels(feats, weights, (4, 4))
    assert pixels.shape == (1, 1, 4, 4)
    assert pixels[0, 0, 0, 0] == pytest.approx(0.0) and pixels[0, 0, 3, 3] == pytest.approx(3.0)
    assert pixels[0, 0, 1, 1] == pytest.approx(0.75)  # a quarter of the way between the four centres


def test_generated_labeled_set(tmp_path):
    root = write_labeled_sample(str(tmp_path / "labeled"))
    labeled = open_labeled(root)
    assert labeled.classes == SEG_CLASSES and labeled.ignore_index == 255
    assert len(labeled.with_masks("train")) == 32 and len(labeled.with_depth("val")) == 12
    img, mask, depth = load_item(labeled.with_masks("val")[0], labeled)
    assert mask.shape == (img.height, img.width) and depth is None
    assert set(np.unique(mask)) <= set(range(len(SEG_CLASSES))) | {255} and (mask == 255).any()  # the ignore band
    img, mask, depth = load_item(labeled.with_depth("train")[0], labeled)
    valid = depth[depth > 0]
    assert mask is None and depth.shape == (img.height, img.width) and 1.5 < valid.min() < valid.max() < 6.0  # metres
    assert write_labeled_sample(root) == root  # already there: nothing rewritten


def _folder(tmp_path, mask_size=(8, 6), classes='["a", "b"]', splits=("train", "val")):
    root = tmp_path / "set"
    for split in splits:
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        Image.new("RGB", (8, 6)).save(root / split / "images" / "x.png")
        Image.fromarray(np.ones(mask_size[::-1], dtype=np.uint8)).save(root / split / "masks" / "x.png")
    if classes is not None:
        (root / "classes.json").write_text(classes)
    return str(root)


def test_layout_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(PipelineError, match="no images in train/images"):
        open_labeled(str(tmp_path / "nothing"))
    with pytest.raises(PipelineError, match="no classes.json"):
        open_labeled(_folder(tmp_path / "1", classes=None))
    labeled = open_labeled(_folder(tmp_path / "2", mask_size=(4, 4)))
    with pytest.raises(PipelineError, match="is \\(4, 4\\) but its image is \\(8, 6\\)"):
        load_item(labeled.splits["train"][0], labeled)
    labeled = open_labeled(_folder(tmp_path / "3", classes='["only"]'))
    with pytest.raises(PipelineError, match="outside the 1 classes"):
        load_item(labeled.splits["train"][0], labeled)
    val_only = _folder(tmp_path / "4", splits=("val",))  # a zero-shot benchmark: nothing to fit a probe on
    with pytest.raises(PipelineError, match="no images in train/images"):
        open_labeled(val_only)
    assert list(open_labeled(val_only, splits=("val",)).splits) == ["val"]


def test_reduce_zero_label(tmp_path):
    root = _folder(tmp_path, classes=json.dumps({"classes": ["a"], "reduce_zero_label": True}))
    labeled = open_labeled(root)
    _, mask, _ = load_item(labeled.splits["val"][0], labeled)
    assert (mask == 0).all()  # label 1 -> class 0; label 0 would be ignored
