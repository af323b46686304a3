"""What the shard stage's driver keeps of the shards' records, and the duplicates among them.

A record (`<shard>_stats.json`, about 50 KB at 256 images) lists each image's key, byte range,
source and sha256; at 10M images the records are ~2 GB of JSON. The driver reads them in
batches and keeps only what planning and the run's report need.
"""
from __future__ import annotations

import numpy as np

from pipeline.data.ingest import record_url
from pipeline.storage import list_names, read_json_many


# Per-image fields of a shard's record that only readers use (they read the records
# themselves): the driver does not keep them.
READER_FIELDS = ("keys", "offsets", "sizes")
RECORD_BATCH = 512  # records read at once (about 50 KB each at 256 images): bounds the raw bytes held


def finished_records(out: str, shard_ids, storage_options) -> dict[int, dict]:
    """Records of the planned shards that are done: one listing, then batches of reads.

    The driver keeps what it uses of each (`driver_record`): digest, counts, rejects, and its
    inputs shared with the plan ({shard: inputs}) when they are equal. Resuming 10M images in
    shards of 256 kept 8.5 GB with whole records, 3.3 GB with names shared and the hashes as
    strings, and keeps far less with 64-bit hash prefixes (bench `scale`)."""
    present = set(list_names(out, storage_options))
    urls = [(s, record_url(out, s)) for s in shard_ids]
    urls = [(s, u) for s, u in urls if u.rsplit("/", 1)[-1] in present]
    plan = shard_ids if isinstance(shard_ids, dict) else {}
    records = {}
    for i in range(0, len(urls), RECORD_BATCH):
        batch = urls[i:i + RECORD_BATCH]
        loaded = read_json_many([u for _, u in batch], storage_options)
        for s, u in batch:
            records[s] = driver_record(loaded.pop(u), plan.get(s))
    return records


def driver_record(record: dict, planned: list[str] | None) -> dict:
    """What the driver keeps of a record: no per-image names or byte ranges, and of each
    accepted image's sha256 its first 64 bits (`prefixes`), which find the candidates for
    `duplicates` (the full hashes and sources are read again for those only)."""
    for name in (*READER_FIELDS, "sources"):
        record.pop(name, None)
    hashes = record.pop("sha256", [])
    record["prefixes"] = np.frombuffer(bytes.fromhex("".join(h[:16] for h in hashes)), dtype=">u8").astype(np.uint64)
    inputs = record.get("inputs")
    if inputs is not None and planned is not None and inputs == planned:
        record["inputs"] = planned
    return record


def duplicates(out: str, records: dict[int, dict], storage_options) -> list[dict]:
    """Accepted images with equal bytes: {"sha256", "sources"} per group, groups and sources
    in the order the images come in the corpus. Equal 64-bit prefixes find the candidates;
    only their shards' records are read again, and only the candidates' entries kept."""
    shards = sorted(s for s in records if len(records[s]["prefixes"]))
    if not shards:
        return []
    prefixes = np.concatenate([records[s]["prefixes"] for s in shards])
    sizes = [len(records[s]["prefixes"]) for s in shards]
    owner, position = np.repeat(shards, sizes), np.concatenate([np.arange(n) for n in sizes])
    order = np.argsort(prefixes, kind="stable")
    equal = prefixes[order][1:] == prefixes[order][:-1]
    repeated = np.zeros(len(order), dtype=bool)
    repeated[1:] |= equal
    repeated[:-1] |= equal
    candidates = np.sort(order[repeated])  # in corpus order: shard, then position
    found: dict[int, tuple[str, str]] = {}  # candidate -> (sha256, source)
    needed = np.unique(owner[candidates]).tolist()
    for i in range(0, len(needed), RECORD_BATCH):
        batch = needed[i:i + RECORD_BATCH]
        loaded = read_json_many([record_url(out, s) for s in batch], storage_options)
        mine = candidates[np.isin(owner[candidates], batch)]
        for k in mine.tolist():
            record = loaded[record_url(out, int(owner[k]))]
            found[k] = (record["sha256"][position[k]], record["sources"][position[k]])
    groups: dict[str, list[str]] = {}
    for k in candidates.tolist():
        sha, source = found[k]
        groups.setdefault(sha, []).append(source)
    return [{"sha256": h, "sources": v} for h, v in groups.items() if len(v) > 1]
