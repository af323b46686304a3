"""Raw inputs to shards: list, plan, and build each shard independently.

Two kinds of input:
- image files (folders, fsspec globs): each planned shard of `shard_size` inputs is built
  by `build_shard`, which turns every input into an upright RGB JPEG or a recorded
  rejection, writes the tar, then the shard's record;
- existing WebDataset tars (e.g. from img2dataset): each tar is one shard, read in place.
  `index_external_tar` validates every image without re-encoding it and writes the record.

Planning is pure (`plan_shards`) so that it can be checked, and timed, on millions of
entries without touching storage.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
import time
from collections import Counter

from pipeline.config import ShardConfig
from pipeline.data.images import Rejected, encode_jpeg, normalize_image
from pipeline.data.manifest import sample_key, shard_name
from pipeline.data.shards import IMAGE_EXTENSIONS, Member, Sample, split_name, write_tar
from pipeline.errors import PipelineError
from pipeline.storage import has_scheme, join_url, read_bytes, url_to_fs, write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
GLOB_CHARS = "*?["


def list_inputs(sources: list[str], storage_options=None) -> list[str]:
    """Every input file, sorted. Folders are searched recursively for image (or .tar)
    suffixes; a glob keeps all its matches (a text file named .jpg is rejected, not skipped)."""
    found: set[str] = set()
    for source in sources:
        fs, path = url_to_fs(source, storage_options)
        if any(c in path for c in GLOB_CHARS):
            paths = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if p.lower().endswith((*IMAGE_SUFFIXES, ".tar"))]
        elif fs.isfile(path):
            paths = [path]
        else:
            raise PipelineError(f"input not found: {source}")
        found.update(fs.unstrip_protocol(p) if has_scheme(source) else p for p in paths)
    return sorted(found)


def input_kind(inputs: list[str]) -> str:
    tars = sum(i.endswith(".tar") for i in inputs)
    if tars and tars != len(inputs):
        raise PipelineError(f"inputs mix {tars} WebDataset tars with {len(inputs) - tars} image files; shard them separately")
    return "tars" if tars else "images"


def digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def plan_shards(inputs: list[str], per_shard: int, first_id: int = 0) -> dict[int, list[str]]:
    """Consecutive groups of `per_shard` inputs, numbered from `first_id`."""
    return {first_id + i: inputs[start:start + per_shard] for i, start in enumerate(range(0, len(inputs), per_shard))}


def resume_state(plan: dict[int, list[str]], done_digests: dict[int, str]) -> list[int]:
    """Shards of `plan` still to build, given the digests of finished shards. A finished shard
    built from other inputs is an error: rebuilding it would change global indices."""
    changed = [s for s, d in done_digests.items() if s in plan and d != digest(plan[s])]
    if changed:
        raise PipelineError(
            f"{len(changed)} finished shard(s) (first: {changed[:5]}) were built from other inputs than this run "
            f"would give them. Use shard.mode=extend to add new inputs as new shards, shard.mode=overwrite "
            f"to start over, or another shard.output folder"
        )
    return [s for s in plan if s not in done_digests]


def preprocessing(cfg: ShardConfig, kind: str) -> dict:
    """What the shard stage did to the pixels (recorded in the manifest)."""
    if kind == "tars":
        return {"format": "as in the input tars (not re-encoded)", "max_pixels": cfg.max_pixels, "min_side": cfg.min_side,
                "orientation": "applied when decoding"}
    return {"format": "jpg", "jpeg_quality": cfg.jpeg_quality, "max_side": cfg.max_side, "min_side": cfg.min_side,
            "max_pixels": cfg.max_pixels, "orientation": "exif applied",
            "colour": "RGB, 16-bit scaled to 8-bit, alpha composited over white"}


def corpus_id(cfg: ShardConfig, kind: str, capacity: int, first_shard_inputs: list[str]) -> str:
    """Names the corpus: stable when shards are added, different for other inputs or pixels."""
    blob = json.dumps({"pre": preprocessing(cfg, kind), "capacity": capacity, "first": digest(first_shard_inputs)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_url(out_url: str, shard_id: int) -> str:
    return join_url(out_url, f"{shard_name(shard_id)}_stats.json")


def _record(shard_id, tar, inputs, accepted, members, rejects, bytes_in, bytes_out, t0) -> dict:
    """`accepted`: (source, sha256) per image, aligned with `members` (tar index)."""
    return {
        "shard": shard_id,
        "tar": tar,
        "count": len(accepted),
        "keys": [m.key for m in members],
        "offsets": [m.offset for m in members],
        "sizes": [m.size for m in members],
        "sources": [source for source, _ in accepted],
        "sha256": [sha for _, sha in accepted],
        "inputs": inputs,
        "inputs_digest": digest(inputs),
        "rejects": rejects,
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def build_shard(shard_id: int, inputs: list[str], cfg: ShardConfig, capacity: int, out_url: str, storage_options=None) -> dict:
    """Image files -> one tar of normalised JPEGs + its record."""
    t0 = time.perf_counter()
    samples, accepted, rejects, bytes_in = [], [], [], 0
    for source in inputs:
        try:
            try:
                data = read_bytes(source, storage_options)
            except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
                raise Rejected("unreadable", f"{type(e).__name__}: {e}") from None
            bytes_in += len(data)
            img, orig = normalize_image(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_side=cfg.max_side)
        except Rejected as r:
            rejects.append({"source": source, "reason": r.reason, "detail": r.detail})
            continue
        index = shard_id * capacity + len(samples)
        meta = {"index": index, "source": source, "width": img.width, "height": img.height, "original": orig}
        samples.append(Sample(sample_key(index), encode_jpeg(img, cfg.jpeg_quality), meta))
        accepted.append((source, hashlib.sha256(data).hexdigest()))
    tar = shard_name(shard_id) + ".tar"
    bytes_out, members = write_tar(join_url(out_url, tar), samples, storage_options) if samples else (0, [])
    record = _record(shard_id, tar, inputs, accepted, members, rejects, bytes_in, bytes_out, t0)
    write_json(record_url(out_url, shard_id), record, storage_options)
    return record


def safe_key(key: str) -> bool:
    parts = key.split("/")
    return bool(key) and not key.startswith("/") and ".." not in parts and all(c.isprintable() for c in key)


def index_external_tar(shard_id: int, tar_url: str, cfg: ShardConfig, out_url: str, storage_options=None) -> dict:
    """An existing WebDataset tar -> its record, in one streaming pass. Every image is decoded
    once to validate it; its bytes stay where they are."""
    t0 = time.perf_counter()
    fs, path = url_to_fs(tar_url, storage_options)
    accepted, members, rejects, keys, unsafe = [], [], [], {}, set()
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if not safe_key(key):  # never let a key name a path outside the shard
                    if key not in unsafe:
                        unsafe.add(key)
                        rejects.append({"source": f"{tar_url}#{key!r}", "reason": "unsafe_key",
                                        "detail": "absolute, '..' or control characters in the sample key"})
                    continue
                has_image = keys.setdefault(key, False)
                if ext not in IMAGE_EXTENSIONS or has_image:
                    continue
                keys[key] = True
                source = f"{tar_url}#{key}"
                data = tar.extractfile(info).read()
                try:
                    normalize_image(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_side=None)
                except Rejected as r:
                    rejects.append({"source": source, "reason": r.reason, "detail": r.detail})
                    continue
                members.append(Member(key, ext, info.offset_data, info.size))
                accepted.append((source, hashlib.sha256(data).hexdigest()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PipelineError(f"{tar_url} is not a readable tar: {type(e).__name__}: {e}") from None
    rejects += [{"source": f"{tar_url}#{k}", "reason": "no_image", "detail": "sample has no image member"}
                for k, seen in keys.items() if not seen]
    record = _record(shard_id, tar_url, [tar_url], accepted, members, rejects, fs.size(path), 0, t0)
    write_json(record_url(out_url, shard_id), record, storage_options)
    return record
