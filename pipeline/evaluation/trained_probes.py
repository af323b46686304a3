"""Trained linear probes: the protocols the paper's tables use (DINOv2's linear heads, as
PH-Reg evaluates them), beside the closed-form ridge probes of `probes`.

- segmentation (mmseg's BNHead, PH-Reg's ADE20K config): BatchNorm + 1x1 convolution on
  frozen final-layer patch features, trained with cross-entropy (ignored pixels left out) by
  AdamW (weight decay 1e-4) under a poly schedule of power 0.9, on augmented crops of the train
  images (random resize 0.5-2x, crop to the model's input, horizontal flip, photometric
  distortion); inference resizes each val image to a short side (mmseg's `Resize(scale=(2048,
  518), keep_ratio=True)`: the window's short side by default), slides windows of the model's
  input over it, averages the logits, upsampled bilinearly, where windows overlap, and resizes
  them back to the image's own pixels before the argmax;
- depth (DINOv2's linear head, PH-Reg's NYUv2 config): patch features concatenated with the
  class token, a 1x1 convolution (no BatchNorm) to `bins` logits, weights relu(logit) + 0.1
  normalised over the bins, depth = their weighted sum of linear bin centres between min and
  max depth; SigLog + gradient loss on augmented crops (no resize: it would change metric
  depth) by AdamW (lr 5e-3, weight decay 1e-2) under a cosine schedule with a linear warm-up;
  sliding windows at the image's own resolution; optionally scored inside the Eigen crop.

The math is in small functions; `train_head`, `segment` and `estimate_depth` run it on any
feature function (B, 3, h, w) -> ((B, D, gh, gw) patch features, (B, D) class token).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Features = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SEG_WEIGHT_DECAY = 1e-4  # mmseg's linear-probe configs (PH-Reg's ADE20K config)
POLY_POWER = 0.9  # mmseg's PolyLR in PH-Reg's segmentation configs, to 0
WARMUP_RATIO = 1e-3  # mmcv's linear warm-up starts at this fraction of the lr (PH-Reg's / DINOv2's depth config)
MIN_LR_RATIO = 1e-8  # ... and its cosine annealing ends at this fraction
BIN_EPS = 0.1  # DINOv2's 'linear' bin normalisation: relu(logit) + 0.1, divided by the sum over the bins
LONG_SIDE_CAP = 4  # mmseg's Resize(scale=(2048, 512), keep_ratio=True): the long side stays within 4x the short side
WINDOWS_PER_FORWARD = 8
DEPTH_UPSAMPLE = 4  # DINOv2's linear depth head decodes its bins on a 4x finer grid than the patches
GRADIENT_SCALES = 4  # the gradient loss compares log-depth gradients at 1, 1/2, 1/4 and 1/8 resolution
EIGEN_NYU = (480, 640, 45, 471, 41, 601)  # height, width, rows top:bottom, columns left:right


@dataclass(frozen=True)
class TrainedProbeSettings:
    iterations: int
    batch_size: int
    lr: float
    stride: float  # sliding-window stride as a fraction of the window
    bins: int
    min_depth: float
    max_depth: float
    siglog_lambda: float
    gradient_weight: float
    eigen_crop: bool
    seed: int
    # after `seed`, with the reference values as defaults, so that older positional callers keep working
    depth_lr: float = 5e-3
    depth_weight_decay: float = 1e-2
    depth_warmup: float = 12800 / 30000  # fraction of the steps; PH-Reg: 12,800 of 30,000 iterations
    short_side: int | Literal["window"] | None = "window"  # segmentation evaluation; None: each image's own

    @classmethod
    def from_config(cls, e, seed: int = 0) -> "TrainedProbeSettings":
        """The settings of an `EvaluateConfig` (its probes section)."""
        return cls(e.probes.iterations, e.probes.batch_size, e.probes.lr, e.probes.stride, e.probes.depth_bins, e.probes.min_depth,
                   e.probes.max_depth, e.probes.siglog_lambda, e.probes.gradient_weight, e.probes.eigen_crop, seed,
                   e.probes.depth_lr, e.probes.depth_weight_decay, e.probes.depth_warmup, e.probes.short_side)


@dataclass(frozen=True)
class Schedule:
    """AdamW's learning rate, weight decay and lr schedule for one probe kind."""

    lr: float
    weight_decay: float
    kind: Literal["poly", "cosine"]
    warmup: float = 0.0  # cosine only: the warm-up's fraction of the steps


# --- schedule, depth decoding, losses ------------------------------------------------------

def poly_lr(base: float, step: int, total: int, power: float = 1.0) -> float:
    """mmseg's poly schedule: base * (1 - step / total) ** power, 0 at the end."""
    return base * (1.0 - min(step, total) / total) ** power


def cosine_lr(base: float, step: int, total: int, warmup_steps: int, warmup_ratio: float = WARMUP_RATIO,
              min_ratio: float = MIN_LR_RATIO) -> float:
    """mmcv's CosineAnnealing with a linear warm-up: the cosine falls from `base` at step 0 to
    `min_ratio * base` at `total`; over the first `warmup_steps` it is scaled by a factor that
    rises linearly from `warmup_ratio` to 1 (the cosine does not wait for the warm-up)."""
    end = base * min_ratio
    lr = end + 0.5 * (base - end) * (1 + math.cos(math.pi * min(step, total) / total))
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


def lr_at(step: int, total: int, schedule: Schedule) -> float:
    """The learning rate of step `step` of `total` under `schedule`."""
    if schedule.kind == "poly":
        return poly_lr(schedule.lr, step, total, POLY_POWER)
    return cosine_lr(schedule.lr, step, total, round(schedule.warmup * total))


def schedule_of(kind: str, s: TrainedProbeSettings) -> Schedule:
    """The reference optimiser of each probe kind: segmentation poly (mmseg), depth cosine with warm-up (DINOv2)."""
    if kind == "seg":
        return Schedule(s.lr, SEG_WEIGHT_DECAY, "poly")
    return Schedule(s.depth_lr, s.depth_weight_decay, "cosine", s.depth_warmup)


def bin_centres(min_depth: float, max_depth: float, bins: int) -> torch.Tensor:
    """Linear bins, the first centred on min_depth and the last on max_depth (DINOv2's 'linear')."""
    return torch.linspace(min_depth, max_depth, bins)


def decode_bins(logits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) bin logits -> (B, H, W) depth, DINOv2's 'linear' normalisation (after
    AdaBins): weights relu(logit) + 0.1 divided by their sum over the bins, depth = the
    weighted sum of the centres."""
    weights = logits.relu() + BIN_EPS
    return torch.einsum("bkhw,k->bhw", weights / weights.sum(1, keepdim=True), centres.to(logits))


def in_range(depth: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Pixels with usable ground truth: finite and strictly inside (min_depth, max_depth)."""
    return torch.isfinite(depth) & (depth > min_depth) & (depth < max_depth)


def siglog_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, lam: float) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014, as DINOv2 and BinsFormer train with it):
    sqrt(mean(g^2) - lam * mean(g)^2), g = log pred - log gt over the valid pixels. With
    lam < 1 a global scale error still costs sqrt(1 - lam) * |log scale|."""
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid]) - torch.log(gt[valid])
    return ((g ** 2).mean() - lam * g.mean() ** 2).clamp(min=1e-12).sqrt()  # the clamp keeps sqrt's gradient finite at 0


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Multi-scale gradient matching (MegaDepth; DINOv2's GradientLoss): the absolute
    horizontal and vertical differences of the log-depth error between valid neighbours,
    summed and divided by the valid pixels, at GRADIENT_SCALES resolutions."""
    error = torch.where(valid, torch.log(pred.clamp(min=1e-6)) - torch.log(gt.clamp(min=1e-6)), 0.0)
    total = pred.sum() * 0.0
    for s in range(GRADIENT_SCALES):
        e, m = error[..., :: 2 ** s, :: 2 ** s], valid[..., :: 2 ** s, :: 2 ** s].float()
        dy = (e[..., 1:, :] - e[..., :-1, :]).abs() * m[..., 1:, :] * m[..., :-1, :]
        dx = (e[..., :, 1:] - e[..., :, :-1]).abs() * m[..., :, 1:] * m[..., :, :-1]
        total = total + (dy.sum() + dx.sum()) / m.sum().clamp(min=1)
    return total


def eigen_crop(height: int, width: int) -> torch.Tensor:
    """(H, W) bool: Eigen et al.'s NYUv2 evaluation crop (rows 45:471, columns 41:601 of
    480x640), scaled to other image sizes."""
    h0, w0, top, bottom, left, right = EIGEN_NYU
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[round(top * height / h0):round(bottom * height / h0), round(left * width / w0):round(right * width / w0)] = True
    return mask


# --- sliding-window inference ----------------------------------------------------------------

def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side, every `stride` pixels, the last one flush with the end
    (mmseg's slide inference); one window when the side is not longer than the window."""
    if length <= window:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


def slide(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, window: tuple[int, int],
          stride: tuple[int, int]) -> torch.Tensor:
    """(K, H, W): `predict` ((B, C, h, w) windows -> (B, K, h, w) maps) over windows of
    `image` (C, H, W), averaged where they overlap. An image smaller than the window is padded
    with zeros (the mean colour after normalisation) and the padding cropped off again."""
    _, H, W = image.shape
    h, w = window
    padded = F.pad(image, (0, max(w - W, 0), 0, max(h - H, 0)))
    boxes = [(y, x) for y in window_starts(H, h, stride[0]) for x in window_starts(W, w, stride[1])]
    total, count = None, torch.zeros(padded.shape[-2:])
    for i in range(0, len(boxes), WINDOWS_PER_FORWARD):
        group = boxes[i:i + WINDOWS_PER_FORWARD]
        out = predict(torch.stack([padded[:, y:y + h, x:x + w] for y, x in group])).float().cpu()
        total = torch.zeros(out.shape[1], *padded.shape[-2:]) if total is None else total
        for (y, x), o in zip(group, out):
            total[:, y:y + h, x:x + w] += o
            count[y:y + h, x:x + w] += 1
    return (total / count)[:, :H, :W]


def stride_of(window: tuple[int, int], fraction: float) -> tuple[int, int]:
    return tuple(max(1, round(side * fraction)) for side in window)


def eval_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The size mmseg's Resize(scale=(LONG_SIDE_CAP * short_side, short_side), keep_ratio=True)
    gives an image: the short side becomes `short_side` (up or down) unless the long side would
    then exceed LONG_SIDE_CAP times that; sides rounded half up, as mmcv's rescale_size."""
    scale = min(short_side / min(height, width), LONG_SIDE_CAP * short_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


# --- augmentation ----------------------------------------------------------------------------

def photometric(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness (+-32/255), contrast and saturation (x0.5-1.5) jitter of (3, h, w) pixels in
    [0, 1], each with probability 1/2, as mmseg's PhotoMetricDistortion (without its hue)."""
    if rng.random() < 0.5:
        pixels = pixels + rng.uniform(-32, 32) / 255
    if rng.random() < 0.5:
        pixels = pixels.mean() + (pixels - pixels.mean()) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        grey = (0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]).unsqueeze(0)
        pixels = grey + (pixels - grey) * rng.uniform(0.5, 1.5)
    return pixels.clamp(0, 1)


def random_rescale(pixels: torch.Tensor, target: torch.Tensor, window: tuple[int, int], rng: np.random.Generator,
                   low: float = 0.5, high: float = 2.0):
    """Resize (3, H, W) pixels bilinearly and the (H, W) labels with nearest neighbour by a
    random factor in [low, high] of the scale at which the image just covers the window."""
    _, H, W = pixels.shape
    scale = max(window[0] / H, window[1] / W) * rng.uniform(low, high)
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    pixels = F.interpolate(pixels[None], size, mode="bilinear", align_corners=False, antialias=True)[0]
    target = F.interpolate(target[None, None].float(), size, mode="nearest")[0, 0].to(target.dtype)
    return pixels, target


def random_crop(image: torch.Tensor, target: torch.Tensor, window: tuple[int, int], rng: np.random.Generator,
                fill: float):
    """A random window of (3, H, W) and (H, W), padded first where the image is smaller
    (the image with 0, the target with `fill`: ignored labels, or no depth)."""
    h, w = window
    pad = (0, max(w - image.shape[-1], 0), 0, max(h - image.shape[-2], 0))
    image, target = F.pad(image, pad), F.pad(target, pad, value=fill)
    y, x = int(rng.integers(0, image.shape[-2] - h + 1)), int(rng.integers(0, image.shape[-1] - w + 1))
    return image[:, y:y + h, x:x + w], target[y:y + h, x:x + w]


def augment(pixels: torch.Tensor, target: torch.Tensor, window: tuple[int, int], mean: torch.Tensor,
            std: torch.Tensor, rng: np.random.Generator, rescale: bool, fill: float):
    """One training crop: (3, H, W) pixels in [0, 1] and their (H, W) labels or depth ->
    a normalised (3, h, w) window and its (h, w) target."""
    if rescale:
        pixels, target = random_rescale(pixels, target, window, rng)
    image = (photometric(pixels, rng) - mean) / std
    if rng.random() < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    return random_crop(image, target, window, rng, fill)


# --- heads, training, inference --------------------------------------------------------------

class LinearHead(nn.Module):
    """A 1x1 convolution, after a BatchNorm by default: mmseg's BNHead (segmentation); DINOv2's
    depth head is the convolution alone (its BatchNorm is commented out)."""

    def __init__(self, dim: int, outputs: int, batchnorm: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim) if batchnorm else nn.Identity()
        self.conv = nn.Conv2d(dim, outputs, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(features))


def with_class_token(patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B, D, gh, gw) patches and (B, D) class token -> (B, 2D, gh, gw), the token at every patch."""
    return torch.cat([patches, cls[:, :, None, None].expand_as(patches)], dim=1)


def seg_logits(head: LinearHead, features: Features, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) windows -> (B, C, h, w) logits, upsampled bilinearly from the patch grid."""
    patches, _ = features(x)
    return F.interpolate(head(patches), x.shape[-2:], mode="bilinear", align_corners=False)


def depth_pixels(head: LinearHead, features: Features, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) windows -> (B, h, w) depth: bins decoded on a DEPTH_UPSAMPLE-times finer
    grid than the patches, then upsampled bilinearly to the pixels."""
    patches, cls = features(x)
    logits = F.interpolate(head(with_class_token(patches, cls)), scale_factor=DEPTH_UPSAMPLE, mode="bilinear",
                           align_corners=False)
    depth = decode_bins(logits, centres)
    return F.interpolate(depth[:, None], x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def train_head(head: LinearHead, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               batch: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]], s: TrainedProbeSettings,
               schedule: Schedule) -> LinearHead:
    """AdamW under `schedule` for `s.iterations` steps; `batch` draws (windows, targets) on the
    head's device, `loss` scores the windows against the targets."""
    rng = np.random.default_rng(s.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    head.train()
    for step in range(s.iterations):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s.iterations, schedule)
        x, y = batch(rng)
        value = loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return head.eval()


def draw_batch(samples: list[tuple[torch.Tensor, torch.Tensor]], window: tuple[int, int], mean: torch.Tensor,
               std: torch.Tensor, size: int, rescale: bool, fill: float, device):
    """A function drawing `size` augmented windows (with replacement) from (pixels, target) samples."""
    def batch(rng: np.random.Generator):
        crops = [augment(*samples[i], window, mean, std, rng, rescale, fill) for i in rng.integers(0, len(samples), size)]
        return torch.stack([c[0] for c in crops]).to(device), torch.stack([c[1] for c in crops]).to(device)

    return batch


def train_segmentation(features: Features, dim: int, samples: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                       ignore_index: int, window: tuple[int, int], mean: torch.Tensor, std: torch.Tensor,
                       s: TrainedProbeSettings, device="cpu") -> LinearHead:
    """The segmentation head trained on (3, H, W) pixels in [0, 1] with (H, W) long labels."""
    torch.manual_seed(s.seed)  # the head's initial weights
    head = LinearHead(dim, num_classes).to(device)

    def loss(x, y):
        return F.cross_entropy(seg_logits(head, features, x), y, ignore_index=ignore_index)

    return train_head(head, loss, draw_batch(samples, window, mean, std, s.batch_size, True, ignore_index, device), s,
                      schedule_of("seg", s))


def train_depth(features: Features, dim: int, samples: list[tuple[torch.Tensor, torch.Tensor]], window: tuple[int, int],
                mean: torch.Tensor, std: torch.Tensor, s: TrainedProbeSettings, device="cpu") -> LinearHead:
    """The depth head trained on (3, H, W) pixels in [0, 1] with (H, W) depth in metres."""
    torch.manual_seed(s.seed)  # the head's initial weights
    head = LinearHead(2 * dim, s.bins, batchnorm=False).to(device)
    centres = bin_centres(s.min_depth, s.max_depth, s.bins).to(device)

    def loss(x, y):
        pred, valid = depth_pixels(head, features, x, centres), in_range(y, s.min_depth, s.max_depth)
        return siglog_loss(pred, y, valid, s.siglog_lambda) + s.gradient_weight * gradient_loss(pred, y, valid)

    return train_head(head, loss, draw_batch(samples, window, mean, std, s.batch_size, False, 0.0, device), s,
                      schedule_of("depth", s))


@torch.no_grad()
def segment(head: LinearHead, features: Features, image: torch.Tensor, window: tuple[int, int],
            stride: tuple[int, int], short_side: int | Literal["window"] | None = None) -> torch.Tensor:
    """(H, W) labels of a normalised (3, H, W) image, as mmseg's test pipeline and slide
    inference: the image resized (bilinear) to `short_side` ('window': the window's short side;
    None: kept at its own resolution), windows slid over it, the averaged logits resized back
    to (H, W) bilinearly, argmax."""
    device = next(head.parameters()).device
    H, W = image.shape[-2:]
    side = min(window) if short_side == "window" else short_side
    if side is not None and eval_size(H, W, side) != (H, W):
        image = F.interpolate(image[None], eval_size(H, W, side), mode="bilinear", align_corners=False, antialias=True)[0]
    logits = slide(lambda x: seg_logits(head, features, x.to(device)), image, window, stride)
    if logits.shape[-2:] != (H, W):
        logits = F.interpolate(logits[None], (H, W), mode="bilinear", align_corners=False)[0]
    return logits.argmax(0)


@torch.no_grad()
def estimate_depth(head: LinearHead, features: Features, image: torch.Tensor, window: tuple[int, int],
                   stride: tuple[int, int], s: TrainedProbeSettings) -> torch.Tensor:
    """(H, W) depth in metres of a normalised (3, H, W) image at its own resolution."""
    device = next(head.parameters()).device
    centres = bin_centres(s.min_depth, s.max_depth, s.bins).to(device)
    return slide(lambda x: depth_pixels(head, features, x.to(device), centres)[:, None], image, window, stride)[0]


def scored_depth(gt: torch.Tensor, s: TrainedProbeSettings) -> torch.Tensor:
    """The ground truth with the pixels the protocol does not score set to 0 (no ground
    truth): outside (min_depth, max_depth), and outside the Eigen crop when it is on."""
    keep = in_range(gt, s.min_depth, s.max_depth)
    if s.eigen_crop:
        keep &= eigen_crop(*gt.shape)
    return torch.where(keep, gt, 0.0)


def vit_features(model: nn.Module) -> Features:
    """A frozen timm ViT as a feature function: final-layer patch tokens (B, D, gh, gw) and the
    class token (B, D); the mean patch token stands in for a model without a class token."""
    def features(x: torch.Tensor):
        with torch.no_grad():
            tokens = model.forward_features(x).float()
        gh, gw = x.shape[-2] // model.patch_embed.patch_size[0], x.shape[-1] // model.patch_embed.patch_size[1]
        patches = tokens[:, model.num_prefix_tokens:]
        cls = tokens[:, 0] if getattr(model, "cls_token", None) is not None else patches.mean(1)
        return patches.transpose(1, 2).reshape(len(x), -1, gh, gw), cls

    return features
