"""WebDataset tar files: write our own, index any, and read images back by byte range.

Readers never parse a whole tar: a shard record holds the byte offset and size of each
image, so a unit of consecutive images is one ranged read (one GET on object storage).
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence


from pipeline.data.manifest import ShardRecord
from pipeline.storage import url_to_fs, write_bytes_atomic

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    key: str
    image: bytes  # encoded image
    meta: dict  # the sample's .json: global index, source, sizes


@dataclass(frozen=True)
class Member:
    key: str
    ext: str
    offset: int  # of the data, in bytes from the start of the tar
    size: int


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(fileobj: BinaryIO) -> Iterator[Member]:
    """Regular-file members of a tar, read as a stream (the tar is never held in memory)."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if info.isfile():
                key, ext = split_name(info.name)
                yield Member(key, ext, info.offset_data, info.size)


def image_members(members: Iterator[Member]) -> list[Member]:
    """The image member of each sample, in tar order (the first with an image extension)."""
    chosen: dict[str, Member] = {}
    for m in members:
        if m.ext in IMAGE_EXTENSIONS and m.key not in chosen:
            chosen[m.key] = m
    return list(chosen.values())


def write_tar(url: str, samples: list[Sample], storage_options=None) -> tuple[int, list[Member]]:
    """Write a shard in one atomic put. Returns its size and the index of its images."""
    import webdataset as wds  # here, not at the top: it imports torch, which the shard driver never needs

    buf = io.BytesIO()
    # mtime fixed so that a recomputed shard is byte-identical
    with wds.TarWriter(buf, mtime=0.0) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "jpg": s.image, "json": json.dumps(s.meta, sort_keys=True).encode()})
    data = buf.getvalue()
    write_bytes_atomic(url, data, storage_options)
    return len(data), image_members(index_tar(io.BytesIO(data)))


def fetch_images(record: ShardRecord, positions: Sequence[int], storage_options=None) -> list[bytes]:
    """Encoded images at `positions` of a shard, in the order given. Nearby images are read
    as one span; scattered ones as concurrent ranged reads."""
    if not positions:
        return []
    fs, path = url_to_fs(record.tar, storage_options)
    starts = [record.offsets[p] for p in positions]
    ends = [record.offsets[p] + record.sizes[p] for p in positions]
    lo, hi = min(starts), max(ends)
    if hi - lo <= 2 * sum(e - s for s, e in zip(starts, ends)) + (1 << 20):
        span = fs.cat_file(path, start=lo, end=hi)
        return [span[s - lo:e - lo] for s, e in zip(starts, ends)]
    return fs.cat_ranges([path] * len(positions), starts, ends)


def read_images(manifest, indices: Sequence[int], storage_options=None) -> list[bytes]:
    """Encoded images of global `indices`, in the order given (grouped into one read per shard)."""
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for order, index in enumerate(indices):
        shard, position = manifest.locate(index)
        by_shard.setdefault(shard, []).append((order, position))
    out: list[bytes] = [b""] * len(indices)
    for shard, items in by_shard.items():
        images = fetch_images(manifest.record(shard, storage_options), [p for _, p in items], storage_options)
        for (order, _), data in zip(items, images):
            out[order] = data
    return out
