"""Shard stage: images (folder, fsspec glob, sample corpus) or existing WebDataset tars ->
shards + per-shard records + manifest.

One Ray task per shard. A shard whose record exists (built from the same inputs) is reused
on a rerun. The manifest is written last, atomically, and only when the reject fraction is
acceptable, so later stages never trust a half-built or garbage corpus. `shard.mode`:
incremental (default) resumes the same plan; extend keeps existing shards and adds new
inputs as new shards (new global indices); overwrite starts over.
"""
from __future__ import annotations

import json
import time
from collections import Counter

import ray

from pipeline.config import Config
from pipeline.data.ingest import (
    build_shard,
    corpus_id,
    index_external_tar,
    input_kind,
    list_inputs,
    plan_shards,
    preprocessing,
    resume_state,
)
from pipeline.data.manifest import Manifest, unit_rows_for
from pipeline.data.records import driver_record, duplicates, finished_records
from pipeline.data.sample_corpus import write_sample_corpus
from pipeline.errors import PipelineError
from pipeline.storage import exists, join_url, url_to_fs, write_bytes_atomic, write_json
from stages.runtime import init_ray, progress, say

SAMPLE = "sample:photos"


@ray.remote(num_cpus=1, max_retries=2)
def _build(shard_id, inputs, kind, shard_cfg, capacity, out_url, storage_options):
    if kind == "tars":
        return index_external_tar(shard_id, inputs[0], shard_cfg, out_url, storage_options)
    return build_shard(shard_id, inputs, shard_cfg, capacity, out_url, storage_options)


def resolve_sources(cfg: Config) -> list[str]:
    sources = []
    for source in cfg.shard.input:
        if source == SAMPLE:
            source = write_sample_corpus(cfg.under_root("sample_photos"), cfg.shard.sample_size, cfg.storage.storage_options)
        sources.append(source)
    return sources


def make_plan(cfg: Config, inputs: list[str], kind: str) -> tuple[dict[int, list[str]], int, dict[int, dict]]:
    """(plan: shard id -> inputs, capacity, finished records) for this run's mode."""
    so, out = cfg.storage.storage_options, cfg.shards_url
    per_shard = 1 if kind == "tars" else cfg.shard.shard_size
    previous = Manifest.load(out, so) if exists(join_url(out, "manifest.json"), so) else None
    if cfg.shard.mode == "extend" and previous:
        kept = finished_records(out, previous.shard_ids, so)
        known = {i for r in kept.values() for i in r["inputs"]}
        fresh = [i for i in inputs if i not in known]
        plan = {s: r["inputs"] for s, r in kept.items()}
        plan.update(plan_shards(fresh, per_shard, first_id=max(previous.shard_ids, default=-1) + 1))
        return plan, previous.capacity, kept
    plan = plan_shards(inputs, per_shard)
    done = finished_records(out, plan, so)
    resume_state(plan, {s: r["inputs_digest"] for s, r in done.items()})
    capacity = previous.capacity if previous else cfg.shard.shard_size
    return plan, capacity, done


def run(cfg: Config) -> Manifest:
    so, out = cfg.storage.storage_options, cfg.shards_url
    if cfg.shard.mode == "overwrite" and exists(out, so):
        fs, path = url_to_fs(out, so)
        fs.rm(path, recursive=True)
    inputs = list_inputs(resolve_sources(cfg), so)
    if not inputs:
        raise PipelineError(f"no input images found in {cfg.shard.input}")
    kind = input_kind(inputs)
    plan, capacity, records = make_plan(cfg, inputs, kind)
    todo = [s for s in plan if s not in records]
    say(f"shard: {len(inputs)} input {kind} -> {len(plan)} shards in {out} "
        f"({len(plan) - len(todo)} already done, mode {cfg.shard.mode})")

    t0 = time.perf_counter()
    if todo:
        init_ray()
        pending = {_build.remote(s, plan[s], kind, cfg.shard, capacity, out, so): s for s in todo}
        bar = progress(len(todo), "shard", "shard")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            s = pending.pop(done[0])
            records[s] = driver_record(ray.get(done[0]), plan[s])
            bar.update(1)
            bar.set_postfix(images=sum(r["count"] for r in records.values()),
                            rejected=sum(len(r["rejects"]) for r in records.values()))
        bar.close()
    elapsed = time.perf_counter() - t0

    if kind == "tars":
        largest = max(r["count"] for r in records.values())
        if largest > capacity:
            if records.keys() != set(todo):  # an existing manifest fixed the capacity
                raise PipelineError(f"a new tar holds {largest} images, more than the corpus's shard capacity {capacity}")
            capacity = -(-largest // cfg.shard.unit_rows) * cfg.shard.unit_rows
    totals = report(cfg, records, elapsed)
    first = min(plan)
    manifest = Manifest(
        out, corpus_id(cfg.shard, kind, capacity, plan[first]), capacity, unit_rows_for(capacity, cfg.shard.unit_rows),
        {s: r["count"] for s, r in sorted(records.items())}, {s: r["inputs_digest"] for s, r in records.items()},
        preprocessing(cfg.shard, kind),
    )
    manifest.save(so)
    say(f"shard: {totals['accepted']} images in {len(records)} shards, {totals['rejected']} rejected "
        f"{totals['rejects_by_reason'] or ''}, {totals['duplicate_copies']} duplicate copies -> {join_url(out, 'manifest.json')}")
    return manifest


def report(cfg: Config, records: dict[int, dict], elapsed: float) -> dict:
    """Write rejects.jsonl, duplicates.jsonl and stats.json; stop when too much was rejected."""
    so, out = cfg.storage.storage_options, cfg.shards_url
    rejects = [r for s in sorted(records) for r in records[s]["rejects"]]
    copies = duplicates(out, records, so)
    accepted = sum(r["count"] for r in records.values())
    seen = accepted + len(rejects)
    totals = {
        "inputs": seen,
        "accepted": accepted,
        "rejected": len(rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "duplicate_copies": sum(len(d["sources"]) - 1 for d in copies),
        "shards": len(records),
        "bytes_in": sum(r["bytes_in"] for r in records.values()),
        "bytes_out": sum(r["bytes_out"] for r in records.values()),
        "seconds": round(elapsed, 3),
        "shard_seconds": round(sum(r["seconds"] for r in records.values()), 3),
    }
    write_bytes_atomic(join_url(out, "rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects).encode(), so)
    write_bytes_atomic(join_url(out, "duplicates.jsonl"), "".join(json.dumps(d) + "\n" for d in copies).encode(), so)
    write_json(join_url(out, "stats.json"), totals, so)
    fraction = len(rejects) / max(seen, 1)
    if fraction > cfg.shard.max_reject_fraction:
        raise PipelineError(
            f"{len(rejects)} of {seen} inputs ({fraction:.0%}) were rejected, more than "
            f"shard.max_reject_fraction={cfg.shard.max_reject_fraction:.0%}; reasons: {totals['rejects_by_reason']}. "
            f"See {join_url(out, 'rejects.jsonl')}. No manifest was written."
        )
    return totals
