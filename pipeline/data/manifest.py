"""The manifest: a compact index of the corpus, and the per-shard records behind it.

Global indices. Shard `s` owns the indices `[s * capacity, s * capacity + count)` (as in
img2dataset, a shard keeps its fixed slot of keys when inputs are rejected). An index never
changes once assigned, and new shards only add indices.

Units. The index space is cut into units of `unit_rows` consecutive indices (`capacity` is a
multiple of `unit_rows`, so a unit never straddles two shards). A unit is the work unit of
every later stage: one teacher-cache task, one Zarr shard of targets, one contiguous byte
range of a tar. Shards of a few hundred images are one unit each; img2dataset tars of
10,000 images are cut into units of 250-256.

Files in a shard folder:
    manifest.json        this index: [shard, count, inputs digest] per shard; written last, atomically
    00000_stats.json     the shard's record: tar location, keys, byte offsets and sizes of each
                         image, sources, rejects, statistics. Written after the tar: its presence
                         marks the shard done (img2dataset's convention)
    00000.tar            samples `{key}.jpg` + `{key}.json` (absent for external tars, which stay
                         where they are and are read in place)
    rejects.jsonl, stats.json, duplicates.jsonl   run-level reports
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from pipeline.errors import PipelineError
from pipeline.storage import has_scheme, join_url, read_json, write_json

FORMAT = "phreg-manifest/2"
_RECORDS: OrderedDict = OrderedDict()


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def sample_key(index: int) -> str:
    return f"{index:010d}"


def unit_rows_for(capacity: int, limit: int = 256) -> int:
    """The largest divisor of `capacity` not above `limit` (units never straddle shards)."""
    return max(d for d in range(1, min(capacity, limit) + 1) if capacity % d == 0)


@dataclass(frozen=True)
class Unit:
    id: int
    shard: int
    first: int  # first position inside the shard
    count: int
    start: int  # first global index

    @property
    def rows(self) -> range:
        return range(self.start, self.start + self.count)

    @property
    def positions(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class ShardRecord:
    """Where a shard's accepted images are: tar URL, and per position key, byte offset, size."""

    shard: int
    tar: str
    keys: list[str]
    offsets: list[int]
    sizes: list[int]
    sources: list[str]

    @classmethod
    def from_dict(cls, d: dict, folder: str) -> "ShardRecord":
        tar = d["tar"] if has_scheme(d["tar"]) or d["tar"].startswith("/") else join_url(folder, d["tar"])
        return cls(d["shard"], tar, d["keys"], d["offsets"], d["sizes"], d["sources"])


@dataclass
class Manifest:
    url: str  # the shard folder
    corpus_id: str
    capacity: int
    unit_rows: int
    counts: dict[int, int]  # shard id -> accepted images (shards with none are left out)
    digests: dict[int, str] = field(default_factory=dict)  # shard id -> digest of its inputs
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

    def units(self) -> list[Unit]:
        per_shard = self.capacity // self.unit_rows
        out = []
        for s in self.shard_ids:
            for k, first in enumerate(range(0, self.counts[s], self.unit_rows)):
                count = min(self.unit_rows, self.counts[s] - first)
                out.append(Unit(s * per_shard + k, s, first, count, s * self.capacity + first))
        return out

    def record_url(self, shard_id: int) -> str:
        return join_url(self.url, f"{shard_name(shard_id)}_stats.json")

    def record(self, shard_id: int, storage_options=None) -> ShardRecord:
        """The shard's record, cached per process (a rewritten shard has a new digest)."""
        key = (self.record_url(shard_id), self.digests.get(shard_id))
        if key not in _RECORDS:
            try:
                _RECORDS[key] = ShardRecord.from_dict(read_json(key[0], storage_options), self.url)
            except FileNotFoundError:
                raise PipelineError(f"shard record {key[0]} is missing: the shard folder is incomplete") from None
            if len(_RECORDS) > 256:
                _RECORDS.popitem(last=False)
        _RECORDS.move_to_end(key)
        return _RECORDS[key]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "corpus_id": self.corpus_id,
            "capacity": self.capacity,
            "unit_rows": self.unit_rows,
            "num_images": self.num_images,
            "shards": [[s, self.counts[s], self.digests.get(s, "")] for s in self.shard_ids],
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
            raise PipelineError(f"{path} is not a manifest of this pipeline (format {d.get('format')!r}, expected {FORMAT})")
        return cls(
            url, d["corpus_id"], d["capacity"], d["unit_rows"],
            {int(s): int(c) for s, c, _ in d["shards"]}, {int(s): g for s, _, g in d["shards"]}, d.get("preprocessing", {}),
        )
