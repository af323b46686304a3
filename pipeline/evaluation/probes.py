"""Linear probes on frozen patch features: segmentation (mIoU) and depth (RMSE, delta < 1.25).

The protocol, identical for every model it compares:
- the labeled image is centre-cropped to the model's aspect and resized to its input, exactly
  as the pipeline preprocesses images; the mask (or depth map) is cropped and resized to the
  same pixels with nearest-neighbour, so scoring happens at the model's input resolution;
- patch-level targets: each patch's class fractions (ignored pixels left out), or its mean
  valid depth in metres; patches without a valid pixel are left out of the fit;
- closed-form ridge regression (bias not regularised) from the final-layer patch features
  to those targets, fitted on the train split from sums (X'X, X'Y) accumulated batch by
  batch, so no task ever holds the whole split;
- on the val split the patch predictions are upsampled bilinearly to pixels; segmentation
  takes the argmax and reports mIoU over the classes present in the ground truth or the
  prediction, depth reports RMSE (metres), AbsRel and delta < 1.25 over valid pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# --- patch-level targets -------------------------------------------------------------------

def patch_class_fractions(mask: torch.Tensor, patch: tuple[int, int], num_classes: int, ignore_index: int):
    """(H, W) integer labels -> ((gh, gw, C) class fractions of each patch's scored pixels,
    (gh, gw) bool: the patch has at least one scored pixel)."""
    ph, pw = patch
    mask = on_grid(mask, patch)
    scored = mask != ignore_index
    onehot = F.one_hot(torch.where(scored, mask, 0).long(), num_classes).float() * scored.unsqueeze(-1)
    H, W = mask.shape
    counts = onehot.reshape(H // ph, ph, W // pw, pw, num_classes).sum((1, 3))
    total = counts.sum(-1)
    return counts / total.clamp(min=1).unsqueeze(-1), total > 0


def patch_mean_depth(depth: torch.Tensor, patch: tuple[int, int]):
    """(H, W) depth in metres (invalid: <= 0 or not finite) -> ((gh, gw) mean valid depth,
    (gh, gw) bool: the patch has at least one valid pixel)."""
    ph, pw = patch
    depth = on_grid(depth, patch)
    valid = valid_depth(depth)
    d = torch.where(valid, depth, 0.0).double()
    H, W = depth.shape
    total = d.reshape(H // ph, ph, W // pw, pw).sum((1, 3))
    count = valid.reshape(H // ph, ph, W // pw, pw).sum((1, 3))
    return (total / count.clamp(min=1)).float(), count > 0


def on_grid(pixels: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """The pixels the patch grid covers (a ViT's patch embedding drops a remainder)."""
    return pixels[: pixels.shape[0] // patch[0] * patch[0], : pixels.shape[1] // patch[1] * patch[1]]


def valid_depth(depth: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(depth) & (depth > 0)


# --- ridge regression from sufficient statistics -------------------------------------------

@dataclass
class RidgeSums:
    """X'X and X'Y of features with a bias column appended, in float64."""

    xtx: np.ndarray
    xty: np.ndarray
    rows: int = 0

    @classmethod
    def empty(cls, dim: int, outputs: int) -> "RidgeSums":
        return cls(np.zeros((dim + 1, dim + 1)), np.zeros((dim + 1, outputs)))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (n, D) features, y (n, K) targets."""
        xb = with_bias(x).double().numpy()
        self.xtx += xb.T @ xb
        self.xty += xb.T @ y.double().reshape(len(xb), -1).numpy()
        self.rows += len(xb)

    def merge(self, other: "RidgeSums") -> "RidgeSums":
        return RidgeSums(self.xtx + other.xtx, self.xty + other.xty, self.rows + other.rows)

    def solve(self, ridge: float) -> np.ndarray:
        """(D + 1, K) weights minimising |XW - Y|^2 + lam |W without bias|^2, with lam =
        `ridge` times the mean diagonal of X'X (so it does not depend on the feature scale)."""
        d = self.xtx.shape[0] - 1
        lam = ridge * float(np.mean(np.diag(self.xtx)[:d]))
        reg = np.diag(np.r_[np.full(d, lam), 0.0])
        return np.linalg.lstsq(self.xtx + reg, self.xty, rcond=None)[0]


def with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def predict_pixels(features: torch.Tensor, weights: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(N, gh, gw, D) features -> (N, K, H, W) linear predictions upsampled bilinearly."""
    n, gh, gw, d = features.shape
    w = torch.tensor(weights, dtype=torch.float32)  # a copy: arrays from the object store are read-only
    patch_pred = with_bias(features.reshape(-1, d).float()) @ w
    grid = patch_pred.reshape(n, gh, gw, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


# --- scores --------------------------------------------------------------------------------

def confusion(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    """(C, C) counts, rows = ground truth, columns = prediction, ignored pixels left out."""
    keep = gt != ignore_index
    idx = gt[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for a class absent from both ground truth and prediction."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    return float(np.nanmean(iou_per_class(conf)))


@dataclass
class DepthSums:
    """Sums over valid pixels for RMSE, AbsRel and delta < 1.25."""

    squared_error: float = 0.0
    abs_rel: float = 0.0
    within_125: int = 0
    pixels: int = 0

    def add(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        valid = valid_depth(gt)
        p = pred[valid].double().clamp(min=1e-3)  # a linear probe can predict <= 0 m
        g = gt[valid].double()
        self.squared_error += float(((p - g) ** 2).sum())
        self.abs_rel += float(((p - g).abs() / g).sum())
        self.within_125 += int((torch.maximum(p / g, g / p) < 1.25).sum())
        self.pixels += int(valid.sum())

    def merge(self, other: "DepthSums") -> "DepthSums":
        return DepthSums(self.squared_error + other.squared_error, self.abs_rel + other.abs_rel,
                         self.within_125 + other.within_125, self.pixels + other.pixels)

    def scores(self) -> dict:
        n = max(self.pixels, 1)
        return {"rmse": (self.squared_error / n) ** 0.5, "abs_rel": self.abs_rel / n,
                "delta_1.25": self.within_125 / n, "pixels": self.pixels}


@dataclass
class ProbeSums:
    """What one task returns for one model: train sums, or val scores and a few examples."""

    seg_fit: RidgeSums | None = None
    depth_fit: RidgeSums | None = None
    seg_conf: np.ndarray | None = None
    depth: DepthSums | None = None
    examples: dict = field(default_factory=dict)  # item id -> {"seg": (H, W) labels, "depth": (H, W) metres}

    def add_fit(self, features: torch.Tensor, mask: torch.Tensor | None, depth: torch.Tensor | None,
                patch: tuple[int, int], num_classes: int, ignore_index: int) -> None:
        """Accumulate the fit sums of one train image: features (gh, gw, D), its labels and/or
        depth (H, W) at the model's input pixels (None when it has none)."""
        dim = features.shape[-1]
        if mask is not None:
            y, keep = patch_class_fractions(mask, patch, num_classes, ignore_index)
            self.seg_fit = self.seg_fit or RidgeSums.empty(dim, num_classes)
            self.seg_fit.add(features[keep], y[keep])
        if depth is not None:
            y, keep = patch_mean_depth(depth, patch)
            self.depth_fit = self.depth_fit or RidgeSums.empty(dim, 1)
            self.depth_fit.add(features[keep], y[keep].unsqueeze(-1))

    def add_scores(self, features: torch.Tensor, mask: torch.Tensor | None, depth: torch.Tensor | None, weights: dict,
                   num_classes: int, ignore_index: int, example: str | None = None) -> None:
        """Score one val image with the fitted `weights` ({"seg": W, "depth": W}); keep its
        predictions under `example` when given (for the pictures)."""
        size = (mask if mask is not None else depth).shape
        if mask is not None and "seg" in weights:
            pred = predict_pixels(features[None], weights["seg"], size)[0].argmax(0)
            conf = confusion(pred, mask, num_classes, ignore_index)
            self.seg_conf = conf if self.seg_conf is None else self.seg_conf + conf
            if example:
                self.examples.setdefault(example, {})["seg"] = pred.numpy().astype(np.int16)
        if depth is not None and "depth" in weights:
            pred = predict_pixels(features[None], weights["depth"], size)[0, 0]
            self.depth = self.depth or DepthSums()
            self.depth.add(pred, depth)
            if example:
                self.examples.setdefault(example, {})["depth"] = pred.numpy()

    def merge(self, other: "ProbeSums") -> "ProbeSums":
        def add(a, b):
            if a is None or b is None:
                return a if b is None else b
            return a + b if isinstance(a, np.ndarray) else a.merge(b)

        examples = {i: {**self.examples.get(i, {}), **other.examples.get(i, {})} for i in self.examples | other.examples}
        return ProbeSums(add(self.seg_fit, other.seg_fit), add(self.depth_fit, other.depth_fit),
                         add(self.seg_conf, other.seg_conf), add(self.depth, other.depth), examples)
