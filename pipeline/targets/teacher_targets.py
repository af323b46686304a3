"""Compute and store the denoised targets of units (the teacher-cache work unit).

One `TeacherTargets` holds a loaded teacher and keeps it busy across a list of units:
- a reader thread fetches each unit's images (one ranged read), decodes them and prepares
  every (image, variant) with its crop box and views, running ahead across unit boundaries;
- the caller's thread runs all views of `batch_images` images in one forward and recovers
  the targets;
- a writer thread writes each finished unit's rows and only then marks the unit complete,
  while the next unit is computed.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.data.images import Preprocess, crop_box, decode_rgb
from pipeline.data.manifest import Manifest, Unit
from pipeline.data.prefetch import prefetch
from pipeline.data.shards import fetch_images
from pipeline.errors import PipelineError
from pipeline.models.vit import load_teacher, patch_features
from pipeline.targets.store import StoreSpec, TargetStore
from pipeline.targets.tta import denoise, max_shifts, sample_views, view_rng


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


def node_id() -> str | None:
    """The Ray node this runs on (recorded with each unit), None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


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

    def compute_units(self, units: list[Unit]) -> list[dict]:
        """Compute, write and mark complete every unit not complete yet (a retried task skips
        what it already finished). Returns the statistics of the units written."""
        done = self.store.completed()
        todo = [u for u in units if u.id not in done]
        V, (gh, gw), D = self.spec.variants, self.spec.grid, self.spec.dim
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
            pending, results = [], []
            current, out, boxes, compute, started = None, None, None, 0.0, 0.0
            for unit, batch in prefetch(self._batches(todo), self.prefetch_batches):
                if unit is not current:
                    current, compute, started = unit, 0.0, time.time()
                    out = torch.zeros(unit.count, V, gh, gw, D)
                    boxes = np.zeros((unit.count, V, 4), dtype=np.float32)
                tc = time.perf_counter()
                for it, target in zip(batch, self.targets(batch)):
                    out[it.row, it.variant] = target
                    boxes[it.row, it.variant] = it.box
                compute += time.perf_counter() - tc
                if batch[-1].row == unit.count - 1 and batch[-1].variant == V - 1:  # the unit's last batch
                    if len(pending) >= 2:  # bound the memory of units waiting to be written
                        results.append(pending.pop(0).result())
                    pending.append(writer.submit(self._write, unit, out, boxes, compute, started))
            results += [f.result() for f in pending]
        return results

    def _batches(self, units: list[Unit]):
        """(unit, batch) in order; a batch never spans two units."""
        for unit in units:
            items = unit_items(self.manifest, unit, self.spec, self.preprocess, self.storage_options)
            for batch in batched(items, self.batch_images):
                yield unit, batch

    def _write(self, unit: Unit, out: torch.Tensor, boxes: np.ndarray, compute: float, started: float) -> dict:
        if not torch.isfinite(out).all():
            raise PipelineError(f"unit {unit.id}: the teacher produced NaN or Inf features")
        tw = time.perf_counter()
        written = self.store.write_unit(unit, out, boxes)
        stats = {"images": unit.count, "variants": self.spec.variants, "compute_seconds": round(compute, 3),
                 "write_seconds": round(time.perf_counter() - tw, 3), "node": node_id(), **written}
        self.store.mark_complete(unit.id, stats)
        return {"unit": unit.id, "started": started, "finished": time.time(), **stats}
