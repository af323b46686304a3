"""Compute and store the denoised targets of units (the teacher-cache work unit).

One `TeacherTargets` holds a loaded teacher and keeps it busy across a list of units:
- readers (`pipeline.data.readers`: processes, or a thread with `readers=0`) fetch the images
  of each batch of `batch_images` (image, variant) pairs (one ranged read), decode them and
  prepare each pair's uint8 crop and views, running ahead across unit boundaries;
- the caller's thread normalises the crops on the model's device, runs all views of the
  batch in one forward and recovers the targets;
- a `UnitSink` encodes the targets on that device and copies them, with the boxes and (in a
  store with crops) the uint8 crops the teacher saw, into a host buffer laid out as the unit's
  shard; a writer thread writes each finished unit and only then marks it complete, while the
  next unit is computed.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.data.images import BAD_IMAGE, Preprocess, decode_stored
from pipeline.data.manifest import Manifest, Unit
from pipeline.data.readers import in_order
from pipeline.data.shards import fetch_images
from pipeline.errors import PipelineError
from pipeline.models.vit import load_teacher, patch_features
from pipeline.targets.sink import UnitSink
from pipeline.targets.store import StoreSpec, TargetStore
from pipeline.targets.tta import denoise
from pipeline.targets.views import prepare


def view_jobs(units: list[Unit], variants: int, batch_images: int) -> list[tuple[Unit, list[tuple[int, int]]]]:
    """(unit, [(row, variant), ...]) of every forward, in order; a batch never spans two units."""
    jobs = []
    for unit in units:
        pairs = [(row, variant) for row in range(unit.count) for variant in range(variants)]
        jobs += [(unit, pairs[i:i + batch_images]) for i in range(0, len(pairs), batch_images)]
    return jobs


class ViewSample(NamedTuple):
    """One (image, variant) of a teacher batch as the readers hand it over (stacked: a batch)."""

    row: int  # position within the unit
    variant: int
    pixels: torch.Tensor  # (3, H, W) uint8 crop
    box: np.ndarray  # (4,) crop box in the image's pixels
    offsets: np.ndarray  # (counts, 2) view shifts in patches
    flips: np.ndarray  # (counts,)
    bad: int  # 0, or the BAD_IMAGE code of an image that could not be read


@dataclass
class UnitViews:
    """Loads job i of `jobs` for `in_order`: one ranged read of its images, each decoded once,
    then (row, variant, pixels, box, offsets, flips, bad) of each (image, variant). An image
    that no longer decodes (a shard cut short or overwritten after sharding) stops the stage
    with its shard, unit and key, or with `skip_bad`, comes as `bad` (a BAD_IMAGE code) with
    blank pixels and views, for the sink to record as rejected."""

    manifest: Manifest
    spec: StoreSpec
    preprocess: Preprocess
    jobs: list[tuple[Unit, list[tuple[int, int]]]]
    storage_options: dict | None = None
    skip_bad: bool = False

    def __call__(self, i: int) -> list[ViewSample]:
        unit, pairs = self.jobs[i]
        rows = sorted({row for row, _ in pairs})
        record = self.manifest.record(unit.shard, self.storage_options)
        where = f"shard {unit.shard} ({record.tar}), unit {unit.id}"
        try:
            data = fetch_images(record, [unit.first + r for r in rows], self.storage_options)
        except FileNotFoundError:
            raise PipelineError(f"{where}: the shard's file is missing") from None
        images, bad = {}, {}
        for row, d in zip(rows, data):
            position = unit.first + row
            images[row], bad[row], cause = decode_stored(d, record.sizes[position])
            if bad[row] and not self.skip_bad:
                raise PipelineError(f"{where}, image {record.keys[position]!r} (global index {unit.start + row}): "
                                    f"{BAD_IMAGE[bad[row]]}{cause}. Set cache.on_bad_image: skip to record it as "
                                    f"rejected and go on")
        out = []
        for row, variant in pairs:
            if bad[row]:
                blank = (torch.zeros(3, *self.preprocess.size, dtype=torch.uint8), np.zeros(4, np.float32),
                         np.zeros((self.spec.counts, 2), np.int64), np.zeros(self.spec.counts, bool))
                out.append(ViewSample(row, variant, *blank, bad[row]))
            else:
                it = prepare(images[row], unit.start + row, variant, self.spec, self.preprocess, row)
                out.append(ViewSample(it.row, it.variant, it.pixels, np.float32(it.box), it.offsets, it.flips, 0))
        return out


class TeacherTargets:
    def __init__(self, teacher_cfg: TeacherConfig, store: TargetStore, manifest: Manifest, batch_images: int = 4,
                 prefetch_batches: int = 2, device: str | torch.device = "cpu", storage_options=None, readers: int = 0,
                 skip_bad: bool = False, compile: bool = False):
        self.store, self.manifest, self.spec, self.skip_bad = store, manifest, store.spec, skip_bad
        self.batch_images, self.prefetch_batches, self.readers = batch_images, prefetch_batches, readers
        self.device = torch.device(device)
        self.storage_options = storage_options
        self.model = load_teacher(teacher_cfg, storage_options, self.device)
        self.preprocess = Preprocess.from_dict(self.spec.teacher["preprocess"])
        self.patch = tuple(self.spec.teacher["patch"])
        self.fill = self.preprocess.white().to(self.device)
        self._sink: UnitSink | None = None  # made at the first units, kept: its buffers are large
        # batches have one shape (a unit's last may be smaller: one more compilation)
        self._features = torch.compile(self._eager_features) if compile else self._eager_features

    def _eager_features(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            return patch_features(self.model, x).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._features(x)

    def targets(self, pixels: torch.Tensor, offsets, flips) -> torch.Tensor:
        """Denoised targets (n, gh, gw, D) float32 on the model's device of uint8 crops
        (n, 3, H, W) and their views (n, counts, 2), (n, counts) (arrays or tensors; nothing
        here waits for the device)."""
        images = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
        return denoise(self.features, images, offsets, flips, self.patch, self.fill)

    def compute_units(self, units: list[Unit]) -> list[dict]:
        """Compute, write and mark complete every unit not complete yet (a retried task skips
        what it already finished). Returns the statistics of the units written."""
        done = self.store.completed_among([u.id for u in units])
        todo = [u for u in units if u.id not in done]
        V = self.spec.variants
        jobs = view_jobs(todo, V, self.batch_images)
        load = UnitViews(self.manifest, self.spec, self.preprocess, jobs, self.storage_options, self.skip_bad)
        batches = in_order(load, len(jobs), self.readers, self.prefetch_batches, pin_memory=self.device.type == "cuda")
        if self._sink is None:
            self._sink = UnitSink(self.store, self.device)
        sink = self._sink
        try:
            for (unit, pairs), batch in zip(jobs, batches):
                if pairs[0] == (0, 0):
                    sink.begin(unit)
                tc = time.perf_counter()
                targets = self._forward(unit, batch.pixels, batch.offsets, batch.flips)
                sink.add(pairs[0][0] * V + pairs[0][1], targets, batch.box, batch.pixels, time.perf_counter() - tc)
                for row, code in {int(r): int(c) for r, c in zip(batch.row, batch.bad) if c}.items():
                    key = self.manifest.record(unit.shard, self.storage_options).keys[unit.first + row]
                    sink.reject(unit.start + row, key, BAD_IMAGE[code])
                if pairs[-1] == (unit.count - 1, V - 1):  # the unit's last batch
                    sink.end(unit)
        except BaseException:  # units already computed are still written and marked: a rerun skips them
            with contextlib.suppress(Exception):
                sink.drain()
            raise
        return sink.drain()

    def _forward(self, unit: Unit, pixels: torch.Tensor, offsets, flips) -> torch.Tensor:
        try:
            return self.targets(pixels, offsets, flips)
        except torch.OutOfMemoryError:
            n, counts, (h, w) = len(pixels), self.spec.counts, self.preprocess.size
            device = "GPU" if self.device.type == "cuda" else self.device.type.upper()
            raise PipelineError(
                f"the {device} ran out of memory running the teacher on {n} image(s) x {counts} views "
                f"({n * counts} views of {h}x{w}) of unit {unit.id} (shard {unit.shard}): lower cache.batch_images "
                f"(now {self.batch_images})") from None
