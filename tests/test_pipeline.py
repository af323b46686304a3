"""End to end through real Ray, real WebDataset tars, real Zarr and real timm (the same on a real S3
endpoint, through faults: tests/test_storage_faults.py)."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import timm
import webdataset as wds
import zarr

from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError, PipelineError
from pipeline.models.export import max_output_difference
from pipeline.storage import join_url, list_names, read_bytes, url_to_fs
from pipeline.training import checkpoint
from stages import distill, evaluate, export, shard, teacher_cache
from tests.conftest import parent, tiny_config
from tests.corpus import awkward_files

pytestmark = pytest.mark.slow


def check_outputs(cfg, manifest, store, export_url, report):
    so = cfg.storage.storage_options
    assert manifest.num_images == 12 and manifest.shard_ids == [0, 1, 2]

    # the tars are plain WebDataset shards
    fs, path = url_to_fs(manifest.record(0, so).tar, so)
    with tempfile.TemporaryDirectory() as tmp:
        fs.get_file(path, os.path.join(tmp, "00000.tar"))
        samples = list(wds.WebDataset(os.path.join(tmp, "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["0000000000", "0000000001", "0000000002", "0000000003"]
    assert json.loads(samples[0]["json"])["index"] == 0

    # the store, read with plain zarr only
    group = zarr.open_group(store.zarr_url, mode="r", storage_options=so if "://" in store.url else None)
    targets = group["targets"][:]
    assert targets.shape == (12, 1, 4, 4, 48) and targets.dtype == np.float16
    assert np.isfinite(targets).all() and all(np.abs(targets[i]).sum() > 0 for i in range(12))  # every row written
    attrs = group.attrs["phreg"]
    assert attrs["spec"]["counts"] == 4 and attrs["spec"]["teacher"]["grid"] == [4, 4]
    assert attrs["spec"]["corpus_id"] == manifest.corpus_id
    assert sorted(list_names(join_url(store.url, "complete"), so)) == ["00000000.json", "00000001.json", "00000002.json"]

    # the export: plain timm rebuilds the student, outputs equal the trained checkpoint's
    run_url = join_url(cfg.students_url, cfg.student.name)
    trained, _, state = checkpoint.load_student(checkpoint.latest(run_url, so), so)
    assert state["step"] == state["total_steps"] == 2 * 12 // (cfg.distill.batch_size * cfg.distill.num_workers)
    fs, path = url_to_fs(export_url, so)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.json", "model.safetensors"):
            fs.get_file(f"{path}/{name}", os.path.join(tmp, name))
        model = timm.create_model(f"local-dir:{tmp}", pretrained=True)
    assert model.reg_token.shape[1] == cfg.student.registers
    assert max_output_difference(trained, model) == 0.0

    metrics = read_bytes(join_url(run_url, "metrics.csv"), so).decode().splitlines()
    assert metrics[0] == "step,epoch,loss,cosine,mse,lr,samples_per_s,data_wait_fraction,seconds" and len(metrics) > 1
    epochs = read_bytes(join_url(run_url, "epochs.csv"), so).decode().splitlines()
    assert [line.split(",")[1] for line in epochs[1:]] == ["0", "1"]  # one row per epoch
    assert read_bytes(join_url(run_url, "loss.png"), so)[:4] == b"\x89PNG"

    for name in ("pca.png", "norms.png", "norm_hist.png", "report.md"):
        assert read_bytes(join_url(cfg.eval_url, name), so)[:4] in (b"\x89PNG", b"# Ev")
    assert set(report["norms"]) == {"teacher", "target", "student"}


def test_end_to_end_local(tiny_copy):
    """The later stages on the corpus and store that `tiny_run` sharded and computed from scratch
    with this config (num_workers is distill's alone), every output checked. The same run on
    S3, from scratch: tests/test_storage_faults.py, through a flaky endpoint."""
    cfg = tiny_config(tiny_copy, **{"distill.num_workers": 2})
    manifest = Manifest.load(cfg.shards_url)
    store = teacher_cache.run(cfg)  # complete: nothing to compute
    distill.run(cfg)
    (export_url,) = export.run(cfg)
    report = evaluate.run(cfg)
    check_outputs(cfg, manifest, store, export_url, report)


def test_second_student_reuses_cache_and_mismatch_is_refused(tiny_copy):
    root = tiny_copy  # sharded, and the store of this config complete
    cfg = tiny_config(root, **{"distill.epochs": 1})
    store = teacher_cache.run(cfg)
    before = {p: os.path.getmtime(p) for p in _files(store.url)}

    second = tiny_config(root, **{"distill.epochs": 1, "student.name": "r2", "student.registers": 2})
    assert teacher_cache.run(second).url == store.url  # nothing to compute
    distill.run(second)
    assert {p: os.path.getmtime(p) for p in _files(store.url)} == before
    assert checkpoint.latest(join_url(second.students_url, "r2"))

    wrong = tiny_config(root, **{"teacher.img_size": 96, "student.name": "wrong"})
    with pytest.raises(ConfigError, match=r"teacher\.img_size") as info:
        distill.run(wrong)
    assert "teacher.grid" in str(info.value)
    explicit = tiny_config(root, **{"teacher.img_size": 96, "distill.store": store.url, "student.name": "w"})
    with pytest.raises(ConfigError, match=r"grid: \[4, 4\] \(store\) != \[6, 6\] \(config\)"):
        distill.run(explicit)
    assert not os.path.exists(join_url(wrong.students_url, "wrong"))  # refused before any compute

    changed = tiny_config(root, **{"distill.epochs": 1, "student.name": "r2", "distill.lr": 5e-4})
    with pytest.raises(ConfigError, match="distill.lr"):
        distill.run(changed)  # resuming a run with other settings


def test_targets_identical_across_runs_and_worker_counts(tiny_run, tmp_path):
    # one actor: the store `tiny_run` computed; two actors: a store of their own, outside it
    one = tiny_config(tiny_run, **{"cache.num_actors": 1})
    two = tiny_config(tiny_run, **{"cache.root": str(tmp_path / "c2"), "cache.num_actors": 2,
                                   "storage.extra_roots": [parent(tiny_run), str(tmp_path)]})
    a, b = teacher_cache.run(one), teacher_cache.run(two)
    assert a.url.rsplit("/", 1)[1] == b.url.rsplit("/", 1)[1]  # same fingerprint
    ta, tb = zarr.open_group(a.zarr_url, mode="r")["targets"][:], zarr.open_group(b.zarr_url, mode="r")["targets"][:]
    assert np.array_equal(ta, tb)
    # and every row, every variant, identical to a direct single-process computation of that
    # image alone; rows no image owns stay empty
    from pipeline.targets.teacher_targets import TeacherTargets, UnitViews, view_jobs

    manifest = Manifest.load(one.shards_url)
    computer = TeacherTargets(one.teacher, a, manifest)
    boxes = zarr.open_group(a.zarr_url, mode="r")["boxes"][:]
    owned = set()
    jobs = view_jobs(manifest.units(), a.spec.variants, 1)
    views = UnitViews(manifest, a.spec, computer.preprocess, jobs)
    for i, (unit, _) in enumerate(jobs):
        ((row, variant, pixels, box, offsets, flips, _),) = views(i)
        index = unit.start + row
        direct = computer.targets(pixels[None], offsets[None], flips[None])[0].half().numpy()
        assert np.array_equal(direct, ta[index, variant]), (index, variant)
        assert np.array_equal(box, boxes[index, variant]), (index, variant)
        owned.add(index)
    assert len(owned) == manifest.num_images
    assert not ta[[i for i in range(len(ta)) if i not in owned]].any()


def test_bad_inputs_are_rejected_with_reasons(tmp_path, ray_local):
    folder = tmp_path / "images"
    folder.mkdir()
    files = awkward_files()
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an input: wrong suffix")
    cfg = tiny_config(str(tmp_path / "run"), **{"shard.input": [str(folder)], "shard.shard_size": 5})
    manifest = shard.run(cfg)
    expected = {name: reason for name, (_, reason) in files.items()}
    rejects = [json.loads(line) for line in open(join_url(cfg.shards_url, "rejects.jsonl"))]
    assert {os.path.basename(r["source"]): r["reason"] for r in rejects} == {n: r for n, r in expected.items() if r}
    assert manifest.num_images == sum(r is None for r in expected.values())
    stats = json.load(open(join_url(cfg.shards_url, "stats.json")))
    assert stats["inputs"] == len(files) and stats["rejected"] == len(rejects)
    teacher_cache.run(cfg)  # the accepted images go through the teacher

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for i in range(4):
        (garbage / f"{i}.jpg").write_bytes(b"nope")
    (garbage / "ok.jpg").write_bytes(files["good.jpg"][0])
    bad = tiny_config(str(tmp_path / "run2"), **{"shard.input": [str(garbage)]})
    with pytest.raises(PipelineError, match="80%"):
        shard.run(bad)
    assert not os.path.exists(join_url(bad.shards_url, "manifest.json"))


def _files(root):
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
