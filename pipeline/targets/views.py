"""What one (image, variant) is made of before any model sees it: its crop and its views.

A pure function of (seed, global index, variant), shared by the teacher-cache stage (which
stores the targets of these views) and by distillation's online regime and store checks
(which must see the very same crop and views).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.images import Preprocess, crop_box
from pipeline.targets.store import StoreSpec
from pipeline.targets.tta import max_shifts, sample_views, view_rng


@dataclass
class Item:
    row: int  # position within the unit
    variant: int
    pixels: torch.Tensor  # (3, H, W) uint8 crop; `Preprocess.normalize` gives the model's input
    box: tuple[float, float, float, float]
    offsets: np.ndarray
    flips: np.ndarray


def prepare(img, index: int, variant: int, spec: StoreSpec, preprocess: Preprocess, row: int) -> Item:
    """Crop box and views of one (image, variant): a function of (seed, index, variant) only."""
    rng = view_rng(spec.seed, index, variant)
    box = crop_box(img.width, img.height, preprocess.size, spec.crop, rng)
    offsets, flips = sample_views(rng, spec.counts, max_shifts(spec.grid, spec.shift_frac), spec.flip, spec.fps_start)
    return Item(row, variant, preprocess.pixels(img, box), box, offsets, flips)
