"""The target store: denoised teacher features in a Zarr v3 group, one group per fingerprint.

Layout of `<cache_root>/<fingerprint>/` (readable with plain `zarr`, see docs/store-format.md):
      targets   (rows, V, gh, gw, D)  float16 | float32 | uint16 (bfloat16 bits) | int8
      scales    (rows, V, gh, gw)     float32, int8 stores only: target = targets * scales
      boxes     (rows, V, 4)          float32 crop box (left, top, right, bottom) in pixels of
                                      the shard's image: the student sees exactly this crop
      crops     (rows, V, 3, H, W)    uint8, that crop as the teacher saw it (stores made with
                                      cache.store_crops): students read it instead of decoding
    complete/<unit>.json            written after a unit's rows, with a digest of them: the unit
                                    is done. Outside the group, where zarr and xarray would
                                    take these files for broken members of the hierarchy.

Row `i` is global index `i` of the manifest. One Zarr shard of `targets` (and one chunk of
`scales` and `boxes`) holds exactly one unit of the manifest (`unit_rows` rows), so exactly
one writer ever touches an object, and a writer always writes its whole object (no
read-modify-write): a unit left half-written by a crash is simply overwritten when redone.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
import zarr

from pipeline.errors import ConfigError, PipelineError
from pipeline.storage import exists, fs_options, has_scheme, join_url, list_names, read_json, write_json
from pipeline.targets.rows import RowReader, crc32c, direct_readable, write_shard

FORMAT = "phreg-targets/2"
ENCODINGS = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "uint16",  # numpy has no bfloat16: the raw bits are stored
    "int8": "int8",  # per-token absmax scale in `scales`
}
# Compression of a new store's `targets` and `scales`. Dense float features barely compress
# (zstd saves about a tenth of float16 targets) while undoing zstd costs a reader more time per
# sample than decoding the JPEG (BENCHMARKS.md, "Data path"): stores are uncompressed unless
# asked. The codec changes no value, so it is not in the fingerprint; a store keeps the codec
# it was created with (Zarr records it) whatever a later config says.
CODECS = {
    "none": None,
    "lz4": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
}


LATER_FIELDS = {"fps_start": "origin"}


@dataclass(frozen=True)
class StoreSpec:
    """Everything that changes a target. Its hash names the store."""

    teacher: dict  # TeacherSpec.to_dict(): model, weights, img_size, patch, grid, dim, preprocess
    counts: int
    shift_frac: float
    flip: bool
    seed: int
    dtype: str
    variants: int
    crop: str
    corpus_id: str
    unit_rows: int
    infill: str = "white"
    fps_start: str = "origin"  # where farthest-point sampling of the views starts (tta.fps_start)

    def to_dict(self) -> dict:
        """The spec as stored and hashed. Fields added after the format are left out at their
        defaults, so stores made before them keep their names."""
        d = asdict(self)
        for name, default in LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.teacher["grid"])

    @property
    def dim(self) -> int:
        return self.teacher["dim"]


def unit_digest(parts: dict[str, np.ndarray], kind: str = "crc32c") -> str:
    """A digest of the arrays of one unit as stored (name order fixed), written in the unit's
    marker and recomputed by `verify`. CRC32C ("crc32c:<hex>", hardware-accelerated: ~7 GB/s
    here, against ~1.4 GB/s for sha256, which made hashing a third of a unit's write) detects
    corruption and overwrites, which is its job; markers written before hold a bare sha256."""
    if kind == "sha256":
        h = hashlib.sha256()
        for name in sorted(parts):
            h.update(name.encode())
            h.update(np.ascontiguousarray(parts[name]).tobytes())
        return h.hexdigest()
    value = 0
    for name in sorted(parts):
        value = crc32c(parts[name], crc32c(name.encode(), value))
    return f"crc32c:{value:08x}"


def digest_kind(digest: str | None) -> str:
    return "crc32c" if digest and digest.startswith("crc32c:") else "sha256"


def store_spec(tta, cache, teacher, manifest) -> StoreSpec:
    """The spec of the targets that the `tta` and `cache` config sections ask for, given the
    teacher's `TeacherSpec` and the corpus `Manifest`."""
    return StoreSpec(
        teacher=teacher.to_dict(), counts=tta.counts, shift_frac=tta.shift_frac, flip=tta.flip,
        seed=tta.seed, fps_start=tta.fps_start, dtype=cache.dtype, variants=cache.variants, crop=cache.crop_mode,
        corpus_id=manifest.corpus_id, unit_rows=manifest.unit_rows,
    )


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_differences(have: dict, want: dict, have_name: str, want_name: str) -> list[str]:
    a, b = flatten(have), flatten(want)
    return [f"{k}: {a.get(k)!r} ({have_name}) != {b.get(k)!r} ({want_name})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def encode_tensor(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (..., D) -> stored values (and per-token scales for int8), on x's device: a
    GPU encodes its own targets and only the stored bytes cross to the host. bfloat16 comes
    as its int16 bits (viewed as uint16 on the host)."""
    x = x.float()
    if dtype == "float32":
        return x, None
    if dtype == "float16":
        return x.half(), None
    if dtype == "bfloat16":
        return x.bfloat16().view(torch.int16), None
    # the absmax without a copy of |x|; two reductions: a CPU's aminmax along the last
    # dimension takes 7x as long as amax and amin together
    low, high = x.amin(dim=-1), x.amax(dim=-1)
    scale = torch.maximum(high, -low).clamp_(min=1e-12).div_(127.0)
    q = (x / scale.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def host_array(t: torch.Tensor) -> np.ndarray:
    """A host tensor of stored values as the numpy array the store holds (no copy)."""
    a = t.numpy()
    return a.view(np.uint16) if a.dtype == np.int16 else a


def encode(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 features (..., D) on the host -> stored array (and per-token scales for int8)."""
    stored, scales = encode_tensor(x.cpu(), dtype)
    return host_array(stored), None if scales is None else scales.numpy()


def decode(stored: np.ndarray, scales: np.ndarray | None, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        return stored.astype(np.float32) * scales[..., None]
    return stored.astype(np.float32)


def as_tensor(stored: np.ndarray, scales: np.ndarray | None, dtype: str) -> torch.Tensor:
    """Stored targets as a tensor in their own width (float16 stays float16: half the bytes
    to hand to the device, which converts it); int8 is decoded to float32 here."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
    if dtype == "int8":
        return torch.from_numpy(decode(stored, scales, dtype))
    return torch.from_numpy(np.ascontiguousarray(stored))


class TargetStore:
    """One store. Cheap to construct and to pickle; Zarr is opened lazily in each process."""

    def __init__(self, url: str, storage_options=None):
        self.url = url
        self.storage_options = storage_options or {}
        self._arrays_open: dict[str, zarr.Array] = {}
        self._row_readers: dict[str, RowReader | None] = {}
        self._pool: ThreadPoolExecutor | None = None  # overlapping row reads on object storage

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(state["url"], state["storage_options"])

    # --- opening -------------------------------------------------------------------------
    @property
    def zarr_url(self) -> str:
        return join_url(self.url, "targets.zarr")

    @cached_property
    def group(self) -> zarr.Group:
        try:
            return zarr.open_group(store=self.zarr_url, mode="r+", storage_options=self._zarr_options())
        except FileNotFoundError:
            raise PipelineError(f"no target store at {self.url}") from None

    def _zarr_options(self):
        return fs_options(self.url, self.storage_options) or None

    @cached_property
    def attrs(self) -> dict:
        meta = self.group.attrs.get("phreg")
        if not meta or meta.get("format") != FORMAT:
            raise PipelineError(f"{self.url} is not a target store of this pipeline")
        return meta

    @cached_property
    def spec(self) -> StoreSpec:
        return StoreSpec(**self.attrs["spec"])

    def array(self, name: str) -> zarr.Array:
        """An array of the group, opened once (each opening reads its metadata)."""
        if name not in self._arrays_open:
            self._arrays_open[name] = self.group[name]
        return self._arrays_open[name]

    @classmethod
    def create_or_open(cls, root: str, spec: StoreSpec, manifest_url: str, num_rows: int, storage_options=None,
                       codec: str = "none", crops: bool = False) -> "TargetStore":
        """The store for `spec` under `root`, created if needed (its targets compressed with
        `codec`, a key of CODECS; with each crop beside its targets if `crops`), grown to
        `num_rows` rows. Codec and crops change no target, so they are not in the fingerprint:
        an existing store keeps what it was made with."""
        url = join_url(root, spec.fingerprint)
        store = cls(url, storage_options)
        if exists(join_url(store.zarr_url, "zarr.json"), storage_options):
            have = store.attrs["spec"]
            if have != spec.to_dict():  # a hash collision or a hand-edited store
                diff = describe_differences(have, spec.to_dict(), "store", "config")
                raise ConfigError(f"store {url} does not hold what its name says:\n  " + "\n  ".join(diff))
            store.grow(num_rows)
            return store
        group = zarr.open_group(store=store.zarr_url, mode="w", zarr_format=3, storage_options=store._zarr_options())
        V, (gh, gw), D, cap = spec.variants, spec.grid, spec.dim, spec.unit_rows
        compressor = CODECS[codec]
        group.create_array(
            "targets", shape=(num_rows, V, gh, gw, D), dtype=ENCODINGS[spec.dtype], chunks=(1, 1, gh, gw, D),
            shards=(cap, V, gh, gw, D), compressors=compressor, fill_value=0,
            dimension_names=("row", "variant", "y", "x", "channel"),
        )
        if spec.dtype == "int8":
            group.create_array(
                "scales", shape=(num_rows, V, gh, gw), dtype="float32", chunks=(cap, V, gh, gw),
                compressors=compressor, fill_value=0, dimension_names=("row", "variant", "y", "x"),
            )
        group.create_array(
            "boxes", shape=(num_rows, V, 4), dtype="float32", chunks=(cap, V, 4), fill_value=0,
            dimension_names=("row", "variant", "box"),
        )
        if crops:  # sharded like the targets: a row of a unit is one ranged read, a unit one object
            h, w = spec.teacher["img_size"]
            group.create_array(
                "crops", shape=(num_rows, V, 3, h, w), dtype="uint8", chunks=(1, 1, 3, h, w), shards=(cap, V, 3, h, w),
                compressors=None, fill_value=0, dimension_names=("row", "variant", "rgb", "pixel_y", "pixel_x"),
            )
        group.attrs["phreg"] = {
            "format": FORMAT,
            "fingerprint": spec.fingerprint,
            "spec": spec.to_dict(),
            "manifest": manifest_url,
            "encoding": {"targets": ENCODINGS[spec.dtype], "dtype": spec.dtype, "codec": codec},
        }
        return store

    ARRAYS = ("targets", "scales", "boxes", "crops")

    def _arrays(self) -> list[zarr.Array]:
        return [self.group[name] for name in self.ARRAYS if name in self.group]

    @cached_property
    def has_crops(self) -> bool:
        """Whether each row's crop is stored (stores made before crops, or with
        cache.store_crops off, have only boxes: their students decode the shards' images)."""
        return "crops" in self.group

    def grow(self, num_rows: int) -> None:
        """Extend the row axis (done by the driver before any writer starts)."""
        for arr in self._arrays():
            if arr.shape[0] < num_rows:
                arr.resize((num_rows, *arr.shape[1:]))
        self.__dict__.pop("group", None)
        self._arrays_open.clear()
        self._row_readers.clear()

    # --- writing -------------------------------------------------------------------------
    def write_unit(self, unit, features: torch.Tensor, boxes: np.ndarray, crops: np.ndarray | None = None) -> dict:
        """Write a unit's rows: features (n, V, gh, gw, D) float32, boxes (n, V, 4) and, in a
        store with crops, crops (n, V, 3, H, W) uint8 (see `write_encoded`)."""
        stored, scales = encode(features, self.spec.dtype)
        parts = {"targets": stored, "boxes": boxes.astype(np.float32), "scales": scales, "crops": crops}
        return self.write_encoded(unit, {name: _padded(a, self.spec.unit_rows) for name, a in parts.items() if a is not None})

    def write_encoded(self, unit, parts: dict[str, np.ndarray]) -> dict:
        """Write a unit's stored arrays, each the unit's whole block of `unit_rows` rows (rows
        past its images zero), so every object is written whole: "targets", "boxes", "scales"
        (int8 stores) and "crops" (stores with crops). Sharded arrays of the uncompressed layout
        are written as their bytes (`write_shard`), the rest through Zarr. Returns the encoded
        sizes and a digest of what was written (recorded in the completion marker)."""
        if self.has_crops != ("crops" in parts):
            raise PipelineError(f"store {self.url} {'holds' if self.has_crops else 'has no'} crops: "
                                f"unit {unit.id} was given {'crops' if 'crops' in parts else 'none'}")
        rows = self.spec.unit_rows
        for name, data in parts.items():
            array = self.array(name)
            if direct_readable(array):
                write_shard(array, join_url(self.zarr_url, name), unit.start // rows, data, self.storage_options)
            else:
                array[unit.start:unit.start + rows] = data
        per_row = {name: parts[name][0].nbytes for name in ("targets", "crops") if name in parts}
        return {"raw_bytes": per_row["targets"] * unit.count,
                **({"crop_bytes": per_row["crops"] * unit.count} if "crops" in per_row else {}),
                "digest": unit_digest(parts)}

    def mark_complete(self, unit_id: int, info: dict) -> None:
        write_json(self.marker_url(unit_id), {"unit": unit_id, **info}, self.storage_options)

    def marker_url(self, unit_id: int) -> str:
        return join_url(self.url, "complete", f"{unit_id:08d}.json")

    def marker(self, unit_id: int) -> dict:
        return read_json(self.marker_url(unit_id), self.storage_options)

    def completed(self) -> set[int]:
        names = list_names(join_url(self.url, "complete"), self.storage_options)
        return {int(n.split(".")[0]) for n in names if n.endswith(".json")}

    def completed_among(self, unit_ids) -> set[int]:
        """Which of `unit_ids` have a marker: one check per unit, not a listing of every
        marker (a teacher-cache task holds at most 16 units of a store that may have 150,000
        markers: on S3 a listing is one request per 1,000 of them)."""
        return {u for u in unit_ids if exists(self.marker_url(u), self.storage_options)}

    # --- reading -------------------------------------------------------------------------
    def read(self, rows: slice | np.ndarray, variant: int) -> np.ndarray:
        """float32 targets (n, gh, gw, D) of `rows` for one variant."""
        stored = self.group["targets"][rows, variant]
        scales = self.group["scales"][rows, variant] if self.spec.dtype == "int8" else None
        return decode(stored, scales, self.spec.dtype)

    def read_boxes(self, rows: slice | np.ndarray, variant: int) -> np.ndarray:
        return self.array("boxes")[rows, variant]

    def _row_reader(self, name: str) -> RowReader | None:
        """Direct reads of whole rows for the uncompressed layout this store writes (None for
        a compressed store: Zarr decodes those)."""
        if name not in self._row_readers:
            array = self.array(name)
            self._row_readers[name] = RowReader(array, join_url(self.zarr_url, name), self.storage_options) \
                if direct_readable(array) else None
        return self._row_readers[name]

    def _rows(self, name: str, rows: np.ndarray, variant: int) -> np.ndarray:
        """Rows of one array, in the order given, for one variant. Row by row: a batch holds a
        few rows of a Zarr shard, and Zarr's fancy indexing would read the whole shard. On
        object storage the rows' reads overlap."""
        array, direct = self.array(name), self._row_reader(name)
        out = np.empty((len(rows), *array.shape[2:]), dtype=array.dtype)

        def read(i: int) -> None:
            if direct is not None:
                direct.read_into(int(rows[i]), variant, out[i])
            else:
                out[i] = array[int(rows[i]), variant]

        if has_scheme(self.url) and len(rows) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(8, thread_name_prefix="rows")
            list(self._pool.map(read, range(len(rows))))
        else:
            list(map(read, range(len(rows))))
        return out

    def read_crops(self, rows: np.ndarray, variant: int) -> torch.Tensor:
        """The stored uint8 crops (n, 3, H, W) of `rows` for one variant: what the teacher saw."""
        return torch.from_numpy(self._rows("crops", rows, variant))

    def read_rows(self, rows: np.ndarray, variant: int) -> torch.Tensor:
        """Targets (n, gh, gw, D) of `rows`, in the order given, for one variant, as `as_tensor`
        gives them."""
        stored = self._rows("targets", rows, variant)
        scales = None
        if self.spec.dtype == "int8":
            scales = np.stack([self.array("scales")[int(r), variant] for r in rows])
        return as_tensor(stored, scales, self.spec.dtype)


def _padded(a: np.ndarray, rows: int) -> np.ndarray:
    full = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    full[:len(a)] = a
    return full


def list_stores(root: str, storage_options=None) -> list[TargetStore]:
    stores = []
    for name in list_names(root, storage_options):
        store = TargetStore(join_url(root, name), storage_options)
        if exists(join_url(store.zarr_url, "zarr.json"), storage_options):
            try:
                store.attrs
            except PipelineError:
                continue
            stores.append(store)
    return stores


def find_store(spec: StoreSpec, cache_root: str, manifest, storage_options=None, url: str | None = None) -> TargetStore:
    """The complete store of targets `spec` for `manifest` (see `locate_store`), refusing any
    mismatch or missing unit with a precise message."""
    store = locate_store(spec, cache_root, manifest, storage_options, url)
    units = [u.id for u in manifest.units()]
    missing = sorted(set(units) - store.completed())
    if missing:
        raise ConfigError(f"store {store.url} is incomplete: {len(missing)} of {len(units)} units "
                          f"have no targets (first: {missing[:5]}); run the teacher-cache stage to finish it")
    return store


def locate_store(spec: StoreSpec, cache_root: str, manifest, storage_options=None, url: str | None = None) -> TargetStore:
    """The store at `url` (its teacher must be `spec`'s), or the one under `cache_root` whose
    fingerprint is `spec`'s; either way built from `manifest`'s corpus."""
    if url:
        store = TargetStore(url, storage_options)
        diff = describe_differences(store.spec.teacher, spec.teacher, "store", "config")
        if diff:
            raise ConfigError(f"the student config does not match the store {store.url}:\n  " + "\n  ".join(diff))
    else:
        store = TargetStore(join_url(cache_root, spec.fingerprint), storage_options)
        stores = {s.url: s for s in list_stores(cache_root, storage_options)}
        if store.url not in stores:
            lines = [f"no target store under {cache_root} matches this config (fingerprint {spec.fingerprint})."]
            for other in stores.values():
                diff = describe_differences(StoreSpec(**other.attrs["spec"]).to_dict(), spec.to_dict(), "store", "config")
                lines.append(f"{other.url} differs in:\n    " + "\n    ".join(diff))
            lines.append("Run the teacher-cache stage with this config, or set distill.store to an existing store.")
            raise ConfigError("\n".join(lines))
    if store.spec.corpus_id != manifest.corpus_id:
        raise ConfigError(f"store {store.url} was built from corpus {store.spec.corpus_id}, "
                          f"but {manifest.url} holds corpus {manifest.corpus_id}")
    return store
