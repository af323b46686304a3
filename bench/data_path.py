"""The `data_path` section of `make bench`: what each stage's readers deliver without a model.

At the reference size, DINOv2 ViT-B/14 at 518 px: 37 x 37 x 768 float16 targets, and JPEG
photographs of 500 x 375 and 640 x 480 (Flickr30k's sizes) made from the bundled sample
photographs and sharded as the shard stage does. The consumer takes each batch and drops
it, so a figure is the readers' capacity: the most a GPU could be fed. One reader process is
one CPU core busy; the consumer (and, for S3, the moto endpoint, which runs in this process)
uses the rest of the machine.
"""
from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import REFERENCE, vitb_features
from pipeline.config import ShardConfig
from pipeline.data.images import Preprocess, crop_box, decode_rgb
from pipeline.data.ingest import build_shard
from pipeline.data.manifest import Manifest
from pipeline.data.readers import in_order
from pipeline.data.sample_corpus import base_photographs
from pipeline.data.shards import fetch_images
from pipeline.models.vit import describe_teacher
from pipeline.storage import join_url, write_bytes_atomic
from pipeline.targets.store import CODECS, StoreSpec, TargetStore
from pipeline.targets.teacher_targets import UnitViews, view_jobs
from pipeline.training.pairs import CachedPairs, StepBatches

IMAGES, UNIT_ROWS, BATCH, BATCH_IMAGES = 192, 64, 8, 4
SIZES = ((500, 375), (640, 480))


def sized_photographs(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`n` JPEGs of exactly the SIZES in turn: random crops of the bundled photographs."""
    rng = np.random.default_rng(seed)
    bases = base_photographs()
    out = []
    for i in range(n):
        name, arr = bases[i % len(bases)]
        img = Image.fromarray(arr).convert("RGB")
        (w, h), (tw, th) = img.size, SIZES[i % len(SIZES)]
        scale = min(w / tw, h / th) * rng.uniform(0.7, 1.0)
        x0, y0 = rng.uniform(0, w - tw * scale), rng.uniform(0, h - th * scale)
        crop = img.resize((tw, th), Image.Resampling.LANCZOS, box=(x0, y0, x0 + tw * scale, y0 + th * scale))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append((f"{i:04d}_{name}.jpg", buf.getvalue()))
    return out


def reference_features(work: Path, n: int = 4) -> np.ndarray:
    """Final-layer ViT-B/14 features of `n` photographs at 518 px (random-init weights), kept
    in the work folder: real features compress as real stores do (random numbers would not)."""
    path = work / "data_path_features.npy"
    if not path.exists():
        np.save(path, vitb_features(n).numpy())
    return np.load(path)


def reference_corpus(root: str, storage_options=None, unit_rows: int = UNIT_ROWS, images: int = IMAGES) -> Manifest:
    """`images` photographs in shards of `unit_rows` (one unit each), without Ray."""
    photos, shards = join_url(root, "photos"), join_url(root, "shards")
    inputs = []
    for name, data in sized_photographs(images):
        inputs.append(join_url(photos, name))
        write_bytes_atomic(inputs[-1], data, storage_options)
    counts = {}
    for s in range(images // unit_rows):
        part = inputs[s * unit_rows:(s + 1) * unit_rows]
        counts[s] = build_shard(s, part, ShardConfig(), unit_rows, shards, storage_options)["count"]
    Manifest(shards, "data-path", unit_rows, unit_rows, counts).save(storage_options)
    return Manifest.load(shards, storage_options)


def reference_store(root: str, manifest: Manifest, features: np.ndarray, storage_options=None,
                    codec: str = "none", crops: bool = False) -> TargetStore:
    """A complete float16 store whose rows are the reference features in turn, centre crops
    (stored beside them with `crops`, as the teacher-cache stage stores them)."""
    spec = StoreSpec(teacher=describe_teacher(REFERENCE).to_dict(), counts=10, shift_frac=0.15, flip=True, seed=0,
                     dtype="float16", variants=1, crop="center", corpus_id=manifest.corpus_id, unit_rows=manifest.unit_rows)
    store = TargetStore.create_or_open(root, spec, manifest.url, manifest.num_rows, storage_options, codec=codec,
                                       crops=crops)
    pre = Preprocess.from_dict(spec.teacher["preprocess"])
    for unit in manifest.units():
        images = [decode_rgb(d) for d in fetch_images(manifest.record(unit.shard, storage_options), unit.positions,
                                                      storage_options)]
        boxes = np.array([[crop_box(*img.size, pre.size, "center")] for img in images])
        pixels = np.stack([pre.pixels(img, box[0]).numpy()[None] for img, box in zip(images, boxes)]) if crops else None
        feats = torch.from_numpy(np.stack([features[i % len(features)] for i in range(unit.count)])[:, None])
        store.mark_complete(unit.id, {"images": unit.count, **store.write_unit(unit, feats, boxes, pixels)})
    return store


def store_bytes_per_sample(store: TargetStore) -> int:
    """What a distill reader must read per sample: one target row, plus its crop if stored."""
    names = ["targets", *(["crops"] if store.has_crops else [])]
    return sum(int(np.prod(store.group[n].shape[2:])) * store.group[n].dtype.itemsize for n in names)


def raw_read_mb_per_s(store: TargetStore, reuse: bool = False, repeats: int = 3) -> float:
    """Reading the store's files whole from the page cache, one thread: plain reads into new
    memory (what reading bytes costs a reader), or with `reuse` into one buffer kept warm (the
    page cache's copy speed alone)."""
    files = [f for f in Path(store.zarr_url).rglob("*") if f.is_file() and f.name != "zarr.json"]
    size = sum(f.stat().st_size for f in files)
    buffer = bytearray(max(f.stat().st_size for f in files))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(buffer) if reuse else fh.read()
        times.append(time.perf_counter() - start)
    return size / min(times) / 1e6


def rate(batches, samples_of, warmup: int = 3) -> float:
    """Samples per second of an iterator of batches, timed from the end of its `warmup`-th
    batch (start-up, such as forking reader processes, is not the steady state)."""
    count, start = 0, None
    for i, batch in enumerate(batches):
        if i == warmup - 1:
            start = time.perf_counter()
        elif i >= warmup:
            count += samples_of(batch)
    return count / (time.perf_counter() - start)


class _OnHost:
    """A load that also does on the host what the device does now: normalise to float32
    and widen the targets to float32 (the data path before uint8 hand-over)."""

    def __init__(self, load, preprocess: Preprocess, pixels: int = 0, targets: int | None = None):
        self.load, self.preprocess, self.pixels, self.targets = load, preprocess, pixels, targets

    def __call__(self, i: int) -> list[tuple]:
        out = []
        for sample in self.load(i):
            sample = list(sample)
            sample[self.pixels] = self.preprocess.normalize(sample[self.pixels])
            if self.targets is not None:
                sample[self.targets] = sample[self.targets].float()
            out.append(tuple(sample))
        return out


def distill_rate(manifest: Manifest, store: TargetStore, storage_options, readers: int, on_host: bool = False,
                 epochs: int = 3) -> float:
    """Samples/s of the distill readers over `epochs` of one rank's plan."""
    pre = Preprocess.from_dict(store.spec.teacher["preprocess"])
    plan = StepBatches(CachedPairs(manifest, pre, storage_options, store=store), 0, 0, 1, BATCH, epochs)
    load = _OnHost(plan, pre, 0, 1) if on_host else plan
    return rate(in_order(load, len(plan), readers, 4), lambda batch: len(batch[1]))


def teacher_rate(manifest: Manifest, spec: StoreSpec, storage_options, readers: int, on_host: bool = False,
                 passes: int = 2) -> float:
    """Images/s of the teacher-cache readers over the corpus `passes` times (V=1)."""
    pre = Preprocess.from_dict(spec.teacher["preprocess"])
    jobs = view_jobs(manifest.units(), spec.variants, BATCH_IMAGES) * passes
    load = UnitViews(manifest, spec, pre, jobs, storage_options)
    load = _OnHost(load, pre, 2) if on_host else load
    return rate(in_order(load, len(jobs), readers, 2), lambda batch: len(batch[0]))


def codec_costs(root: Path, manifest: Manifest, features: np.ndarray) -> dict:
    """Bytes per target and milliseconds to read one target row, per codec (float16)."""
    out = {}
    for codec in CODECS:
        store = reference_store(str(root / codec), manifest, features, codec=codec)
        files = [f for f in (Path(store.zarr_url) / "targets").rglob("*") if f.is_file() and f.name != "zarr.json"]
        out[f"data_path_target_bytes_{codec}"] = int(sum(f.stat().st_size for f in files) / manifest.num_images)
        rows = np.random.default_rng(0).permutation(manifest.num_images)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for r in rows:
                store.read_rows(np.array([r]), 0)
            times.append((time.perf_counter() - start) / len(rows))
        out[f"data_path_target_read_ms_{codec}"] = round(1e3 * min(times), 3)
    return out


def best(measure, repeats: int = 3) -> float:
    """The best of `repeats` measurements: other tenants of this machine only slow one down."""
    return round(max(measure() for _ in range(repeats)), 1)


def moto_range_read_ms(s3, megabytes: int) -> float:
    """Milliseconds for a 2 MB ranged GET from an object of `megabytes` on the moto endpoint."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options)
    path = f"{s3.bucket(f'bench-range-{megabytes}')}/object"
    fs.pipe(path, bytes(megabytes << 20))
    start = time.perf_counter()
    for _ in range(5):
        fs.cat_file(path, start=1 << 20, end=3 << 20)
    return round((time.perf_counter() - start) / 5 * 1e3, 1)


def crop_reader_figures(made: list, with_crops: dict[str, TargetStore]) -> dict:
    """Distill readers of stores with crops (nothing decoded: a target row and a crop row per
    sample), against the bytes bound: bytes per sample over the speed of plain reads of the
    store's files (and over the page cache's copy speed, the bound no reader reaches)."""
    out = {}
    for where, suffix, options, manifest, _ in made:
        if suffix not in with_crops:
            continue
        store = with_crops[suffix]
        for readers, key in ((1, ""), (2, "_2_readers")):
            out[f"distill_reader_samples_per_s_crops{key}{suffix}"] = best(lambda: distill_rate(manifest, store, options, readers))
        if where == "local":
            out["distill_reader_samples_per_s_crops_thread"] = best(lambda: distill_rate(manifest, store, options, 0))
            per_sample = store_bytes_per_sample(store)
            out["distill_reader_bytes_per_sample_crops"] = per_sample
            out["cache_crop_bytes_per_image"] = per_sample - store_bytes_per_sample(made[0][4])
            out["store_plain_read_mb_per_s"] = round(max(raw_read_mb_per_s(store) for _ in range(3)), 1)
            out["store_warm_copy_mb_per_s"] = round(max(raw_read_mb_per_s(store, reuse=True) for _ in range(3)), 1)
            out["distill_reader_bytes_bound_samples_per_s"] = round(out["store_plain_read_mb_per_s"] * 1e6 / per_sample, 1)
            out["distill_reader_copy_bound_samples_per_s"] = round(out["store_warm_copy_mb_per_s"] * 1e6 / per_sample, 1)
            rate = out["distill_reader_samples_per_s_crops"]
            out["distill_reader_fraction_of_bytes_bound"] = round(rate / out["distill_reader_bytes_bound_samples_per_s"], 2)
            out["distill_reader_fraction_of_copy_bound"] = round(rate / out["distill_reader_copy_bound_samples_per_s"], 2)
        out[f"distill_reader_scaling_2_readers_crops{suffix}"] = round(
            out[f"distill_reader_samples_per_s_crops_2_readers{suffix}"] / out[f"distill_reader_samples_per_s_crops{suffix}"], 2)
    return out


def data_path(work: Path, s3) -> dict:
    """Readers' capacity at the reference size: 1 and 2 reader processes, local store and S3
    (`*_s3`), distill and teacher-cache; then, locally, what each technique changes (a thread
    instead of a process, float work on the host, a zstd store): the path before this one is
    `*_thread_on_host_zstd` (distill) and `*_thread_on_host` (teacher cache). On S3 also with
    8-row units (`*_s3_8_row_units`): moto answers a ranged GET in a time that grows with the
    object's size (`moto_range_read_ms_*`), which real object stores do not."""
    features = reference_features(work)
    out = {}
    folder = work / "data_path"
    shutil.rmtree(folder, ignore_errors=True)
    layouts = (("local", UNIT_ROWS, ""), ("s3", UNIT_ROWS, "_s3"), ("s3", 8, "_s3_8_row_units"))
    made, with_crops = [], {}  # everything is written first: the disk's write-back then no longer competes with the readers
    for where, unit_rows, suffix in layouts:
        options = s3.options if where == "s3" else {}
        root = f"{s3.bucket(f'bench-data-path-{unit_rows}')}/data" if where == "s3" else str(folder / "local")
        manifest = reference_corpus(root, options, unit_rows)
        made.append((where, suffix, options, manifest, reference_store(join_url(root, "cache"), manifest, features, options)))
        if unit_rows == UNIT_ROWS:
            with_crops[suffix] = reference_store(join_url(root, "cache-crops"), manifest, features, options, crops=True)
    zstd = reference_store(str(folder / "zstd"), made[0][3], features, codec="zstd")
    os.sync()
    out.update(crop_reader_figures(made, with_crops))
    for where, suffix, options, manifest, store in made:
        for readers, key in ((1, ""), (2, "_2_readers")):
            out[f"distill_reader_samples_per_s{key}{suffix}"] = best(lambda: distill_rate(manifest, store, options, readers))
            out[f"teacher_reader_images_per_s{key}{suffix}"] = best(lambda: teacher_rate(manifest, store.spec, options, readers))
        if where == "local":
            out["distill_reader_samples_per_s_thread"] = best(lambda: distill_rate(manifest, store, options, 0))
            out["distill_reader_samples_per_s_on_host"] = best(lambda: distill_rate(manifest, store, options, 1, on_host=True))
            out["distill_reader_samples_per_s_zstd"] = best(lambda: distill_rate(manifest, zstd, options, 1))
            out["distill_reader_samples_per_s_thread_on_host_zstd"] = best(
                lambda: distill_rate(manifest, zstd, options, 0, on_host=True))
            out["teacher_reader_images_per_s_thread"] = best(lambda: teacher_rate(manifest, store.spec, options, 0))
            out["teacher_reader_images_per_s_thread_on_host"] = best(
                lambda: teacher_rate(manifest, store.spec, options, 0, on_host=True))
            out.update(codec_costs(folder / "codecs", manifest, features))
    out["moto_range_read_ms_3mb_object"] = moto_range_read_ms(s3, 3)
    out["moto_range_read_ms_134mb_object"] = moto_range_read_ms(s3, 134)
    for kind in ("distill", "teacher"):
        rate_key = "distill_reader_samples_per_s" if kind == "distill" else "teacher_reader_images_per_s"
        for _, _, suffix in layouts:
            out[f"{kind}_reader_scaling_2_readers{suffix}"] = round(out[f"{rate_key}_2_readers{suffix}"] / out[f"{rate_key}{suffix}"], 2)
    return out
