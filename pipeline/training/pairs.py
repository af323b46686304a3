"""(image, target) pairs for distillation, read unit by unit.

Every rank computes the same epoch plan from (seed, epoch): units (a Zarr shard of targets
and a contiguous byte range of a tar) are shuffled and dealt to ranks, each to the least
loaded rank, so a rank reads each of its units once per epoch; positions are shuffled
within each unit. All ranks get exactly the same number of samples (DDP steps must match):
a rank with too few wraps around its own list, one with too many stops early. With fewer
units than ranks, units are split into interleaved parts instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.images import Preprocess, decode_rgb
from pipeline.data.manifest import Manifest, Unit
from pipeline.data.shards import fetch_images
from pipeline.targets.store import StoreSpec, TargetStore, decode
from pipeline.targets.teacher_targets import prepare


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


def skip(plan: list[tuple[int, np.ndarray]], n: int) -> list[tuple[int, np.ndarray]]:
    """The plan without its first `n` samples (resuming inside an epoch)."""
    out = []
    for unit, positions in plan:
        if n >= len(positions):
            n -= len(positions)
            continue
        out.append((unit, positions[n:]))
        n = 0
    return out


@dataclass
class Examples:
    """Training examples of a plan, unit by unit: images by ranged reads, in plan order."""

    manifest: Manifest
    preprocess: Preprocess
    storage_options: dict | None = None

    def __post_init__(self):
        self.units = {u.id: u for u in self.manifest.units()}

    def unit_counts(self) -> dict[int, int]:
        return {u.id: u.count for u in self.units.values()}

    def _images(self, unit: Unit, positions):
        record = self.manifest.record(unit.shard, self.storage_options)
        return fetch_images(record, [unit.first + int(p) for p in positions], self.storage_options)


@dataclass
class CachedPairs(Examples):
    """(image, target) from the store: epoch e reads variant e mod V, the image cropped with
    that variant's recorded box. With `hflip` > 0, image and target are mirrored together
    (valid because the denoised target averages flipped and unflipped views)."""

    store: TargetStore | None = None
    hflip: float = 0.0
    seed: int = 0

    def examples(self, plan: list[tuple[int, np.ndarray]], epoch: int):
        dtype, variant = self.store.spec.dtype, epoch % self.store.spec.variants
        for unit_id, positions in plan:
            unit = self.units[unit_id]
            block = slice(unit.start, unit.start + unit.count)
            stored = self.store.group["targets"][block, variant]
            scales = self.store.group["scales"][block, variant] if dtype == "int8" else None
            boxes = self.store.read_boxes(block, variant)
            for p, data in zip(positions, self._images(unit, positions)):
                image = self.preprocess(decode_rgb(data), boxes[p])
                target = torch.from_numpy(decode(stored[p], None if scales is None else scales[p], dtype))
                if self.hflip and np.random.default_rng([self.seed, epoch, unit.start + int(p)]).random() < self.hflip:
                    image, target = image.flip(-1), target.flip(1)
                yield image, target


@dataclass
class OnlineViews(Examples):
    """(image, offsets, flips) for computing targets inside the step, as the reference
    implementation does: every epoch a new crop and new views per image, drawn from
    (seed, index, epoch), so epoch e sees what a cache's variant e would hold."""

    spec: StoreSpec | None = None

    def examples(self, plan: list[tuple[int, np.ndarray]], epoch: int):
        for unit_id, positions in plan:
            unit = self.units[unit_id]
            for p, data in zip(positions, self._images(unit, positions)):
                item = prepare(decode_rgb(data), unit.start + int(p), epoch, self.spec, self.preprocess, 0)
                yield item.image, item.offsets, item.flips


def batches(examples, batch_size: int):
    """Stack tuples of tensors (or arrays) field by field; drops a short last batch."""
    buffer = []
    for example in examples:
        buffer.append(example)
        if len(buffer) == batch_size:
            yield tuple(torch.stack(f) if torch.is_tensor(f[0]) else np.stack(f) for f in zip(*buffer))
            buffer = []
