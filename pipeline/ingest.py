"""Raw images to WebDataset shards: list inputs, then build each shard independently.

`build_shard` is the unit of work of the shard stage: it reads its inputs, turns each
into an upright RGB JPEG or a recorded rejection, writes the tar and then its stats file,
whose presence marks the shard done.
"""
from __future__ import annotations

import hashlib
import json
import time

from pipeline.config import ShardConfig
from pipeline.errors import PipelineError
from pipeline.images import Rejected, encode_jpeg, normalize_image
from pipeline.manifest import sample_key, shard_name
from pipeline.shards import Sample, write_tar
from pipeline.storage import has_scheme, join_url, read_bytes, url_to_fs, write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
GLOB_CHARS = "*?["


def list_inputs(sources: list[str], storage_options=None) -> list[str]:
    """Every input file, sorted. Folders are searched recursively for image suffixes; a glob
    keeps all its matches (a text file named .jpg is then rejected, not skipped)."""
    found: set[str] = set()
    for source in sources:
        fs, path = url_to_fs(source, storage_options)
        if any(c in path for c in GLOB_CHARS):
            paths = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if p.lower().endswith(IMAGE_SUFFIXES)]
        elif fs.isfile(path):
            paths = [path]
        else:
            raise PipelineError(f"input not found: {source}")
        found.update(fs.unstrip_protocol(p) if has_scheme(source) else p for p in paths)
    return sorted(found)


def digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def preprocessing(cfg: ShardConfig) -> dict:
    """What the shard stage did to the pixels (recorded in the manifest)."""
    return {
        "format": "jpg",
        "jpeg_quality": cfg.jpeg_quality,
        "max_side": cfg.max_side,
        "min_side": cfg.min_side,
        "max_pixels": cfg.max_pixels,
        "orientation": "exif applied",
        "colour": "RGB, 16-bit scaled to 8-bit, alpha composited over white",
    }


def corpus_id(cfg: ShardConfig, first_shard_inputs: list[str]) -> str:
    """Names the corpus: stable when shards are added, different for other inputs or pixels."""
    blob = json.dumps({"pre": preprocessing(cfg), "capacity": cfg.shard_size, "first": digest(first_shard_inputs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stats_url(out_url: str, shard_id: int) -> str:
    return join_url(out_url, f"{shard_name(shard_id)}_stats.json")


def build_shard(shard_id: int, inputs: list[str], cfg: ShardConfig, out_url: str, storage_options=None) -> dict:
    t0 = time.perf_counter()
    samples, rejects, sources, bytes_in = [], [], [], 0
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
        index = shard_id * cfg.shard_size + len(samples)
        meta = {"index": index, "source": source, "width": img.width, "height": img.height, "original": orig}
        samples.append(Sample(sample_key(index), encode_jpeg(img, cfg.jpeg_quality), meta))
        sources.append(source)
    bytes_out = write_tar(join_url(out_url, shard_name(shard_id) + ".tar"), samples, storage_options) if samples else 0
    stats = {
        "shard": shard_id,
        "count": len(samples),
        "inputs": len(inputs),
        "inputs_digest": digest(inputs),
        "sources": sources,
        "rejects": rejects,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(stats_url(out_url, shard_id), stats, storage_options)
    return stats
