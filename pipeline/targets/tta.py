"""Test-time augmentation that denoises a teacher's dense features (DESIGN section 1).

Each view shifts the image by whole patches (white infill) and may then flip it
horizontally. A view's token at grid position (i, j) therefore came from original patch
(i - dy, j' - dx), where j' undoes the flip; tokens whose source lies outside the image saw
only infill and are dropped. The target of a patch is the mean over the views that saw it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def view_rng(seed: int, index: int, variant: int = 0) -> np.random.Generator:
    """The only source of randomness for one image's crop and views."""
    return np.random.default_rng([seed, index, variant])


def max_shifts(grid_hw: tuple[int, int], shift_frac: float) -> tuple[int, int]:
    return round(shift_frac * grid_hw[0]), round(shift_frac * grid_hw[1])


def farthest_point_sample(candidates: np.ndarray, k: int, first=(0, 0)) -> np.ndarray:
    """Greedy farthest-point sampling: start at `first`, then repeatedly take the candidate
    farthest from everything chosen so far (ties go to the earliest candidate)."""
    chosen = [np.asarray(first, dtype=np.int64)]
    dist = np.linalg.norm(candidates - chosen[0], axis=1)
    for _ in range(k - 1):
        i = int(np.argmax(dist))
        chosen.append(candidates[i].astype(np.int64))
        dist = np.minimum(dist, np.linalg.norm(candidates - candidates[i], axis=1))
    return np.stack(chosen)


def sample_views(rng: np.random.Generator, counts: int, shifts: tuple[int, int], flip: bool, fps_start: str = "origin"):
    """Offsets (counts, 2) as (dy, dx) in patches and flips (counts,). View 0 is the identity.
    `fps_start`: farthest-point sampling starts at the identity ('origin'), or at a random
    candidate whose place, view 0, then becomes the identity ('random')."""
    my, mx = shifts
    candidates = np.stack(
        [rng.integers(-my, my + 1, size=counts * 10), rng.integers(-mx, mx + 1, size=counts * 10)], axis=1
    )
    if fps_start == "origin":
        offsets = farthest_point_sample(candidates, counts)
    elif fps_start == "random":
        offsets = farthest_point_sample(candidates, counts, first=candidates[rng.integers(len(candidates))])
        offsets[0] = 0
    else:
        raise ValueError(f"unknown fps_start {fps_start!r}")
    flips = rng.random(counts) < 0.5 if flip else np.zeros(counts, dtype=bool)
    flips[0] = False
    return offsets, flips


def _shift_slices(shift: int, size: int) -> tuple[slice, slice]:
    """(destination, source) slices along one axis for `dest[i] = src[i - shift]`."""
    return slice(max(shift, 0), size + min(shift, 0)), slice(max(-shift, 0), size - max(shift, 0))


def render_views(
    images: torch.Tensor, offsets: np.ndarray, flips: np.ndarray, patch: tuple[int, int], fill: torch.Tensor
) -> torch.Tensor:
    """images (B, C, H, W), offsets (B, V, 2), flips (B, V) -> views (B, V, C, H, W)."""
    B, C, H, W = images.shape
    V = offsets.shape[1]
    views = fill.to(images).view(1, 1, C, 1, 1).expand(B, V, C, H, W).clone()
    for b in range(B):
        for v in range(V):
            dy, dx = int(offsets[b, v, 0]) * patch[0], int(offsets[b, v, 1]) * patch[1]
            (ry, sy), (rx, sx) = _shift_slices(dy, H), _shift_slices(dx, W)
            views[b, v, :, ry, rx] = images[b, :, sy, sx]
            if flips[b, v]:
                views[b, v] = views[b, v].flip(-1)
    return views


def recover(tokens: torch.Tensor, offsets: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, V, gh, gw, D) of the views -> (mean per original patch (B, gh, gw, D),
    number of views that saw each patch (B, gh, gw))."""
    B, V, gh, gw, D = tokens.shape
    total = torch.zeros(B, gh, gw, D, dtype=torch.float32, device=tokens.device)
    seen = torch.zeros(B, gh, gw, dtype=torch.float32, device=tokens.device)
    for b in range(B):
        for v in range(V):
            t = tokens[b, v].float()
            if flips[b, v]:
                t = t.flip(1)
            dy, dx = int(offsets[b, v, 0]), int(offsets[b, v, 1])
            # view position i holds original patch i - dy: original rows are the source slice
            (vy, oy), (vx, ox) = _shift_slices(dy, gh), _shift_slices(dx, gw)
            total[b, oy, ox] += t[vy, vx]
            seen[b, oy, ox] += 1
    return total / seen.clamp(min=1).unsqueeze(-1), seen


def denoise(
    features: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    offsets: np.ndarray,
    flips: np.ndarray,
    patch: tuple[int, int],
    fill: torch.Tensor,
) -> torch.Tensor:
    """Run `features` ((N, C, H, W) -> (N, gh, gw, D)) on all views of all images in one
    batch and return the denoised targets (B, gh, gw, D) in float32."""
    B, V = offsets.shape[:2]
    views = render_views(images, offsets, flips, patch, fill)
    tokens = features(views.flatten(0, 1))
    tokens = tokens.view(B, V, *tokens.shape[1:])
    return recover(tokens, offsets, flips)[0]
