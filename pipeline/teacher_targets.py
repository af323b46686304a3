"""Compute and store the denoised targets of one unit (the teacher-cache work unit).

One `TeacherTargets` holds a loaded teacher. For a unit it reads the images (one ranged
read), prepares every (image, variant) with its crop box and views in a background thread,
runs all views of `batch_images` images in one forward, recovers the targets, writes the
unit's rows and only then marks the unit complete.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.images import Preprocess, crop_box, decode_rgb
from pipeline.manifest import Manifest, Unit
from pipeline.models import load_teacher, patch_features
from pipeline.prefetch import prefetch
from pipeline.shards import fetch_images
from pipeline.target_store import StoreSpec, TargetStore
from pipeline.tta import denoise, max_shifts, sample_views, view_rng


@dataclass
class Item:
    row: int  # position within the unit
    variant: int
    image: torch.Tensor  # (3, H, W) normalised
    box: tuple[float, float, float, float]
    offsets: np.ndarray
    flips: np.ndarray


def prepare(img, index: int, variant: int, spec: StoreSpec, preprocess: Preprocess, row: int) -> Item:
    """Crop box and views of one (image, variant): a function of (seed, index, variant) only."""
    rng = view_rng(spec.seed, index, variant)
    box = crop_box(img.width, img.height, preprocess.size, spec.crop, rng)
    offsets, flips = sample_views(rng, spec.counts, max_shifts(spec.grid, spec.shift_frac), spec.flip)
    return Item(row, variant, preprocess(img, box), box, offsets, flips)


def unit_items(manifest: Manifest, unit: Unit, spec: StoreSpec, preprocess: Preprocess, storage_options=None):
    images = fetch_images(manifest.record(unit.shard, storage_options), unit.positions, storage_options)
    for row, (index, data) in enumerate(zip(unit.rows, images)):
        img = decode_rgb(data)
        for variant in range(spec.variants):
            yield prepare(img, index, variant, spec, preprocess, row)


def batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class TeacherTargets:
    def __init__(self, teacher_cfg: TeacherConfig, store: TargetStore, manifest: Manifest, batch_images: int = 4,
                 prefetch_batches: int = 2, device: str | torch.device = "cpu", storage_options=None):
        self.store, self.manifest, self.spec = store, manifest, store.spec
        self.batch_images, self.prefetch_batches = batch_images, prefetch_batches
        self.device = torch.device(device)
        self.storage_options = storage_options
        self.model = load_teacher(teacher_cfg, storage_options, self.device)
        self.preprocess = Preprocess.from_dict(self.spec.teacher["preprocess"])
        self.patch = tuple(self.spec.teacher["patch"])
        self.fill = self.preprocess.white()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return patch_features(self.model, x).float()

    def targets(self, batch: list[Item]) -> torch.Tensor:
        images = torch.stack([it.image for it in batch])
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        offsets = np.stack([it.offsets for it in batch])
        flips = np.stack([it.flips for it in batch])
        return denoise(self.features, images, offsets, flips, self.patch, self.fill).cpu()

    def compute_unit(self, unit: Unit) -> dict:
        """Compute, write and mark complete one unit. Returns its statistics."""
        t0 = time.perf_counter()
        V, (gh, gw), D = self.spec.variants, self.spec.grid, self.spec.dim
        out = torch.zeros(unit.count, V, gh, gw, D)
        boxes = np.zeros((unit.count, V, 4), dtype=np.float32)
        items = unit_items(self.manifest, unit, self.spec, self.preprocess, self.storage_options)
        compute = 0.0
        for batch in prefetch(batched(items, self.batch_images), self.prefetch_batches):
            tc = time.perf_counter()
            result = self.targets(batch)
            compute += time.perf_counter() - tc
            for it, target in zip(batch, result):
                out[it.row, it.variant] = target
                boxes[it.row, it.variant] = it.box
        if not torch.isfinite(out).all():
            raise PipelineError(f"unit {unit.id}: the teacher produced NaN or Inf features")
        tw = time.perf_counter()
        written = self.store.write_unit(unit, out, boxes)
        stats = {"images": unit.count, "variants": V, "seconds": round(time.perf_counter() - t0, 3),
                 "compute_seconds": round(compute, 3), "write_seconds": round(time.perf_counter() - tw, 3), **written}
        self.store.mark_complete(unit.id, stats)
        return {"unit": unit.id, **stats}
