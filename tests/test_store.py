"""The target store: encodings, layout readable by plain zarr, refusal of mismatches."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import TeacherConfig
from pipeline.data.manifest import Unit
from pipeline.errors import ConfigError
from pipeline.models.vit import describe_teacher
from pipeline.storage import exists, join_url, url_to_fs, write_json
from pipeline.targets.store import StoreSpec, TargetStore, decode, describe_differences, encode

TEACHER = {"model": "m", "weights": "w", "img_size": [32, 32], "patch": [16, 16], "grid": [2, 2], "dim": 8,
           "num_prefix_tokens": 1, "preprocess": {"size": [32, 32], "interpolation": "bicubic",
                                                  "mean": [0.5] * 3, "std": [0.5] * 3}}
SPEC = StoreSpec(teacher=TEACHER, counts=4, shift_frac=0.15, flip=True, seed=0, dtype="float16", variants=2,
                 crop="random", corpus_id="c", unit_rows=3)


@pytest.mark.parametrize("dtype, tol", [("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 1e-2)])
def test_encodings_round_trip(dtype, tol):
    x = torch.randn(5, 2, 2, 64) * 3
    stored, scales = encode(x, dtype)
    back = decode(stored, scales, dtype)
    rel = np.abs(back - x.numpy()).max(axis=-1) / np.abs(x.numpy()).max(axis=-1)
    assert rel.max() <= tol


# bounds on a token's relative error: half an ulp of the format; int8 rounds each channel to
# absmax/254 at most, sqrt(D) of those against a norm of at least absmax
@pytest.mark.parametrize("dtype, tol", [("float32", 0), ("float16", 2 ** -11), ("bfloat16", 2 ** -8),
                                        ("int8", 8 ** 0.5 / 254)])
def test_every_dtype_through_the_store_keeps_each_token_and_its_norm(tmp_path, dtype, tol):
    """Write and read through the store (V = 2, a unit not at row 0): cosine ignores scale, so
    check each token's relative error and norm against float32, with token norms spread over
    six decades so that a wrong, missing or misaligned `scales` row cannot pass."""
    store = TargetStore.create_or_open(str(tmp_path), replace(SPEC, dtype=dtype), "m", num_rows=9)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 2, 2, 2, 8, generator=g) * 10 ** (torch.rand(3, 2, 2, 2, 1, generator=g) * 6 - 3)
    store.write_unit(Unit(1, 1, 0, 3, 3), feats, np.zeros((3, 2, 4)))
    for variant in range(2):
        x = feats[:, variant].numpy()
        back = store.read(slice(3, 6), variant)
        norm = np.linalg.norm(x, axis=-1)
        rel = np.linalg.norm(back - x, axis=-1) / norm
        assert rel.max() <= tol, (variant, rel.max())
        assert np.abs(np.linalg.norm(back, axis=-1) / norm - 1).max() <= tol


def test_bfloat16_bits_are_plain_uint16():
    stored, _ = encode(torch.tensor([1.0, -2.0, 0.5]), "bfloat16")
    assert stored.dtype == np.uint16 and stored.tolist() == [0x3F80, 0xC000, 0x3F00]


def test_fingerprint_changes_with_anything_that_changes_a_target():
    fields = {"counts": 5, "shift_frac": 0.2, "flip": False, "seed": 1, "dtype": "int8", "variants": 1,
              "crop": "center", "corpus_id": "d"}
    prints = {replace(SPEC, **{k: v}).fingerprint for k, v in fields.items()}
    prints.add(replace(SPEC, teacher={**TEACHER, "weights": "other"}).fingerprint)
    assert len(prints | {SPEC.fingerprint}) == len(fields) + 2


def test_write_read_and_plain_zarr_layout(tmp_path):
    store = TargetStore.create_or_open(str(tmp_path), SPEC, "manifest-url", num_rows=6)
    feats = torch.randn(2, 2, 2, 2, 8)  # unit 1 holds 2 of its 3 rows
    boxes = np.arange(16, dtype=np.float32).reshape(2, 2, 4)
    written = store.write_unit(Unit(1, 1, 0, 2, 3), feats, boxes)
    store.mark_complete(1, {"images": 2, **written})
    assert store.completed() == {1}
    assert np.allclose(store.read(slice(3, 5), 1), feats[:, 1].numpy(), atol=1e-2)

    group = zarr.open_group(str(tmp_path / SPEC.fingerprint / "targets.zarr"), mode="r")
    targets = group["targets"]
    assert targets.shape == (6, 2, 2, 2, 8) and targets.dtype == np.float16
    assert targets.shards == (3, 2, 2, 2, 8)  # one Zarr shard per unit
    assert np.array_equal(group["boxes"][3:5], boxes)
    assert group.attrs["phreg"]["spec"]["counts"] == 4
    assert not group["targets"][5].any()  # the unused slot of the shard stays empty


def test_reopening_grows_and_keeps_data(tmp_path):
    store = TargetStore.create_or_open(str(tmp_path), SPEC, "m", num_rows=3)
    store.write_unit(Unit(0, 0, 0, 3, 0), torch.ones(3, 2, 2, 2, 8), np.zeros((3, 2, 4)))
    grown = TargetStore.create_or_open(str(tmp_path), SPEC, "m", num_rows=9)
    assert grown.group["targets"].shape[0] == 9
    assert np.all(grown.read(slice(0, 3), 0) == 1.0)


def test_a_store_whose_attributes_disagree_is_refused(tmp_path):
    store = TargetStore.create_or_open(str(tmp_path), SPEC, "m", num_rows=3)
    group = zarr.open_group(store.zarr_url, mode="r+")
    meta = dict(group.attrs["phreg"])
    meta["spec"] = {**meta["spec"], "counts": 99}
    group.attrs["phreg"] = meta
    with pytest.raises(ConfigError, match="counts: 99"):
        TargetStore.create_or_open(str(tmp_path), SPEC, "m", num_rows=3)


def test_differences_name_the_keys():
    diff = describe_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 3}, "c": 2}, "store", "config")
    assert diff == ["a.b: 1 (store) != 3 (config)"]


def test_objects_written_by_other_processes_are_seen(s3_bucket):
    """Markers, leases and shards come from other processes: a cached listing must not hide
    them, while this process keeps reusing one filesystem instance."""
    import s3fs

    url, options = s3_bucket
    write_json(join_url(url, "complete", "00000000.json"), {}, options)
    fs, path = url_to_fs(url, options)
    fs.ls(f"{path}/complete")  # what would fill a listing cache
    s3fs.S3FileSystem(**options, skip_instance_cache=True).pipe(f"{path}/complete/00000001.json", b"{}")
    assert exists(join_url(url, "complete", "00000001.json"), options)
    assert url_to_fs(url, options)[0] is fs


def test_a_later_field_at_its_default_leaves_the_fingerprint_alone(tmp_path):
    """Stores made before `fps_start` existed keep their names; the reference start makes a
    store of its own, and a store reopens with the spec it was made with."""
    import hashlib
    import json
    from dataclasses import asdict

    before = {k: v for k, v in asdict(SPEC).items() if k != "fps_start"}
    assert SPEC.fingerprint == hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    reference = replace(SPEC, fps_start="random")
    assert reference.fingerprint != SPEC.fingerprint
    store = TargetStore.create_or_open(str(tmp_path), reference, "m", num_rows=3)
    assert TargetStore(store.url).spec == reference
    assert TargetStore.create_or_open(str(tmp_path), SPEC, "m", num_rows=3).spec == SPEC


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_direct_row_reads_equal_zarrs(tmp_path, request, where, dtype):
    """Rows read from their byte ranges (the shard index) equal what Zarr reads, for targets
    and crops, in any order, across units; a unit never written is an error, not zeros."""
    from pipeline.targets.rows import direct_readable

    root, options = (str(tmp_path), {}) if where == "local" else request.getfixturevalue("s3_bucket")
    store = TargetStore.create_or_open(root, replace(SPEC, dtype=dtype), "m", num_rows=12, storage_options=options,
                                       crops=True)
    rng = np.random.default_rng(0)
    for unit in (Unit(0, 0, 0, 3, 0), Unit(2, 2, 0, 2, 6)):  # unit 1 (rows 3-5) is never written
        feats = torch.from_numpy(rng.normal(size=(unit.count, 2, 2, 2, 8)).astype(np.float32))
        crops = rng.integers(0, 256, (unit.count, 2, 3, 32, 32), dtype=np.uint8)
        store.write_unit(unit, feats, np.zeros((unit.count, 2, 4)), crops)
    reopened = TargetStore(store.url, options)
    assert direct_readable(reopened.array("targets")) and direct_readable(reopened.array("crops"))
    rows = np.array([7, 0, 2, 6, 1, 8])
    for variant in (0, 1):
        crops = reopened.read_crops(rows, variant).numpy()
        targets = reopened.read_rows(rows, variant)
        for i, row in enumerate(rows):
            assert np.array_equal(crops[i], store.group["crops"][int(row), variant])
            assert np.array_equal(targets[i].float().numpy(), store.read(slice(int(row), int(row) + 1), variant)[0])
    for read in (reopened.read_crops, reopened.read_rows):
        with pytest.raises(FileNotFoundError, match="c/1/0/0/0/0"):
            read(np.array([4]), 0)


def test_compressed_stores_are_read_through_zarr(tmp_path):
    from pipeline.targets.rows import direct_readable

    store = TargetStore.create_or_open(str(tmp_path), SPEC, "m", num_rows=3, codec="zstd")
    feats = torch.randn(3, 2, 2, 2, 8)
    store.write_unit(Unit(0, 0, 0, 3, 0), feats, np.zeros((3, 2, 4)))
    assert not direct_readable(store.array("targets"))
    assert torch.equal(store.read_rows(np.array([2, 0]), 1).float(), feats[[2, 0], 1].half().float())


def test_markers_with_either_digest_verify_and_a_changed_row_fails_both(tmp_path):
    """Markers hold a CRC32C of the unit's rows; stores made before hold a sha256: verify reads
    which one a marker holds and recomputes that one."""
    from pipeline.targets.store import unit_digest
    from pipeline.targets.store_check import check_unit

    store = TargetStore.create_or_open(str(tmp_path), SPEC, "m", num_rows=3, crops=True)
    unit = Unit(0, 0, 0, 3, 0)
    feats = torch.randn(3, 2, 2, 2, 8)
    written = store.write_unit(unit, feats, np.ones((3, 2, 4)), np.full((3, 2, 3, 32, 32), 7, dtype=np.uint8))
    assert written["digest"].startswith("crc32c:")
    parts = {name: store.group[name][0:3] for name in ("targets", "boxes", "crops")}
    legacy = unit_digest(parts, "sha256")
    assert len(legacy) == 64 and unit_digest(parts) == written["digest"]
    for digest in (written["digest"], legacy):
        assert not [p for p in check_unit(store, unit, {"digest": digest}) if "digest" in p]
    store.group["crops"][1, 1, 0, 0, 0] = 8
    for digest in (written["digest"], legacy):
        assert any("digest mismatch" in p for p in check_unit(store, unit, {"digest": digest}))


def test_teacher_model_kwargs_name_a_store_of_their_own():
    """Teachers that differ only in their timm.create_model arguments make other targets, so
    they get other stores, and a mismatch names the argument; a teacher built without any keeps
    the spec (and so the store names) it had before the arguments were recorded."""
    plain = TeacherConfig(model="vit_tiny_patch16_224", img_size=64)
    two, one = (describe_teacher(plain.model_copy(update={"model_kwargs": {"depth": d, "num_heads": 3}})) for d in (2, 1))
    assert two.to_dict()["model_kwargs"] == {"depth": 2, "num_heads": 3}
    assert "model_kwargs" not in describe_teacher(plain).to_dict()
    assert describe_differences(two.to_dict(), one.to_dict(), "store", "config") == [
        "model_kwargs.depth: 2 (store) != 1 (config)"]
    assert replace(SPEC, teacher=two.to_dict()).fingerprint != replace(SPEC, teacher=one.to_dict()).fingerprint
