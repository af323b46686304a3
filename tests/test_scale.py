"""The control plane at corpus scale (bench `scale`): what the shard driver keeps of the
finished shards' records when it resumes. Fast, no Ray."""
from __future__ import annotations

import json

import pytest

from pipeline.data import records as shard_records
from pipeline.data.ingest import digest, plan_shards, record_url, resume_state
from pipeline.data.records import READER_FIELDS, finished_records
from pipeline.errors import PipelineError


def _record(s: int, inputs: list[str], rejected: set[str]) -> dict:
    """A record with every field the shard stage writes."""
    accepted = [i for i in inputs if i not in rejected]
    return {
        "shard": s, "tar": f"{s:05d}.tar", "count": len(accepted), "keys": [f"{s * 8 + k:010d}" for k in range(len(accepted))],
        "offsets": [512 * (k + 1) for k in range(len(accepted))], "sizes": [400 + k for k in range(len(accepted))],
        "sources": accepted, "sha256": [f"{s:032x}{k:032x}" for k in range(len(accepted))], "inputs": inputs,
        "inputs_digest": digest(inputs), "rejects": [{"input": i, "reason": "corrupt"} for i in sorted(rejected)],
        "rejects_by_reason": {"corrupt": len(rejected)} if rejected else {}, "bytes_in": 1000, "bytes_out": 900, "seconds": 0.1,
    }


def test_finished_records_keep_what_the_driver_uses_and_share_names(tmp_path, monkeypatch):
    out = str(tmp_path)
    plan = plan_shards([f"/photos/{i:04d}.jpg" for i in range(20)], 8)  # shards 0, 1 (8 each) and 2 (4)
    written = {0: _record(0, plan[0], set()), 1: _record(1, plan[1], {plan[1][3]})}  # shard 2 not built yet
    for s, record in written.items():
        (tmp_path / record_url(out, s).rsplit("/", 1)[-1]).write_text(json.dumps(record, indent=1, sort_keys=True))

    done = finished_records(out, plan, None)
    assert set(done) == {0, 1}
    for s, record in written.items():
        kept = {k: v for k, v in done[s].items() if k != "prefixes"}
        assert kept == {k: v for k, v in record.items() if k not in (*READER_FIELDS, "sources", "sha256")}
        # each accepted image's sha256 as its first 64 bits
        assert done[s]["prefixes"].tolist() == [int(h[:16], 16) for h in record["sha256"]]
    # names are the plan's string objects, not copies
    assert done[0]["inputs"] is plan[0] and done[1]["inputs"] is plan[1]
    assert resume_state(plan, {s: r["inputs_digest"] for s, r in done.items()}) == [2]

    # shard ids without a plan (extend mode), and records read in batches of one: the same records
    monkeypatch.setattr(shard_records, "RECORD_BATCH", 1)
    again = finished_records(out, [0, 1, 2], None)
    assert again.keys() == done.keys()
    for s in done:
        assert {k: v for k, v in again[s].items() if k != "prefixes"} == {k: v for k, v in done[s].items() if k != "prefixes"}
        assert again[s]["prefixes"].tolist() == done[s]["prefixes"].tolist()
    # a finished shard built from other inputs is still caught by its digest
    other = plan_shards([f"/photos/{i:04d}.jpg" for i in range(1, 21)], 8)
    changed = finished_records(out, other, None)
    assert changed[0]["inputs"] == plan[0] and changed[0]["inputs"] is not other[0]
    with pytest.raises(PipelineError, match="other inputs"):
        resume_state(other, {s: r["inputs_digest"] for s, r in changed.items()})


@pytest.mark.parametrize("batch", [512, 1])
def test_duplicates_are_found_from_hash_prefixes_and_confirmed_by_full_hashes(tmp_path, monkeypatch, batch):
    """Hand-worked: image a appears in shards 0, 1 and 2, b twice in shard 1; c and d share
    their first 64 bits but differ after them (a prefix collision, not a duplicate)."""
    monkeypatch.setattr(shard_records, "RECORD_BATCH", batch)
    out = str(tmp_path)
    a, b, c, d, e = "a" * 64, "b" * 64, "c" * 16 + "0" * 48, "c" * 16 + "1" * 48, "e" * 64
    hashes = {0: [e, a, c], 1: [b, a, b], 2: [d, a], 3: []}
    for s, shas in hashes.items():
        inputs = [f"/p/{s}-{k}.jpg" for k in range(len(shas))]
        record = _record(s, inputs, set()) | {"sha256": shas}
        (tmp_path / record_url(out, s).rsplit("/", 1)[-1]).write_text(json.dumps(record))
    records = finished_records(out, [0, 1, 2, 3], None)
    assert shard_records.duplicates(out, records, None) == [
        {"sha256": a, "sources": ["/p/0-1.jpg", "/p/1-1.jpg", "/p/2-1.jpg"]},
        {"sha256": b, "sources": ["/p/1-0.jpg", "/p/1-2.jpg"]},
    ]
    assert shard_records.duplicates(out, {3: records[3]}, None) == []
