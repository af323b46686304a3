"""The `teacher_sink` section of `make bench`: how fast a teacher actor gets targets into the store.

The path measured is everything after the teacher's forward: targets of the reference shape
(DINOv2 ViT-B/14 at 518 px: 37 x 37 x 768, float32, constant) already on the device, encoded to
the store's type, checked for NaN/Inf, copied into the unit's host buffer with the batch's
uint8 crops, written as the unit's shards and marked complete (`UnitSink`). Here the device is
the CPU: the figure is what one actor's host side can absorb on 2 cores, against the ~100
images/s an H200's forward produces. The path before this one (float32 unit tensor on the host,
Zarr's encoder, sha256) runs in the same section for a ratio measured side by side.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REFERENCE
from pipeline.data.manifest import Unit
from pipeline.models.vit import describe_teacher
from pipeline.targets.sink import UnitSink
from pipeline.targets.store import StoreSpec, TargetStore, encode

UNIT_ROWS, UNITS, BATCH = 64, 4, 4


def _store(root: str, dtype: str, crops: bool, storage_options=None) -> TargetStore:
    spec = StoreSpec(teacher=describe_teacher(REFERENCE).to_dict(), counts=10, shift_frac=0.15, flip=True, seed=0,
                     dtype=dtype, variants=1, crop="center", corpus_id="sink", unit_rows=UNIT_ROWS)
    return TargetStore.create_or_open(root, spec, "bench", UNIT_ROWS * UNITS, storage_options, crops=crops)


def _inputs(store: TargetStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (gh, gw), D = store.spec.grid, store.spec.dim
    h, w = store.spec.teacher["img_size"]
    return (torch.full((BATCH, gh, gw, D), 0.25), torch.tensor([[0.0, 0.0, 518.0, 518.0]] * BATCH),
            torch.full((BATCH, 3, h, w), 128, dtype=torch.uint8))


def settled(measure):
    """The best of three measurements, each started with no dirty pages left by the one before
    (the kernel's write-back of one would otherwise throttle the next)."""
    def best(*args) -> float:
        results = []
        for _ in range(3):
            os.sync()
            results.append(measure(*args))
        return max(results)
    return best


def sink_rate(store: TargetStore) -> float:
    """Images/s from device-resident targets to marked units, over UNITS units."""
    targets, boxes, pixels = _inputs(store)
    units = [Unit(u, u, 0, UNIT_ROWS, u * UNIT_ROWS) for u in range(UNITS)]
    sink = UnitSink(store, torch.device("cpu"))  # an actor makes it once
    start = time.perf_counter()
    for unit in units:
        sink.begin(unit)
        for first in range(0, UNIT_ROWS, BATCH):
            sink.add(first, targets, boxes, pixels if store.has_crops else None)
        sink.end(unit)
    sink.drain()
    return UNITS * UNIT_ROWS / (time.perf_counter() - start)


def before_rate(store: TargetStore) -> float:
    """The path this replaced, as it was: a float32 unit tensor filled by `.cpu()` copies, the
    encoding on the host, Zarr's encoder for every array and a sha256 of the unit, one unit
    after the other on a writer that the loop waits for when two are pending."""
    targets, boxes, pixels = _inputs(store)
    (gh, gw), D = store.spec.grid, store.spec.dim
    start = time.perf_counter()
    for u in range(UNITS):
        out, crops = torch.zeros(UNIT_ROWS, 1, gh, gw, D), np.zeros((UNIT_ROWS, 1, *pixels.shape[1:]), np.uint8)
        for first in range(0, UNIT_ROWS, BATCH):
            out[first:first + BATCH, 0] = targets.cpu()
            crops[first:first + BATCH, 0] = pixels.numpy()
        assert torch.isfinite(out).all()
        stored, scales = encode(out, store.spec.dtype)
        parts = {"targets": stored, "boxes": np.zeros((UNIT_ROWS, 1, 4), np.float32), "crops": crops}
        if scales is not None:
            parts["scales"] = scales
        h = hashlib.sha256()
        for name in sorted(parts):
            store.group[name][u * UNIT_ROWS:(u + 1) * UNIT_ROWS] = parts[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(parts[name]).tobytes())
        store.mark_complete(u, {"digest": h.hexdigest()})
    return UNITS * UNIT_ROWS / (time.perf_counter() - start)


def write_mb_per_s(folder: Path, megabytes: int = 1024, piece: int = 128) -> float:
    """Writing warm memory into new files of `folder` in `piece` MB writes, as a unit's shards
    are written: the page cache's (and behind it the disk's) speed, the bound of any sink here."""
    data = np.ones(piece << 20, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(megabytes // piece):
        with open(folder / f"write-{i}", "wb", buffering=0) as f:
            f.write(memoryview(data))
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return megabytes * 1.048576 / seconds


def teacher_sink(work: Path, s3) -> dict:
    out = {}
    folder = work / "teacher_sink"
    shutil.rmtree(folder, ignore_errors=True)
    out["store_write_mb_per_s"] = round(settled(write_mb_per_s)(folder / "speed"), 1)
    for dtype in ("float16", "int8"):
        for where in ("local", "s3"):
            options = s3.options if where == "s3" else {}
            suffix = "_s3" if where == "s3" else ""
            root = f"{s3.bucket(f'bench-sink-{dtype}')}/cache" if where == "s3" else str(folder / dtype)
            out[f"teacher_sink_images_per_s_{dtype}{suffix}"] = round(
                settled(sink_rate)(_store(root, dtype, True, options)), 1)
    out["teacher_sink_images_per_s_float16_no_crops"] = round(
        settled(sink_rate)(_store(str(folder / "plain"), "float16", False)), 1)
    out["teacher_sink_images_per_s_float16_before"] = round(
        settled(before_rate)(_store(str(folder / "before"), "float16", True)), 1)
    out["teacher_sink_speedup_float16"] = round(out["teacher_sink_images_per_s_float16"]
                                                / out["teacher_sink_images_per_s_float16_before"], 2)
    # what writing the bytes alone allows: 2.9 MB per image with its crop, 2.1 MB without
    store = _store(str(folder / "shape"), "float16", True)
    per_image = {"float16": sum(int(np.prod(store.array(n).shape[2:])) * store.array(n).dtype.itemsize
                                for n in ("targets", "crops"))}
    per_image["float16_no_crops"] = int(np.prod(store.array("targets").shape[2:])) * 2
    for key, size in per_image.items():
        bound = out["store_write_mb_per_s"] * 1e6 / size
        out[f"teacher_sink_write_bound_images_per_s_{key}"] = round(bound, 1)
        out[f"teacher_sink_fraction_of_write_bound_{key}"] = round(out[f"teacher_sink_images_per_s_{key}"] / bound, 2)
    shutil.rmtree(folder, ignore_errors=True)
    return out
