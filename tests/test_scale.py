"""The control plane at corpus scale (bench `scale`): what the shard driver keeps of the
finished shards' records when it resumes. Fast, no Ray."""
from __future__ import annotations

import json

import pytest

from pipeline.data.ingest import digest, plan_shards, record_url, resume_state
from pipeline.errors import PipelineError
from stages import shard
from stages.shard import READER_FIELDS, finished_records


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
        assert done[s] == {k: v for k, v in record.items() if k not in READER_FIELDS}
    # names are the plan's string objects, not copies
    assert done[0]["inputs"] is plan[0] and done[0]["sources"] is plan[0]
    assert done[1]["inputs"] is plan[1]
    assert all(any(name is p for p in plan[1]) for name in done[1]["sources"]) and len(done[1]["sources"]) == 7
    assert resume_state(plan, {s: r["inputs_digest"] for s, r in done.items()}) == [2]

    # shard ids without a plan (extend mode), and records read in batches of one: the same records
    monkeypatch.setattr(shard, "RECORD_BATCH", 1)
    assert finished_records(out, [0, 1, 2], None) == done
    # a finished shard built from other inputs is still caught by its digest
    other = plan_shards([f"/photos/{i:04d}.jpg" for i in range(1, 21)], 8)
    changed = finished_records(out, other, None)
    assert changed[0]["inputs"] == plan[0] and changed[0]["inputs"] is not other[0]
    with pytest.raises(PipelineError, match="other inputs"):
        resume_state(other, {s: r["inputs_digest"] for s, r in changed.items()})
