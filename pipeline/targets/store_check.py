"""Checks of a target store against its manifest (the `verify` command).

Each check returns problems as sentences a user can act on; an empty list means the store
is exactly what the manifest and the attributes say.
"""
from __future__ import annotations

import numpy as np

from pipeline.data.manifest import Manifest, Unit
from pipeline.targets.store import ENCODINGS, StoreSpec, TargetStore, decode, digest_kind, unit_digest


def check_layout(store: TargetStore, manifest: Manifest) -> list[str]:
    """Attributes, fingerprint, shapes and completion markers (no data read)."""
    problems = []
    attrs = store.attrs
    spec = StoreSpec(**attrs["spec"])
    name = store.url.rstrip("/").rsplit("/", 1)[-1]
    if not (spec.fingerprint == attrs["fingerprint"] == name):
        problems.append(f"fingerprint mismatch: folder {name}, attribute {attrs['fingerprint']}, "
                        f"hash of the recorded spec {spec.fingerprint} (attributes edited or store moved)")
    if spec.corpus_id != manifest.corpus_id:
        problems.append(f"store was built from corpus {spec.corpus_id}, the manifest at {manifest.url} is corpus {manifest.corpus_id}")
    if spec.unit_rows != manifest.unit_rows:
        problems.append(f"store units have {spec.unit_rows} rows, the manifest's have {manifest.unit_rows}")
    V, (gh, gw), D, rows = spec.variants, spec.grid, spec.dim, manifest.num_rows
    group = store.group
    expected = {
        "targets": ((V, gh, gw, D), ENCODINGS[spec.dtype]),
        "boxes": ((V, 4), "float32"),
        **({"scales": ((V, gh, gw), "float32")} if spec.dtype == "int8" else {}),
        **({"crops": ((V, 3, *spec.teacher["img_size"]), "uint8")} if store.has_crops else {}),
    }
    for array, (tail, dtype) in expected.items():
        if array not in group:
            problems.append(f"array {array!r} is missing")
            continue
        a = group[array]
        if a.shape[0] < rows or tuple(a.shape[1:]) != tail:
            problems.append(f"{array} has shape {a.shape}, expected ({rows}+, {', '.join(map(str, tail))})")
        if str(a.dtype) != dtype:
            problems.append(f"{array} has dtype {a.dtype}, expected {dtype} for storage type {spec.dtype}")
    units = {u.id for u in manifest.units()}
    done = store.completed()
    if missing := sorted(units - done):
        problems.append(f"{len(missing)} of {len(units)} units have no completion marker (first: {missing[:10]})")
    if extra := sorted(done - units):
        problems.append(f"{len(extra)} completion markers name units the manifest does not have (first: {extra[:10]})")
    return problems


def check_unit(store: TargetStore, unit: Unit, marker: dict) -> list[str]:
    """Rows of one complete unit: digest as written (crops included), finite, every row
    written, padding empty."""
    spec, rows = store.spec, store.spec.unit_rows
    block = slice(unit.start, unit.start + rows)
    parts = {name: store.group[name][block] for name in store.ARRAYS if name in store.group}
    where = f"unit {unit.id} (shard {unit.shard}, rows {unit.start}-{unit.start + unit.count - 1})"
    problems = []
    if marker.get("digest") != unit_digest(parts, digest_kind(marker.get("digest"))):
        problems.append(f"{where}: stored data differ from what was written (digest mismatch): corrupted or overwritten")
    values = decode(parts["targets"], parts.get("scales"), spec.dtype)
    bad = ~np.isfinite(values).reshape(rows, -1).all(axis=1)
    if bad.any():
        problems.append(f"{where}: NaN or Inf in rows {(unit.start + np.flatnonzero(bad)).tolist()[:10]}")
    empty = ~values.reshape(rows, -1).any(axis=1)
    rejected = np.zeros(rows, dtype=bool)  # images the stage could not read: zero rows, listed in the marker
    rejected[[r["index"] - unit.start for r in marker.get("rejected", [])]] = True
    if (empty[:unit.count] & ~rejected[:unit.count]).any():
        never = np.flatnonzero(empty[:unit.count] & ~rejected[:unit.count])
        problems.append(f"{where}: rows never written: {(unit.start + never).tolist()[:10]}")
    if not empty[unit.count:].all() or not empty[rejected].all():
        problems.append(f"{where}: rows past the shard's images, or of rejected images, hold data")
    boxes = parts["boxes"][:unit.count][~rejected[:unit.count]]
    if not ((boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])).all():
        problems.append(f"{where}: degenerate crop boxes")
    return problems
