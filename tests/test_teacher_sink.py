"""The teacher actor's path from batches to marked units, without Ray: the sink (targets
encoded on the device, host buffers written as shards), equality with the loop-per-view
computation it replaced, a teacher that runs out of memory, a shard whose image no longer
decodes, and a compiled teacher."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ShardConfig, TeacherConfig
from pipeline.data.images import Preprocess
from pipeline.data.ingest import build_shard
from pipeline.data.manifest import Manifest
from pipeline.data.shards import read_images
from pipeline.errors import PipelineError
from pipeline.models.vit import describe_teacher, patch_features
from pipeline.targets.store import StoreSpec, TargetStore
from pipeline.targets.store_check import check_unit
from pipeline.targets.teacher_targets import TeacherTargets
from pipeline.training.pairs import CachedPairs, OnlineViews
from tests.conftest import TINY
from tests.test_tta import _recover_by_loop, _render_views_by_loop

TEACHER = TeacherConfig(model="vit_tiny_patch16_224", img_size=64, model_kwargs=TINY)
SIZE, UNIT_ROWS = 6, 3


def _corpus(folder) -> Manifest:
    rng = np.random.default_rng(0)
    inputs = []
    for k in range(SIZE):
        path = folder / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (70 + 5 * k, 90, 3), dtype=np.uint8)).save(path)
        inputs.append(str(path))
    out = str(folder / "shards")
    counts = {0: build_shard(0, inputs, ShardConfig(), SIZE, out)["count"]}
    Manifest(out, "sink", SIZE, UNIT_ROWS, counts).save()
    return Manifest.load(out)


def _store(folder, manifest, dtype="float16", crops=True, variants=2) -> TargetStore:
    spec = StoreSpec(teacher=describe_teacher(TEACHER).to_dict(), counts=4, shift_frac=0.25, flip=True, seed=3,
                     dtype=dtype, variants=variants, crop="random", corpus_id=manifest.corpus_id, unit_rows=UNIT_ROWS)
    return TargetStore.create_or_open(str(folder / f"cache-{dtype}-{crops}"), spec, manifest.url, manifest.num_rows,
                                      crops=crops)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("sink"))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_stored_targets_equal_the_loop_per_view_within_one_ulp(manifest, tmp_path, dtype):
    """Targets through views by one gather, recovery by one gather, encoding on the device and
    the shard written from the host buffer equal, within one float16 ulp (int8: one step of its
    scale), the loop-per-view computation written through Zarr; crops and boxes exactly, and
    every unit verifies."""
    store = _store(tmp_path, manifest, dtype)
    computer = TeacherTargets(TEACHER, store, manifest, batch_images=3)
    stats = computer.compute_units(manifest.units())
    assert [s["unit"] for s in stats] == [0, 1] and all(s["digest"].startswith("crc32c:") for s in stats)
    for unit in manifest.units():
        assert check_unit(store, unit, store.marker(unit.id)) == []
    from pipeline.targets.teacher_targets import UnitViews, view_jobs

    jobs = view_jobs(manifest.units(), 2, 1)
    views = UnitViews(manifest, store.spec, computer.preprocess, jobs)
    for i, (unit, _) in enumerate(jobs):
        ((row, variant, pixels, box, offsets, flips, bad),) = views(i)
        images = computer.preprocess.normalize(pixels[None])
        with torch.inference_mode():
            tokens = patch_features(computer.model, _render_views_by_loop(images, offsets[None], flips[None], (16, 16),
                                                                          computer.fill).flatten(0, 1)).float()
        want = _recover_by_loop(tokens[None], offsets[None], flips[None])[0][0].numpy()
        index = unit.start + row
        got = store.read(slice(index, index + 1), variant)[0]
        tol = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32) if dtype == "float16" else \
            np.abs(want).max(axis=-1, keepdims=True) / 127
        assert (np.abs(got - want) <= tol * 1.01 + 1e-12).all(), (index, variant)
        assert np.array_equal(store.group["crops"][index, variant], pixels.numpy()) and not bad
        assert np.array_equal(store.read_boxes(slice(index, index + 1), variant)[0], box)


class _OutOfMemory(torch.nn.Module):
    """A teacher that fails the way a GPU too small for the batch does."""

    def forward_features(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 11.40 GiB")


def test_a_teacher_out_of_memory_ends_with_the_setting_to_lower(manifest, tmp_path):
    store = _store(tmp_path, manifest)
    computer = TeacherTargets(TEACHER, store, manifest, batch_images=3)
    computer.model = _OutOfMemory()
    with pytest.raises(PipelineError) as info:
        computer.compute_units(manifest.units())
    message = str(info.value)
    assert "ran out of memory running the teacher on 3 image(s) x 4 views (12 views of 64x64)" in message
    assert "of unit 0 (shard 0): lower cache.batch_images (now 3)" in message
    assert store.completed() == set()


def _corrupt(manifest, index: int) -> str:
    """Overwrite the first third of image `index`'s bytes in its tar, as a damaged upload would."""
    record = manifest.record(0)
    start, size = record.offsets[index], record.sizes[index]
    with open(record.tar, "r+b") as f:
        f.seek(start)
        f.write(b"\x00" * (size // 3))
    return record.keys[index]


def test_an_image_that_no_longer_decodes_is_named_or_rejected(tmp_path):
    manifest = _corpus(tmp_path)
    raw = read_images(manifest, [4])[0]
    key = _corrupt(manifest, 4)
    assert read_images(manifest, [4])[0] != raw
    store = _store(tmp_path, manifest, variants=1)
    with pytest.raises(PipelineError) as info:
        TeacherTargets(TEACHER, store, manifest, batch_images=2).compute_units(manifest.units())
    message = str(info.value)
    assert f"shard 0 ({manifest.record(0).tar}), unit 1, image {key!r} (global index 4): its bytes no longer decode" \
        in message and "cache.on_bad_image: skip" in message
    assert store.completed() == {0}  # the unit before it was finished and marked

    stats = TeacherTargets(TEACHER, store, manifest, batch_images=2, skip_bad=True).compute_units(manifest.units())
    assert [s["unit"] for s in stats] == [1]
    marker = store.marker(1)
    assert marker["rejected"] == [{"index": 4, "key": key, "reason": "its bytes no longer decode"}]
    assert check_unit(store, manifest.units()[1], marker) == []
    assert not store.group["targets"][4].any() and store.group["targets"][3].any()
    # a reader of the store never yields the rejected image: the next readable one stands in
    pairs = CachedPairs(manifest, Preprocess.from_dict(store.spec.teacher["preprocess"]), store=store)
    got = list(pairs.examples([(1, np.array([1, 0, 2]))], 0))
    want = list(pairs.examples([(1, np.array([2, 0, 2]))], 0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))


def test_online_distillation_names_or_skips_an_image_that_no_longer_decodes(tmp_path):
    """Online students read the shards themselves: the same image is named with the setting
    to change, or (cache.on_bad_image: skip) the unit's next image stands in, views and all."""
    manifest = _corpus(tmp_path)
    key = _corrupt(manifest, 4)
    spec = _store(tmp_path, manifest, variants=1).spec
    pre = Preprocess.from_dict(spec.teacher["preprocess"])
    with pytest.raises(PipelineError) as info:
        list(OnlineViews(manifest, pre, spec=spec).examples([(1, np.array([0, 1]))], 0))
    message = str(info.value)
    assert f"shard 0 ({manifest.record(0).tar}), unit 1, image {key!r} (global index 4): its bytes no longer decode" \
        in message and "cache.on_bad_image: skip" in message
    views = OnlineViews(manifest, pre, spec=spec, skip_bad=True)
    got = list(views.examples([(1, np.array([1, 0, 2]))], 3))
    want = list(views.examples([(1, np.array([2, 0, 2]))], 3))
    assert all(all(np.array_equal(a, b) for a, b in zip(g, w)) for g, w in zip(got, want))


def test_a_truncated_shard_names_the_image_it_cuts(tmp_path):
    manifest = _corpus(tmp_path)
    record = manifest.record(0)
    os.truncate(record.tar, record.offsets[5] + 10)
    store = _store(tmp_path, manifest, variants=1)
    with pytest.raises(PipelineError, match=rf"unit 1, image '{record.keys[5]}' \(global index 5\): the shard's file "
                                            r"ends before its bytes \(truncated\)"):
        TeacherTargets(TEACHER, store, manifest).compute_units(manifest.units())


def test_a_compiled_teacher_gives_the_eager_targets(manifest, tmp_path):
    """cache.compile: the teacher's forward through torch.compile (inductor on the CPU) gives
    the eager targets within bf16 tolerance (here float32: far closer)."""
    store = _store(tmp_path, manifest, crops=False, variants=1)
    eager, compiled = (TeacherTargets(TEACHER, store, manifest, compile=c) for c in (False, True))
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    offsets, flips = np.array([[[0, 0], [1, -1], [0, 2], [-1, 0]]] * 2), np.array([[False, True, False, True]] * 2)
    a, b = eager.targets(pixels, offsets, flips), compiled.targets(pixels, offsets, flips)
    torch.testing.assert_close(b, a, rtol=1.6e-2, atol=1e-3)
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1


class _Scaled(torch.nn.Module):
    """The real teacher with its features multiplied: large enough, they overflow float16."""

    def __init__(self, model, scale: float):
        super().__init__()
        self.model, self.scale = model, scale
        self.num_prefix_tokens, self.patch_embed = model.num_prefix_tokens, model.patch_embed

    def forward_features(self, x):
        return self.model.forward_features(x) * self.scale


@pytest.mark.parametrize("scale, dtype", [(float("nan"), "float32"), (1e6, "float16")])
def test_targets_that_are_not_finite_in_the_stored_type_stop_the_unit(manifest, tmp_path, scale, dtype):
    """NaN, or a float16 store's overflow to inf, found on the device per batch: the unit is
    named, nothing is marked complete."""
    store = _store(tmp_path, manifest, dtype)
    computer = TeacherTargets(TEACHER, store, manifest, batch_images=3)
    computer.model = _Scaled(computer.model, scale)
    with pytest.raises(PipelineError, match=r"unit 0 \(shard 0, rows 0-2\): the teacher produced NaN or Inf features"):
        computer.compute_units(manifest.units())
    assert store.completed() == set()
