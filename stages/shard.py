"""Shard stage: images (folder, fsspec glob, sample corpus) -> WebDataset shards + manifest.

One Ray task per shard. A finished shard (its stats file exists, built from the same
inputs) is reused on a rerun. The manifest is written last, atomically, and only when the
reject fraction is acceptable, so later stages never trust a half-built or garbage corpus.
"""
from __future__ import annotations

import json
from collections import Counter

import ray

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.ingest import build_shard, corpus_id, digest, list_inputs, preprocessing, stats_url
from pipeline.manifest import Manifest
from pipeline.sample_corpus import write_sample_corpus
from pipeline.storage import exists, join_url, read_json, write_bytes_atomic, write_json
from stages.runtime import init_ray, progress, say

SAMPLE = "sample:photos"


@ray.remote(num_cpus=1, max_retries=2)
def _build(shard_id, inputs, shard_cfg, out_url, storage_options):
    return build_shard(shard_id, inputs, shard_cfg, out_url, storage_options)


def resolve_sources(cfg: Config) -> list[str]:
    sources = []
    for source in cfg.shard.input:
        if source == SAMPLE:
            source = write_sample_corpus(cfg.under_root("sample_photos"), cfg.shard.sample_size, cfg.storage.storage_options)
        sources.append(source)
    return sources


def run(cfg: Config) -> Manifest:
    so, out, size = cfg.storage.storage_options, cfg.shards_url, cfg.shard.shard_size
    inputs = list_inputs(resolve_sources(cfg), so)
    if not inputs:
        raise PipelineError(f"no input images found in {cfg.shard.input}")
    plan = {i: inputs[start:start + size] for i, start in enumerate(range(0, len(inputs), size))}

    stats, todo = {}, []
    for shard_id, shard_inputs in plan.items():
        url = stats_url(out, shard_id)
        if exists(url, so):
            previous = read_json(url, so)
            if previous["inputs_digest"] != digest(shard_inputs):
                raise PipelineError(
                    f"shard {shard_id} in {out} was built from other inputs than this run would give it; "
                    f"write to a new shard folder (shard.output) or restore the original inputs"
                )
            stats[shard_id] = previous
        else:
            todo.append(shard_id)
    say(f"shard: {len(inputs)} inputs -> {len(plan)} shards of {size} in {out} ({len(plan) - len(todo)} already done)")

    if todo:
        init_ray()
        pending = {_build.remote(s, plan[s], cfg.shard, out, so): s for s in todo}
        bar = progress(len(todo), "shard", "shard")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            result = ray.get(done[0])
            stats[pending.pop(done[0])] = result
            bar.update(1)
            bar.set_postfix(rejected=sum(len(s["rejects"]) for s in stats.values()))
        bar.close()

    rejects = [r for s in sorted(stats) for r in stats[s]["rejects"]]
    totals = {
        "inputs": len(inputs),
        "accepted": sum(s["count"] for s in stats.values()),
        "rejected": len(rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "shards": len(plan),
        "bytes_in": sum(s["bytes_in"] for s in stats.values()),
        "bytes_out": sum(s["bytes_out"] for s in stats.values()),
    }
    write_bytes_atomic(join_url(out, "rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects).encode(), so)
    write_json(join_url(out, "stats.json"), totals, so)
    fraction = len(rejects) / len(inputs)
    if fraction > cfg.shard.max_reject_fraction:
        raise PipelineError(
            f"{len(rejects)} of {len(inputs)} inputs ({fraction:.0%}) were rejected, more than "
            f"shard.max_reject_fraction={cfg.shard.max_reject_fraction:.0%}; reasons: {totals['rejects_by_reason']}. "
            f"See {join_url(out, 'rejects.jsonl')}. No manifest was written."
        )
    manifest = Manifest(
        out, corpus_id(cfg.shard, plan[0]), size,
        {s: stats[s]["count"] for s in sorted(stats) if stats[s]["count"]}, preprocessing(cfg.shard),
    )
    manifest.save(so)
    say(f"shard: {totals['accepted']} images in {len(manifest.counts)} shards, {len(rejects)} rejected "
        f"{totals['rejects_by_reason'] or ''} -> {join_url(out, 'manifest.json')}")
    return manifest
