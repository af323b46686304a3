"""The manifest: which shards exist and which global indices they hold.

Shard `s` owns the global indices `[s * capacity, s * capacity + count)`, where `capacity`
is the configured shard size and `count` the images it accepted (as img2dataset, a shard
keeps its fixed slot of keys even when some inputs were rejected). An index therefore never
changes once assigned, new shards only add indices, and every later stage can align its
own units of work (Zarr shards, training blocks) with the shards.

Layout of a shard folder (img2dataset conventions):
    00000.tar            samples `{key}.jpg` + `{key}.json`, key = zero-padded global index
    00000_stats.json     per-shard record, written after the tar: its presence marks the shard done
    manifest.json        this index, written last and atomically
    rejects.jsonl        every rejected input with its reason
    stats.json           totals for the run
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import PipelineError
from pipeline.storage import join_url, read_json, write_json

FORMAT = "phreg-manifest/1"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def sample_key(index: int) -> str:
    return f"{index:010d}"


@dataclass
class Manifest:
    url: str  # the shard folder
    corpus_id: str
    capacity: int
    counts: dict[int, int]  # shard id -> accepted images
    preprocessing: dict = field(default_factory=dict)

    @property
    def shard_ids(self) -> list[int]:
        return sorted(self.counts)

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())

    @property
    def num_rows(self) -> int:
        """Size of the global index space (the first dimension of a target store)."""
        return (max(self.counts) + 1) * self.capacity if self.counts else 0

    def rows(self, shard_id: int) -> range:
        start = shard_id * self.capacity
        return range(start, start + self.counts[shard_id])

    def locate(self, index: int) -> tuple[int, int]:
        shard_id, position = divmod(index, self.capacity)
        if self.counts.get(shard_id, 0) <= position:
            raise IndexError(f"global index {index} is not in the manifest")
        return shard_id, position

    def indices(self) -> list[int]:
        return [i for s in self.shard_ids for i in self.rows(s)]

    def tar_url(self, shard_id: int) -> str:
        return join_url(self.url, shard_name(shard_id) + ".tar")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "corpus_id": self.corpus_id,
            "capacity": self.capacity,
            "num_images": self.num_images,
            "shards": [[s, self.counts[s]] for s in self.shard_ids],
            "preprocessing": self.preprocessing,
        }

    def save(self, storage_options=None) -> None:
        write_json(join_url(self.url, "manifest.json"), self.to_dict(), storage_options)

    @classmethod
    def load(cls, url: str, storage_options=None) -> "Manifest":
        path = join_url(url, "manifest.json")
        try:
            d = read_json(path, storage_options)
        except FileNotFoundError:
            raise PipelineError(f"no manifest at {path}: run the shard stage first") from None
        if d.get("format") != FORMAT:
            raise PipelineError(f"{path} is not a manifest of this pipeline (format {d.get('format')!r})")
        return cls(url, d["corpus_id"], d["capacity"], {int(s): int(c) for s, c in d["shards"]}, d.get("preprocessing", {}))
