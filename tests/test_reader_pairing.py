"""Every (image, target) a reader yields belongs together, whatever order the plan asks for.

The planted teachers cannot see a mispairing (their artifacts do not depend on the image), so
here every row of the store is distinct random data, every image is distinct, and every crop
box differs: a pair read from the wrong row, the wrong image or the wrong box fails."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ShardConfig
from pipeline.data.images import Preprocess, decode_rgb
from pipeline.data.ingest import build_shard
from pipeline.data.manifest import Manifest
from pipeline.data.readers import in_order
from pipeline.data.shards import read_images
from pipeline.targets.store import StoreSpec, TargetStore
from pipeline.targets.views import prepare
from pipeline.training.pairs import CachedPairs, OnlineViews, Pair, StepBatches

CAPACITY, UNIT_ROWS, V = 6, 3, 2
PRE = {"size": [32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}
TEACHER = {"model": "m", "weights": "w", "img_size": [32, 32], "patch": [16, 16], "grid": [2, 2], "dim": 8,
           "num_prefix_tokens": 1, "preprocess": PRE}
# a shuffled plan over several units of two shards, positions out of order, one unit partial
PLAN = [(3, np.array([2, 0, 1])), (0, np.array([1, 2, 0])), (2, np.array([0])), (1, np.array([2, 1]))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two shards of 6 distinct images of different sizes (4 units of 3), no Ray needed."""
    tmp = tmp_path_factory.mktemp("pairing")
    return tmp, _shards(tmp, str(tmp / "shards"))


def _shards(tmp, out: str, storage_options=None) -> Manifest:
    rng = np.random.default_rng(0)
    counts = {}
    for s in range(2):
        inputs = []
        for k in range(CAPACITY):
            h, w = 40 + 7 * k, 52 + 5 * s + 3 * k
            path = tmp / f"img{s}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            inputs.append(str(path))
        counts[s] = build_shard(s, inputs, ShardConfig(), CAPACITY, out, storage_options)["count"]
    manifest = Manifest(out, "pairing", CAPACITY, UNIT_ROWS, counts)
    manifest.save(storage_options)
    return Manifest.load(out, storage_options)


def _store(tmp, manifest, dtype, root=None, storage_options=None, crops=False):
    """Distinct random targets and boxes; with `crops`, each box's crop stored as the teacher
    stage stores it (from the decoded image)."""
    spec = StoreSpec(teacher=TEACHER, counts=3, shift_frac=0.15, flip=True, seed=0, dtype=dtype, variants=V,
                     crop="random", corpus_id="pairing", unit_rows=UNIT_ROWS)
    root = root or str(tmp / ("cache-crops" if crops else "cache"))
    store = TargetStore.create_or_open(root, spec, manifest.url, num_rows=manifest.num_rows,
                                       storage_options=storage_options, crops=crops)
    pre = Preprocess.from_dict(PRE)
    rng = np.random.default_rng(1)
    for unit in manifest.units():
        feats = torch.from_numpy(rng.normal(size=(unit.count, V, 2, 2, 8)).astype(np.float32) * 3)
        # a different box per row and variant, inside every image (all are at least 40 x 52)
        left, top = rng.uniform(0, 8, (unit.count, V)), rng.uniform(0, 8, (unit.count, V))
        side = rng.uniform(24, 32, (unit.count, V))
        boxes = np.stack([left, top, left + side, top + side], -1)
        pixels = None
        if crops:
            images = [decode_rgb(d) for d in read_images(manifest, list(range(unit.start, unit.start + unit.count)),
                                                         storage_options)]
            pixels = np.stack([np.stack([pre.pixels(images[r], boxes[r, v]).numpy() for v in range(V)])
                               for r in range(unit.count)])
        store.mark_complete(unit.id, {"images": unit.count, **store.write_unit(unit, feats, boxes, pixels)})
    return store


@pytest.mark.parametrize("dtype, crops", [("float16", False), ("int8", False), ("float16", True)])
def test_cached_pairs_follow_a_shuffled_plan(corpus, dtype, crops):
    """Stores with and without crops give the same pairs: the stored crop is, bit for bit,
    the image decoded and cropped with the row's box."""
    tmp, manifest = corpus
    store = _store(tmp, manifest, dtype, crops=crops)
    assert store.has_crops == crops
    pre = Preprocess.from_dict(PRE)
    units = {u.id: u for u in manifest.units()}
    reader = CachedPairs(manifest, pre, store=store)
    for epoch in (0, 1, 3):
        variant = epoch % V
        expected = [units[u].start + int(p) for u, positions in PLAN for p in positions]
        pairs = list(reader.examples(PLAN, epoch))
        assert len(pairs) == len(expected)
        for index, (image, target) in zip(expected, pairs):
            row = slice(index, index + 1)
            want_target = store.read(row, variant)[0]
            box = store.read_boxes(row, variant)[0]
            want_image = pre.pixels(decode_rgb(read_images(manifest, [index])[0]), box)
            assert torch.equal(target.float(), torch.from_numpy(want_target)), (epoch, index)
            assert torch.equal(image, want_image), (epoch, index)


def test_a_store_with_crops_is_read_without_the_images(corpus):
    tmp, manifest = corpus
    store = _store(tmp, manifest, "float16", crops=True)
    # the same corpus, its shards elsewhere (gone): only the store is read
    moved = Manifest(str(tmp / "no-shards"), manifest.corpus_id, CAPACITY, UNIT_ROWS, manifest.counts)
    with_images = list(CachedPairs(manifest, Preprocess.from_dict(PRE), store=store).examples(PLAN, 1))
    without = list(CachedPairs(moved, Preprocess.from_dict(PRE), store=store).examples(PLAN, 1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(with_images, without))
    no_crops = _store(tmp, manifest, "float16")
    with pytest.raises(Exception):
        list(CachedPairs(moved, Preprocess.from_dict(PRE), store=no_crops).examples(PLAN, 1))


def test_online_views_follow_a_shuffled_plan(corpus):
    tmp, manifest = corpus
    spec = StoreSpec(teacher=TEACHER, counts=3, shift_frac=0.5, flip=True, seed=0, dtype="float32", variants=1,
                     crop="random", corpus_id="pairing", unit_rows=UNIT_ROWS)
    pre = Preprocess.from_dict(PRE)
    units = {u.id: u for u in manifest.units()}
    reader = OnlineViews(manifest, pre, spec=spec)
    for epoch in (0, 2):
        expected = [units[u].start + int(p) for u, positions in PLAN for p in positions]
        got = list(reader.examples(PLAN, epoch))
        assert len(got) == len(expected)
        for index, (image, offsets, flips) in zip(expected, got):
            item = prepare(decode_rgb(read_images(manifest, [index])[0]), index, epoch, spec, pre, 0)
            assert torch.equal(image, item.pixels), (epoch, index)
            assert np.array_equal(offsets, item.offsets) and np.array_equal(flips, item.flips), (epoch, index)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_reader_processes_give_the_batches_of_a_thread(tmp_path, where, request):
    """Batches from 1 and 2 forked reader processes equal those of the in-process thread, bit
    for bit and in order, for a rank of two resuming mid-epoch with joint flips; on S3 the
    readers open their own clients after the fork."""
    if where == "s3":
        root, options = request.getfixturevalue("s3_bucket")
    else:
        root, options = str(tmp_path), {}
    manifest = _shards(tmp_path, f"{root}/shards", options)
    store = _store(tmp_path, manifest, "float16", f"{root}/cache", options, crops=where == "s3")
    pairs = CachedPairs(manifest, Preprocess.from_dict(PRE), options, store=store, hflip=0.5, seed=4)
    pairs.examples([(0, np.array([0]))], 0)  # the parent has used its clients before forking
    plan = StepBatches(pairs, seed=1, rank=1, world=2, batch_size=2, epochs=3, first_step=1)
    assert len(plan) == 8
    batches = {readers: list(in_order(plan, len(plan), readers, depth=2)) for readers in (0, 1, 2)}
    for readers in (1, 2):
        assert len(batches[readers]) == len(plan)
        for a, b in zip(batches[0], batches[readers]):
            assert a[0].dtype == torch.uint8 and a[1].dtype == torch.float16
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert type(b) is Pair and b.pixels is b[0] and b.targets is b[1]  # named across processes and pinning
    pinned = next(in_order(plan, len(plan), 1, depth=2, pin_memory=torch.cuda.is_available()))
    assert type(pinned) is Pair


def test_an_error_in_a_reader_process_reaches_the_consumer(corpus):
    tmp, manifest = corpus
    pairs = CachedPairs(manifest, Preprocess.from_dict(PRE), store=TargetStore(str(tmp / "no-store")))
    plan = StepBatches(pairs, seed=0, rank=0, world=1, batch_size=2, epochs=1)
    with pytest.raises(Exception, match="no target store at"):
        list(in_order(plan, len(plan), readers=1))
