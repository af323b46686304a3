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


def _view_sources(offsets: torch.Tensor, flips: torch.Tensor, size: tuple[int, int], scale: tuple[int, int] = (1, 1)):
    """For every view (B, V) and position of its (H, W) grid (pixels, or tokens with scale 1):
    the position of the original it shows, as row (B, V, H) and column (B, V, W) indices
    clamped into range, and whether that source lies inside the original (else infill).
    A view shifts by `offsets * scale` (dest[i] = src[i - d]) and then mirrors the columns."""
    H, W = size
    rows = torch.arange(H, device=offsets.device) - offsets[..., 0:1] * scale[0]
    columns = torch.arange(W, device=offsets.device).expand(*flips.shape, W)
    columns = torch.where(flips[..., None], W - 1 - columns, columns) - offsets[..., 1:2] * scale[1]
    inside = ((rows >= 0) & (rows < H))[..., :, None] & ((columns >= 0) & (columns < W))[..., None, :]
    return rows.clamp(0, H - 1), columns.clamp(0, W - 1), inside


def _as_index(offsets, flips, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets and flips (arrays, or tensors in page-locked memory from the readers) on
    `device`, copied without waiting: a blocking copy to a GPU waits for all its queued work."""
    def to(x, dtype):
        return torch.as_tensor(x).to(device=device, dtype=dtype, non_blocking=True)

    return to(offsets, torch.int64), to(flips, torch.bool)


def render_views(
    images: torch.Tensor, offsets, flips, patch: tuple[int, int], fill: torch.Tensor
) -> torch.Tensor:
    """images (B, C, H, W), offsets (B, V, 2), flips (B, V) -> views (B, V, C, H, W), all views
    of the batch by one gather (no loop over views)."""
    B, C, H, W = images.shape
    offsets, flips = _as_index(offsets, flips, images.device)
    rows, columns, inside = _view_sources(offsets, flips, (H, W), patch)
    batch = torch.arange(B, device=images.device).view(B, 1, 1, 1)
    views = images.permute(0, 2, 3, 1)[batch, rows[..., :, None], columns[..., None, :]]  # (B, V, H, W, C)
    views = torch.where(inside[..., None], views, fill.to(images))
    return views.permute(0, 1, 4, 2, 3).contiguous()


def recover(tokens: torch.Tensor, offsets, flips) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, V, gh, gw, D) of the views -> (mean per original patch (B, gh, gw, D),
    number of views that saw each patch (B, gh, gw)). Each original patch gathers, from every
    view, the token that shows it (undo the flip, undo the shift); tokens of the infill are
    never gathered."""
    B, V, gh, gw, D = tokens.shape
    offsets, flips = _as_index(offsets, flips, tokens.device)
    # the view position that shows original patch o is o + d, mirrored: the inverse of a view
    rows, columns, inside = _view_sources(-offsets, torch.zeros_like(flips), (gh, gw))
    columns = torch.where(flips[..., None], gw - 1 - columns, columns)
    batch, view = torch.arange(B, device=tokens.device).view(B, 1, 1, 1), torch.arange(V, device=tokens.device).view(1, V, 1, 1)
    seen_by = tokens[batch, view, rows[..., :, None], columns[..., None, :]].float()  # (B, V, gh, gw, D)
    total = torch.where(inside[..., None], seen_by, 0.0).sum(1)
    seen = inside.sum(1, dtype=torch.float32)
    return total / seen.clamp(min=1).unsqueeze(-1), seen


def denoise(
    features: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    offsets,
    flips,
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
