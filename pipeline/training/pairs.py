"""(image, target) pairs for distillation, read unit by unit.

Every rank computes the same epoch plan from (seed, epoch): units (a Zarr shard of targets
and a contiguous byte range of a tar) are shuffled and dealt to ranks, each to the least
loaded rank, so a rank reads each of its units once per epoch; positions are shuffled
within each unit. All ranks get exactly the same number of samples (DDP steps must match):
a rank with too few wraps around its own list, one with too many stops early. With fewer
units than ranks, units are split into interleaved parts instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from pipeline.data.images import BAD_IMAGE, Preprocess, decode_rgb, decode_stored
from pipeline.data.manifest import Manifest, Unit
from pipeline.data.shards import fetch_images
from pipeline.errors import PipelineError
from pipeline.targets.store import StoreSpec, TargetStore
from pipeline.targets.views import prepare


class Pair(NamedTuple):
    """A cached sample (or, stacked, a batch): the uint8 crop and its stored target."""

    pixels: torch.Tensor  # (3, H, W) uint8
    targets: torch.Tensor  # (gh, gw, D) in the store's width


class Views(NamedTuple):
    """An online sample (or batch): the uint8 crop and the views its targets are computed from."""

    pixels: torch.Tensor  # (3, H, W) uint8
    offsets: np.ndarray  # (counts, 2) shifts in patches
    flips: np.ndarray  # (counts,)


def epoch_plan(counts: dict[int, int], epoch: int, seed: int, rank: int, world: int) -> list[tuple[int, np.ndarray]]:
    """This rank's (unit id, positions within the unit) for one epoch, in reading order.
    `counts` maps unit id -> images."""
    rng = np.random.default_rng([seed, epoch])
    order = [int(s) for s in rng.permutation(sorted(counts))]
    parts = 1 if len(order) >= world else world
    units = []
    for unit in order:
        positions = np.random.default_rng([seed, epoch, unit]).permutation(counts[unit])
        units += [(unit, positions[p::parts]) for p in range(parts) if len(positions[p::parts])]
    loads, mine = [0] * world, [[] for _ in range(world)]
    for unit in units:
        r = int(np.argmin(loads))
        mine[r].append(unit)
        loads[r] += len(unit[1])
    per_rank = sum(counts.values()) // world
    plan, taken = [], 0
    while taken < per_rank and mine[rank]:
        for unit, positions in mine[rank]:
            take = positions[: per_rank - taken]
            plan.append((unit, take))
            taken += len(take)
            if taken == per_rank:
                break
    return plan


def samples_per_rank(counts: dict[int, int], world: int) -> int:
    return sum(counts.values()) // world


@dataclass
class Examples:
    """Training examples of a plan, unit by unit: images by ranged reads, in plan order.
    Images come as uint8 crops (`Preprocess.pixels`); `Preprocess.normalize` runs on the
    device that trains on them."""

    manifest: Manifest
    preprocess: Preprocess
    storage_options: dict | None = None

    def __post_init__(self):
        self.units = {u.id: u for u in self.manifest.units()}

    def unit_counts(self) -> dict[int, int]:
        return {u.id: u.count for u in self.units.values()}

    def examples(self, plan: list[tuple[int, np.ndarray]], epoch: int):
        for unit_id, positions in plan:
            yield from self.samples(epoch, unit_id, positions)

    def _images(self, unit: Unit, positions):
        record = self.manifest.record(unit.shard, self.storage_options)
        return fetch_images(record, [unit.first + int(p) for p in positions], self.storage_options)


@dataclass
class CachedPairs(Examples):
    """(pixels, target) from the store: epoch e reads variant e mod V, its stored crop (or, in
    a store without crops, the image decoded and cropped with that variant's recorded box);
    targets in their stored width (`as_tensor`). With `hflip` > 0, image and target are
    mirrored together (valid because the denoised target averages flipped and unflipped views)."""

    store: TargetStore | None = None
    hflip: float = 0.0
    seed: int = 0
    _rejected: dict[int, set[int]] = field(default_factory=dict, init=False, repr=False)  # unit -> positions

    def samples(self, epoch: int, unit_id: int, positions: np.ndarray) -> list[Pair]:
        unit, variant = self.units[unit_id], epoch % self.store.spec.variants
        positions = self._readable(unit, np.asarray(positions, dtype=np.int64))
        rows = unit.start + positions
        targets = self.store.read_rows(rows, variant)
        out = []
        for p, pixels, target in zip(positions, self._pixels(unit, positions, rows, variant), targets):
            if self.hflip and np.random.default_rng([self.seed, epoch, unit.start + int(p)]).random() < self.hflip:
                pixels, target = pixels.flip(-1), target.flip(1)
            out.append(Pair(pixels, target))
        return out

    def _readable(self, unit: Unit, positions: np.ndarray) -> np.ndarray:
        """`positions`, each image the teacher-cache stage rejected (its unit's marker lists
        them; cache.on_bad_image: skip) replaced by the next readable one of the unit, so a
        batch keeps its size and the plan its order."""
        if unit.id not in self._rejected:
            marker = self.store.marker(unit.id)
            self._rejected[unit.id] = {r["index"] - unit.start for r in marker.get("rejected", [])}
        bad = self._rejected[unit.id]
        if not bad:
            return positions
        if len(bad) >= unit.count:
            raise PipelineError(f"store {self.store.url}: every image of unit {unit.id} was rejected")
        out = positions.copy()
        for i, p in enumerate(out):
            while p in bad:
                p = (p + 1) % unit.count
            out[i] = p
        return out

    def _pixels(self, unit: Unit, positions: np.ndarray, rows: np.ndarray, variant: int):
        if self.store.has_crops:  # the bytes the teacher saw: nothing to decode
            return self.store.read_crops(rows, variant)
        boxes = self.store.read_boxes(slice(unit.start, unit.start + unit.count), variant)
        return [self.preprocess.pixels(decode_rgb(data), boxes[p]) for p, data in zip(positions, self._images(unit, positions))]


@dataclass
class OnlineViews(Examples):
    """(pixels, offsets, flips) for computing targets inside the step, as the reference
    implementation does: every epoch a new crop and new views per image, drawn from
    (seed, index, epoch), so epoch e sees what a cache's variant e would hold."""

    spec: StoreSpec | None = None
    skip_bad: bool = False  # cache.on_bad_image: skip
    _bad: set[int] = field(default_factory=set, init=False, repr=False)  # global indices said once

    def samples(self, epoch: int, unit_id: int, positions: np.ndarray) -> list[Views]:
        unit = self.units[unit_id]
        record = self.manifest.record(unit.shard, self.storage_options)
        out = []
        for p, data in zip(positions, self._images(unit, positions)):
            p, image = self._decoded(unit, record, int(p), data)
            item = prepare(image, unit.start + p, epoch, self.spec, self.preprocess, 0)
            out.append(Views(item.pixels, item.offsets, item.flips))
        return out

    def _decoded(self, unit: Unit, record, p: int, data: bytes):
        """(position, image) of image `p` of the unit; an image that no longer decodes stops the
        run naming it, or with `skip_bad` is replaced by the next one of the unit that does (as
        a cached student's is), so a batch keeps its size."""
        for _ in range(unit.count):
            image, code, cause = decode_stored(data, record.sizes[unit.first + p])
            if image is not None:
                return p, image
            what = (f"shard {unit.shard} ({record.tar}), unit {unit.id}, image {record.keys[unit.first + p]!r} "
                    f"(global index {unit.start + p}): {BAD_IMAGE[code]}{cause}")
            if not self.skip_bad:
                raise PipelineError(f"{what}. Set cache.on_bad_image: skip to train on the other images")
            if unit.start + p not in self._bad:
                self._bad.add(unit.start + p)
                logging.getLogger(__name__).warning("skipped, never trained on: %s", what)
            p = (p + 1) % unit.count
            (data,) = self._images(unit, [p])
        raise PipelineError(f"shard {unit.shard} ({record.tar}), unit {unit.id}: no image of the unit decodes")


@dataclass
class StepBatches:
    """The batches of one rank's run from `first_step` on, as `in_order` loads them: batch i
    is step first_step + i, cut from its epoch's plan, so a run resumed at any step reads
    what an uninterrupted one would have. Picklable: reader processes each build the plans
    they need (a few permutations per epoch)."""

    source: Examples
    seed: int
    rank: int
    world: int
    batch_size: int
    epochs: int
    first_step: int = 0

    def __post_init__(self):
        self.counts = self.source.unit_counts()
        self.steps_per_epoch = samples_per_rank(self.counts, self.world) // self.batch_size
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, unit of each sample, position)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.epochs - self.first_step)

    def epoch(self, i: int) -> int:
        return (self.first_step + i) // self.steps_per_epoch

    def __call__(self, i: int) -> list[tuple]:
        epoch = self.epoch(i)
        if self._plan is None or self._plan[0] != epoch:
            plan = epoch_plan(self.counts, epoch, self.seed, self.rank, self.world)
            units = np.concatenate([np.full(len(p), u) for u, p in plan])
            self._plan = (epoch, units, np.concatenate([p for _, p in plan]))
        _, units, positions = self._plan
        first = (self.first_step + i) % self.steps_per_epoch * self.batch_size
        units, positions = units[first:first + self.batch_size], positions[first:first + self.batch_size]
        out, start = [], 0
        for end in [*np.flatnonzero(units[1:] != units[:-1]) + 1, len(units)]:  # runs of one unit
            out += self.source.samples(epoch, int(units[start]), positions[start:end])
            start = end
        return out
