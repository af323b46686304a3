"""Shard stage at scale: external tars read in place, resume, extend, duplicates, planning."""
from __future__ import annotations

import json
import os
import time

import pytest

from pipeline.data.ingest import digest, plan_shards, resume_state
from pipeline.data.manifest import Manifest, unit_rows_for
from pipeline.data.shards import fetch_images, read_images
from pipeline.errors import PipelineError
from stages import shard, teacher_cache
from tests.conftest import tiny_config
from tests.corpus import awkward_files, encode, img2dataset_tar, photo


def test_unit_rows_divide_the_capacity():
    assert unit_rows_for(256) == 256 and unit_rows_for(10000) == 250 and unit_rows_for(1000) == 250
    assert unit_rows_for(12, 5) == 4


def test_units_cover_every_index_once():
    m = Manifest("x", "c", capacity=10, unit_rows=5, counts={0: 10, 1: 7, 3: 2})
    rows = [i for u in m.units() for i in u.rows]
    assert rows == m.indices() and len(rows) == len(set(rows))
    assert [(u.id, u.shard, u.first, u.count) for u in m.units()] == [(0, 0, 0, 5), (1, 0, 5, 5), (2, 1, 0, 5), (3, 1, 5, 2), (6, 3, 0, 2)]


def test_planning_and_resume_over_a_million_entries(tmp_path):
    """Pure planning on 1,000,000 synthetic inputs: plan, resume check, extend, manifest I/O.
    (Times are reported by `make bench`, not asserted here.)"""
    inputs = [f"s3://corpus/raw/{i // 1000:04d}/{i:08d}.jpg" for i in range(1_000_000)]
    plan = plan_shards(inputs, 256)
    assert len(plan) == 3907 and sum(map(len, plan.values())) == 1_000_000
    done = {s: digest(plan[s]) for s in range(0, 3907, 2)}
    todo = resume_state(plan, done)
    assert todo == list(range(1, 3907, 2))
    with pytest.raises(PipelineError, match="other inputs"):
        resume_state(plan_shards(inputs[1:], 256), done)  # one input removed: every shard moves
    counts = {s: len(v) for s, v in plan.items()}
    m = Manifest(str(tmp_path), "c", 256, 256, counts, {s: digest(v) for s, v in plan.items()})
    m.save()
    loaded = Manifest.load(str(tmp_path))
    assert loaded.num_images == 1_000_000 and len(loaded.units()) == 3907
    assert loaded.locate(999_999) == (3906, 999_999 - 3906 * 256)
    assert os.path.getsize(tmp_path / "manifest.json") < 500_000  # the index stays compact


def test_external_tars_are_read_in_place(tmp_path, ray_local):
    good = {f"{i:09d}": encode(photo((80 + i, 64)), "JPEG") for i in range(5)}
    first = dict(good)
    first["000000099"] = awkward_files()["truncated.jpg"][0]
    first["000000100"] = None  # a sample without image (only .txt/.json)
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    img2dataset_tar(folder / "00000.tar", first)
    img2dataset_tar(folder / "00001.tar", {f"1{k}": v for k, v in list(good.items())[:3]})
    cfg = tiny_config(str(tmp_path / "run"), **{"shard.input": [str(folder)]})
    manifest = shard.run(cfg)
    assert manifest.counts == {0: 5, 1: 3}
    assert not os.path.exists(os.path.join(cfg.shards_url, "00000.tar"))  # nothing copied
    record = manifest.record(0)
    assert record.tar == str(folder / "00000.tar")
    assert fetch_images(record, [2, 0]) == [good["000000002"], good["000000000"]]  # original bytes
    assert read_images(manifest, [manifest.capacity + 1]) == [good["000000001"]]
    rejects = [json.loads(x) for x in open(os.path.join(cfg.shards_url, "rejects.jsonl"))]
    assert sorted((r["source"].rsplit("#", 1)[1], r["reason"]) for r in rejects) == [
        ("000000099", "truncated"), ("000000100", "no_image")]
    duplicates = [json.loads(x) for x in open(os.path.join(cfg.shards_url, "duplicates.jsonl"))]
    assert len(duplicates) == 3  # shard 1 repeats three images of shard 0
    store = teacher_cache.run(cfg)
    assert store.completed() == {u.id for u in manifest.units()}


def test_rerun_reuses_shards_and_extend_adds_new_ones(tmp_path, ray_local):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"a{i}.jpg").write_bytes(encode(photo((64 + 8 * i, 64)), "JPEG"))
    cfg = tiny_config(str(tmp_path / "run"), **{"shard.input": [str(folder)]})  # shard_size 4
    first = shard.run(cfg)
    store = teacher_cache.run(cfg)
    stamps = {p: os.path.getmtime(os.path.join(cfg.shards_url, p)) for p in os.listdir(cfg.shards_url) if p.endswith(".tar")}
    markers = {p: os.path.getmtime(p) for p in _files(os.path.join(store.url, "complete"))}

    time.sleep(0.05)
    assert shard.run(cfg).to_dict() == first.to_dict()  # a rerun builds nothing
    assert {p: os.path.getmtime(os.path.join(cfg.shards_url, p)) for p in stamps} == stamps

    for i in range(3):  # new images that sort before and after the old ones
        (folder / f"{'0' if i else 'z'}{i}.jpg").write_bytes(encode(photo((72, 72 + 8 * i)), "JPEG"))
    with pytest.raises(PipelineError, match="shard.mode=extend"):
        shard.run(cfg)
    extended = shard.run(cfg.model_copy(update={"shard": cfg.shard.model_copy(update={"mode": "extend"})}))
    assert extended.corpus_id == first.corpus_id
    assert extended.counts == {0: 4, 1: 2, 2: 3}  # old shards untouched, new indices 8..10
    grown = teacher_cache.run(cfg)
    assert grown.url == store.url and grown.group["targets"].shape[0] == 12
    assert {p: os.path.getmtime(p) for p in markers} == markers  # finished units not recomputed
    assert grown.completed() == {0, 1, 2}


def _files(folder):
    return [os.path.join(folder, f) for f in os.listdir(folder)]
