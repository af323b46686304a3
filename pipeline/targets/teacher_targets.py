"""Compute and store the denoised targets of units (the teacher-cache work unit).

One `TeacherTargets` holds a loaded teacher and keeps it busy across a list of units:
- readers (`pipeline.data.readers`: processes, or a thread with `readers=0`) fetch the images
  of each batch of `batch_images` (image, variant) pairs (one ranged read), decode them and
  prepare each pair's uint8 crop and views, running ahead across unit boundaries;
- the caller's thread normalises the crops on the model's device, runs all views of the
  batch in one forward and recovers the targets;
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
from pipeline.data.readers import in_order
from pipeline.data.shards import fetch_images
from pipeline.errors import PipelineError
from pipeline.models.vit import load_teacher, patch_features
from pipeline.targets.store import StoreSpec, TargetStore
from pipeline.targets.tta import denoise, max_shifts, sample_views, view_rng


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


def view_jobs(units: list[Unit], variants: int, batch_images: int) -> list[tuple[Unit, list[tuple[int, int]]]]:
    """(unit, [(row, variant), ...]) of every forward, in order; a batch never spans two units."""
    jobs = []
    for unit in units:
        pairs = [(row, variant) for row in range(unit.count) for variant in range(variants)]
        jobs += [(unit, pairs[i:i + batch_images]) for i in range(0, len(pairs), batch_images)]
    return jobs


@dataclass
class UnitViews:
    """Loads job i of `jobs` for `in_order`: one ranged read of its images, each decoded once,
    then (row, variant, pixels, box, offsets, flips) of each (image, variant)."""

    manifest: Manifest
    spec: StoreSpec
    preprocess: Preprocess
    jobs: list[tuple[Unit, list[tuple[int, int]]]]
    storage_options: dict | None = None

    def __call__(self, i: int) -> list[tuple]:
        unit, pairs = self.jobs[i]
        rows = sorted({row for row, _ in pairs})
        data = fetch_images(self.manifest.record(unit.shard, self.storage_options), [unit.first + r for r in rows],
                            self.storage_options)
        images = {row: decode_rgb(d) for row, d in zip(rows, data)}
        items = [prepare(images[row], unit.start + row, variant, self.spec, self.preprocess, row) for row, variant in pairs]
        return [(it.row, it.variant, it.pixels, np.float32(it.box), it.offsets, it.flips) for it in items]


def node_id() -> str | None:
    """The Ray node this runs on (recorded with each unit), None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class TeacherTargets:
    def __init__(self, teacher_cfg: TeacherConfig, store: TargetStore, manifest: Manifest, batch_images: int = 4,
                 prefetch_batches: int = 2, device: str | torch.device = "cpu", storage_options=None, readers: int = 0):
        self.store, self.manifest, self.spec = store, manifest, store.spec
        self.batch_images, self.prefetch_batches, self.readers = batch_images, prefetch_batches, readers
        self.device = torch.device(device)
        self.storage_options = storage_options
        self.model = load_teacher(teacher_cfg, storage_options, self.device)
        self.preprocess = Preprocess.from_dict(self.spec.teacher["preprocess"])
        self.patch = tuple(self.spec.teacher["patch"])
        self.fill = self.preprocess.white().to(self.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return patch_features(self.model, x).float()

    def targets(self, pixels: torch.Tensor, offsets, flips) -> torch.Tensor:
        """Denoised targets (n, gh, gw, D) float32 on the CPU of uint8 crops (n, 3, H, W) and
        their views (n, counts, 2), (n, counts)."""
        images = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
        return denoise(self.features, images, np.asarray(offsets), np.asarray(flips), self.patch, self.fill).cpu()

    def compute_units(self, units: list[Unit]) -> list[dict]:
        """Compute, write and mark complete every unit not complete yet (a retried task skips
        what it already finished). Returns the statistics of the units written."""
        done = self.store.completed()
        todo = [u for u in units if u.id not in done]
        V, (gh, gw), D = self.spec.variants, self.spec.grid, self.spec.dim
        jobs = view_jobs(todo, V, self.batch_images)
        load = UnitViews(self.manifest, self.spec, self.preprocess, jobs, self.storage_options)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
            pending, results = [], []
            current, out, boxes, compute, started = None, None, None, 0.0, 0.0
            batches = in_order(load, len(jobs), self.readers, self.prefetch_batches, pin_memory=self.device.type == "cuda")
            for (unit, pairs), batch in zip(jobs, batches):
                rows, variants, pixels, box, offsets, flips = batch
                if unit is not current:
                    current, compute, started = unit, 0.0, time.time()
                    out = torch.zeros(unit.count, V, gh, gw, D)
                    boxes = np.zeros((unit.count, V, 4), dtype=np.float32)
                tc = time.perf_counter()
                out[rows, variants] = self.targets(pixels, offsets, flips)
                boxes[rows.numpy(), variants.numpy()] = box.numpy()
                compute += time.perf_counter() - tc
                if pairs[-1] == (unit.count - 1, V - 1):  # the unit's last batch
                    if len(pending) >= 2:  # bound the memory of units waiting to be written
                        results.append(pending.pop(0).result())
                    pending.append(writer.submit(self._write, unit, out, boxes, compute, started))
            results += [f.result() for f in pending]
        return results

    def _write(self, unit: Unit, out: torch.Tensor, boxes: np.ndarray, compute: float, started: float) -> dict:
        if not torch.isfinite(out).all():
            raise PipelineError(f"unit {unit.id}: the teacher produced NaN or Inf features")
        tw = time.perf_counter()
        written = self.store.write_unit(unit, out, boxes)
        stats = {"images": unit.count, "variants": self.spec.variants, "compute_seconds": round(compute, 3),
                 "write_seconds": round(time.perf_counter() - tw, 3), "node": node_id(), **written}
        self.store.mark_complete(unit.id, stats)
        return {"unit": unit.id, "started": started, "finished": time.time(), **stats}
