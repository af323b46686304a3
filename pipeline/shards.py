"""WebDataset shard files: write one from samples, read one back as samples."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import webdataset as wds

from pipeline.storage import read_bytes, write_bytes_atomic


@dataclass
class Sample:
    key: str
    image: bytes  # encoded image
    meta: dict  # the sample's .json: global index, source, sizes


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def write_tar(url: str, samples: list[Sample], storage_options=None) -> int:
    """Write the shard in one atomic put (objects appear whole; local files are renamed)."""
    buf = io.BytesIO()
    # mtime fixed so that a recomputed shard is byte-identical
    with wds.TarWriter(buf, mtime=0.0) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "jpg": s.image, "json": json.dumps(s.meta, sort_keys=True).encode()})
    data = buf.getvalue()
    write_bytes_atomic(url, data, storage_options)
    return len(data)


def parse_tar(data: bytes) -> list[Sample]:
    """Samples of a WebDataset tar in file order. The image is the first member with an image
    extension; a sample without one is skipped."""
    grouped: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            grouped.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    samples = []
    for key, parts in grouped.items():
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            continue
        meta = json.loads(parts["json"]) if "json" in parts else {}
        samples.append(Sample(key, image, meta))
    return samples


def read_tar(url: str, storage_options=None) -> list[Sample]:
    return parse_tar(read_bytes(url, storage_options))
