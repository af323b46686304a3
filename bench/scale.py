"""The `scale` section of `make bench`: the control plane at 1M and 10M images, by simulation.

No pixels and no Ray: a corpus of N images in shards of 256 (the default `shard.shard_size`)
cut into units of 64 rows, so that 10M images are 156,250 units, the ~150,000 completion
markers of the issue. Everything a driver does before its first unit is run with the
library's own functions on files shaped like the real ones: the manifest, realistic shard
records (every field the shard stage writes), a ViT-B/14 518 px float16 store with crops
(metadata only), markers as the teacher-cache writes them, locally and on the S3 endpoint.

Each step runs in a fresh Python process (`python -m bench.scale STEP CONTEXT`), so that
its peak memory (VmHWM) is its own: `scale_<step>_<1m|10m>_peak_mb` is the whole
process (interpreter and imports included: a driver imports the same modules, torch among
them), `_added_mb` what the timed part added above the memory it started from,
`_seconds` the timed part, and `scale_<step>_growth` = seconds(10M) / seconds(1M) (about
10 when linear).

Steps named `..._as_is` reproduce patterns that list every marker more often than once
per run, as the code did when this section was written: `store.completed()` once per unit
(`teacher_cache.run`'s second filter of its todo list, `caches.verify`'s list of units to
check), timed over a sample of units and extrapolated to all of them (`_estimated_seconds`),
and once per teacher-cache task (`TeacherTargets.compute_units`; `task_check_s3` is the
alternative: a check of the task's own units' markers). `teacher_cache_startup` lists the
markers twice, as `plan` and `run` do with one listing each. Steps on the S3 endpoint read
at most S3_READS markers and extrapolate: moto, in the bench's own process on 2 shared
cores, serves about 120 GETs/s whether they are sent one by one or concurrently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SCALES = {"1m": 1_000_000, "10m": 10_000_000}
CAPACITY, UNIT_ROWS = 256, 64  # shard size (default) and rows per unit: 156,250 units at 10M
DONE_FRACTION = 0.96  # a resumed teacher-cache: 150,000 of 156,250 units done at 10M
S3_MARKERS_PER_IMAGE = 1 / 500  # 2,000 / 20,000 markers on the S3 endpoint
WORLD, BATCH = 8, 64  # distill: 8 ranks, 64 samples per rank and step
SAMPLE_CALLS, S3_SAMPLE_CALLS = 20, 3  # per-unit listings timed for an `_as_is` estimate
S3_READS = 2_000  # markers read on the S3 endpoint (the rest extrapolated: moto serves ~120 GETs/s here)
CORPUS = "scale-bench"


# --- in the step's own process ----------------------------------------------------------------

def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over
    from the parent across fork and exec, so a child of the bench (torch imported) would
    report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _rss_mb() -> float:
    return _status_mb("VmRSS")


class Clock:
    """Times the blocks it wraps; remembers the memory in use when the first one started."""

    def __init__(self):
        self.seconds, self.base_mb = 0.0, None

    @contextmanager
    def __call__(self):
        if self.base_mb is None:
            self.base_mb = _rss_mb()
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start


def _spec(ctx):
    from pipeline.targets.store import StoreSpec

    return StoreSpec(**ctx["spec"])


def _counts(n: int) -> dict[int, int]:
    return {s: min(CAPACITY, n - s * CAPACITY) for s in range(-(-n // CAPACITY))}


def _inputs(n: int) -> list[str]:
    return [f"s3://corpus/raw/{i // 1000:05d}/{i:08d}.jpg" for i in range(n)]


def _image_hash(shard: int, position: int) -> str:
    """An image's sha256 as a record holds it: one in every 100 shards starts with a copy of
    the corpus's first image (a duplicate for the report to find)."""
    if position == 0 and shard % 100 == 0:
        shard = 0
    return hashlib.sha256(f"{shard}/{position}".encode()).hexdigest()


def _marker(unit_id: int, images: int) -> bytes:
    """A completion marker as the teacher-cache writes it (write_json: indent 1, sorted)."""
    info = {"unit": unit_id, "images": images, "variants": 1, "compute_seconds": 123.456, "write_seconds": 1.234,
            "node": "f" * 56, "raw_bytes": images * 2_102_784, "crop_bytes": images * 804_972,
            "digest": f"{unit_id:064x}"}
    return json.dumps(info, indent=1, sort_keys=True).encode()


def _store_url(ctx, where: str = "local") -> str:
    from pipeline.storage import join_url

    return join_url(ctx["cache" if where == "local" else "s3_cache"], _spec(ctx).fingerprint)


def _options(ctx, where: str):
    return ctx["s3_options"] if where == "s3" else None


# fixtures: not timed

def fixture_records(ctx, clock):
    """Every shard's record, with every field the shard stage writes (about 50 KB each)."""
    from pipeline.data.ingest import digest, record_url
    from pipeline.data.manifest import sample_key

    inputs, out = _inputs(ctx["n"]), ctx["shards"]
    os.makedirs(out, exist_ok=True)
    for s, count in _counts(ctx["n"]).items():
        group = inputs[s * CAPACITY:s * CAPACITY + count]
        record = {
            "shard": s, "tar": f"{s:05d}.tar", "count": count, "keys": [sample_key(s * CAPACITY + i) for i in range(count)],
            "offsets": [1536 + 70_000 * i for i in range(count)], "sizes": [68_000 + i for i in range(count)],
            "sources": group, "sha256": [_image_hash(s, i) for i in range(count)], "inputs": group,
            "inputs_digest": digest(group), "rejects": [], "rejects_by_reason": {}, "bytes_in": 70_000 * count,
            "bytes_out": 70_000 * count, "seconds": 12.345,
        }
        with open(record_url(out, s), "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True))
    return {}


def fixture_markers(ctx, clock, first: int, last: int, where: str = "local"):
    """Completion markers of units [first, last) of the manifest."""
    from pipeline.data.manifest import Manifest
    from pipeline.storage import url_to_fs

    manifest = Manifest.load(ctx["shards"])
    units = manifest.units()[first:last]
    folder = f"{_store_url(ctx, where)}/complete"
    if where == "local":
        os.makedirs(folder, exist_ok=True)
        for u in units:
            with open(f"{folder}/{u.id:08d}.json", "wb") as f:
                f.write(_marker(u.id, u.count))
    else:  # concurrent PUTs (s3fs batches them)
        fs, path = url_to_fs(folder, ctx["s3_options"])
        fs.pipe({f"{path}/{u.id:08d}.json": _marker(u.id, u.count) for u in units})
    return {"markers": len(units)}


def fixture_s3(ctx, clock):
    """The manifest and an empty store on the S3 endpoint."""
    from pipeline.data.manifest import Manifest
    from pipeline.targets.store import TargetStore

    manifest = Manifest.load(ctx["shards"])
    manifest.url = ctx["s3_shards"]
    manifest.save(ctx["s3_options"])
    TargetStore.create_or_open(ctx["s3_cache"], _spec(ctx), manifest.url, manifest.num_rows, ctx["s3_options"], crops=True)
    return {}


# measured steps

def step_imports(ctx, clock):
    """Only the imports a driver makes (torch and timm among them): the floor under the peaks."""
    with clock():
        import pipeline.data.manifest  # noqa: F401
        import pipeline.targets.store  # noqa: F401
        import pipeline.training.pairs  # noqa: F401
    return {}


def step_manifest_save(ctx, clock):
    from pipeline.data.ingest import digest
    from pipeline.data.manifest import Manifest

    counts = _counts(ctx["n"])
    digests = {s: digest([str(s)]) for s in counts}
    with clock():
        manifest = Manifest(ctx["shards"], CORPUS, CAPACITY, UNIT_ROWS, counts, digests)
        manifest.save()
    return {"bytes": os.path.getsize(f"{ctx['shards']}/manifest.json")}


def step_manifest_load(ctx, clock):
    from pipeline.data.manifest import Manifest

    with clock():
        units = Manifest.load(ctx["shards"]).units()
    return {"units": len(units)}


def step_shard_startup(ctx, clock):
    """The shard stage resuming a finished corpus: plan, finished records, resume check, and
    the duplicates of its report (the inputs' listing itself is left out: it is the storage's)."""
    from pipeline.data.ingest import plan_shards, resume_state
    from pipeline.data.records import duplicates, finished_records

    inputs = _inputs(ctx["n"])
    with clock():
        plan = plan_shards(inputs, CAPACITY)
        done = finished_records(ctx["shards"], plan, None)
        todo = resume_state(plan, {s: r["inputs_digest"] for s, r in done.items()})
        copies = duplicates(ctx["shards"], done, None)
    assert not todo and len(done) == len(plan)
    assert len(copies) == 1 and len(copies[0]["sources"]) == -(-len(plan) // 100)
    return {"records": len(done)}


def step_store_create(ctx, clock):
    from pipeline.targets.store import TargetStore

    spec = _spec(ctx)
    with clock():
        store = TargetStore.create_or_open(ctx["cache"], spec, ctx["shards"], ctx["rows"], crops=True)
    assert store.has_crops
    return {}


def step_store_open(ctx, clock):
    """Reopening (what every later run does): create_or_open finds it, compares the spec,
    grows nothing; then a fresh handle's attributes, spec and arrays."""
    from pipeline.targets.store import TargetStore

    spec = _spec(ctx)
    with clock():
        store = TargetStore.create_or_open(ctx["cache"], spec, ctx["shards"], ctx["rows"], crops=True)
        again = TargetStore(store.url)
        assert again.spec == spec and again.has_crops and again.array("targets").shape[0] == ctx["rows"]
    return {}


def _list(ctx, clock, where):
    from pipeline.targets.store import TargetStore

    store = TargetStore(_store_url(ctx, where), _options(ctx, where))
    with clock():
        done = store.completed()
    return {"markers": len(done)}


def step_list_local(ctx, clock):
    return _list(ctx, clock, "local")


def step_list_s3(ctx, clock):
    return _list(ctx, clock, "s3")


def _teacher_cache_startup(ctx, clock, where):
    """`teacher_cache.plan` without describe_teacher (constant) and the lease (constant):
    manifest, store created or reopened and grown, markers listed, units still to compute;
    then `run`'s second filter of todo against the markers, with one listing."""
    from pipeline.data.manifest import Manifest
    from pipeline.targets.store import TargetStore

    so, spec = _options(ctx, where), _spec(ctx)
    shards, cache = (ctx["shards"], ctx["cache"]) if where == "local" else (ctx["s3_shards"], ctx["s3_cache"])
    with clock():
        manifest = Manifest.load(shards, so)
        store = TargetStore.create_or_open(cache, spec, manifest.url, manifest.num_rows, so, crops=True)
        done = store.completed()
        units = manifest.units()
        todo = [u for u in units if u.id not in done]
        done = store.completed()
        todo = [u for u in todo if u.id not in done]
    return {"units": len(units), "todo": len(todo)}


def step_teacher_cache_startup(ctx, clock):
    return _teacher_cache_startup(ctx, clock, "local")


def step_teacher_cache_startup_s3(ctx, clock):
    return _teacher_cache_startup(ctx, clock, "s3")


def _as_is(ctx, clock, where, units_of, done_ones=False, sample=SAMPLE_CALLS):
    """`[u for u in units if u.id in/not in store.completed()]`: a listing per unit, timed
    over `sample` units and extrapolated."""
    from pipeline.data.manifest import Manifest
    from pipeline.targets.store import TargetStore

    so = _options(ctx, where)
    manifest = Manifest.load(ctx["shards"])
    store = TargetStore(_store_url(ctx, where), so)
    units = units_of(manifest.units(), store.completed())
    with clock():
        if done_ones:
            kept = [u for u in units[:sample] if u.id in store.completed()]
        else:
            kept = [u for u in units[:sample] if u.id not in store.completed()]
    assert len(kept) == min(sample, len(units))
    return {"estimated_seconds": clock.seconds * len(units) / max(1, len(kept)), "units": len(units)}


def step_teacher_cache_refilter_as_is(ctx, clock):
    """teacher_cache.run: compute(..., [u for u in todo if u.id not in store.completed()])."""
    return _as_is(ctx, clock, "local", lambda units, done: [u for u in units if u.id not in done])


def step_teacher_cache_refilter_as_is_s3(ctx, clock):
    return _as_is(ctx, clock, "s3", lambda units, done: [u for u in units if u.id not in done], sample=S3_SAMPLE_CALLS)


def _task_check(ctx, clock, proposed: bool):
    """What a teacher-cache task does before its first unit (`TeacherTargets.compute_units`):
    which of its units (16, the most per task) are complete already. As is: a listing of every
    marker, in every task. Proposed: an existence check of its own units' markers only."""
    from pipeline.data.manifest import Manifest
    from pipeline.storage import exists
    from pipeline.targets.store import TargetStore

    so = ctx["s3_options"]
    store = TargetStore(_store_url(ctx, "s3"), so)
    done = store.completed()
    task = [u for u in Manifest.load(ctx["shards"]).units() if u.id not in done][:16]
    store = TargetStore(store.url, so)
    with clock():
        if proposed:
            done = {u.id for u in task if exists(store.marker_url(u.id), so)}
        else:
            done = store.completed()
        todo = [u for u in task if u.id not in done]
    assert len(todo) == 16
    return {}


def step_task_check_as_is_s3(ctx, clock):
    return _task_check(ctx, clock, proposed=False)


def step_task_check_s3(ctx, clock):
    return _task_check(ctx, clock, proposed=True)


def step_verify_units_as_is(ctx, clock):
    """caches.verify: [u for u in manifest.units() if u.id in store.completed()]."""
    return _as_is(ctx, clock, "local", lambda units, done: units, done_ones=True)


def _verify(ctx, clock, where, batched: bool, limit: int | None = None):
    """`verify`'s share that grows with the markers: check_layout (attributes, shapes, a
    marker for every unit and none extra), then every marker read (each unit's check needs
    its digest). One by one, as `_check_units` reads them, or in one batch."""
    from pipeline.data.manifest import Manifest
    from pipeline.storage import read_json_many
    from pipeline.targets.store import TargetStore
    from pipeline.targets.store_check import check_layout

    so = _options(ctx, where)
    manifest = Manifest.load(ctx["shards"] if where == "local" else ctx["s3_shards"], so)
    store = TargetStore(_store_url(ctx, where), so)
    with clock():
        problems = check_layout(store, manifest)
        done = store.completed()
        ids = [u.id for u in manifest.units() if u.id in done]
    layout = clock.seconds
    with clock():
        if batched:
            loaded = read_json_many([store.marker_url(i) for i in ids[:limit]], so)
            markers = [loaded[store.marker_url(i)] for i in ids[:limit]]
        else:
            markers = [store.marker(i) for i in ids[:limit]]
    assert all(m["unit"] == i for m, i in zip(markers, ids))
    out = {"problems": len(problems), "markers": len(ids), "layout_seconds": layout}
    if len(markers) < len(ids):
        out["estimated_seconds"] = layout + (clock.seconds - layout) * len(ids) / len(markers)
    return out


def step_verify_markers(ctx, clock):
    return _verify(ctx, clock, "local", batched=False)


def step_verify_markers_batched(ctx, clock):
    return _verify(ctx, clock, "local", batched=True)


def step_verify_markers_s3(ctx, clock):
    return _verify(ctx, clock, "s3", batched=False, limit=S3_READS)


def step_verify_markers_batched_s3(ctx, clock):
    return _verify(ctx, clock, "s3", batched=True, limit=S3_READS)


def _no_data_pairs():
    from pipeline.training.pairs import CachedPairs

    class Plans(CachedPairs):
        """CachedPairs whose samples are not read: the plan alone."""

        def samples(self, epoch, unit_id, positions):
            return [(unit_id, len(positions))]

    return Plans


def step_epoch_plan(ctx, clock):
    """Rank 0 of WORLD: its StepBatches, and the epoch plan its first batch needs (every
    epoch's first batch costs one: each reader process computes the plans it needs)."""
    from pipeline.data.images import Preprocess
    from pipeline.data.manifest import Manifest
    from pipeline.training.pairs import StepBatches

    manifest = Manifest.load(ctx["shards"])
    source = _no_data_pairs()(manifest, Preprocess.from_dict(ctx["spec"]["teacher"]["preprocess"]))
    with clock():
        batches = StepBatches(source, seed=0, rank=0, world=WORLD, batch_size=BATCH, epochs=100)
        first = batches(0)
        last = batches(batches.steps_per_epoch - 1)
    assert sum(n for _, n in first) == sum(n for _, n in last) == BATCH
    return {"steps_per_epoch": batches.steps_per_epoch}


def step_distill_startup(ctx, clock):
    """`distill.prepare` (manifest, store found and complete, samples per rank), then rank
    0's worker up to its first batch (manifest, CachedPairs, StepBatches, epoch plan)."""
    from pipeline.data.images import Preprocess
    from pipeline.data.manifest import Manifest
    from pipeline.errors import ConfigError
    from pipeline.targets.store import TargetStore, list_stores
    from pipeline.training.pairs import StepBatches, samples_per_rank

    spec = _spec(ctx)
    with clock():
        # driver: find_store = locate_store (by fingerprint among the stores) + a marker per unit
        manifest = Manifest.load(ctx["shards"])
        stores = {s.url: s for s in list_stores(ctx["cache"])}
        store = stores[_store_url(ctx)]
        if store.spec.corpus_id != manifest.corpus_id or store.spec != spec:
            raise ConfigError("store does not match")
        units = [u.id for u in manifest.units()]
        missing = sorted(set(units) - store.completed())
        assert not missing
        per_rank = samples_per_rank(manifest.counts, WORLD)
        # rank 0
        manifest = Manifest.load(ctx["shards"])
        store = TargetStore(store.url)
        source = _no_data_pairs()(manifest, Preprocess.from_dict(store.spec.teacher["preprocess"]), store=store)
        batches = StepBatches(source, seed=0, rank=0, world=WORLD, batch_size=BATCH, epochs=100)
        batches(0)
    return {"samples_per_rank": per_rank}


def child(step: str, ctx_path: str) -> None:
    ctx = json.loads(Path(ctx_path).read_text())
    fn = globals()[step if step.startswith("fixture_") else f"step_{step}"]
    clock = Clock()
    extra = fn(ctx, clock, **ctx.get("args", {}))
    peak = _status_mb("VmHWM")
    result = {"seconds": clock.seconds, "peak_mb": peak, "added_mb": peak - (clock.base_mb or peak), **extra}
    print("SCALE-RESULT " + json.dumps(result), flush=True)


# --- in the bench's process ---------------------------------------------------------------------

def _run(step: str, ctx: dict, folder: Path, **args) -> dict:
    path = folder / f"ctx-{step}.json"
    path.write_text(json.dumps({**ctx, "args": args}))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.scale", step, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    if proc.returncode:
        raise RuntimeError(f"scale step {step} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("SCALE-RESULT ")][-1]
    result = json.loads(line.split(" ", 1)[1])
    print(f"[scale] {ctx['key']} {step}: {result} (process {time.perf_counter() - t:.1f} s)", flush=True)
    return result


def reference_spec() -> dict:
    # Imported here, as everything beyond the standard library in this module: a step's own
    # process (`python -m bench.scale`) must not pay for torch before its timed part.
    from bench.common import REFERENCE
    from pipeline.models.vit import describe_teacher
    from pipeline.targets.store import StoreSpec

    spec = StoreSpec(teacher=describe_teacher(REFERENCE).to_dict(), counts=10, shift_frac=0.15, flip=True, seed=0,
                     dtype="float16", variants=1, crop="center", corpus_id=CORPUS, unit_rows=UNIT_ROWS)
    return json.loads(json.dumps(spec.to_dict()))


def scale(work: Path, s3, scales: dict[str, int] = SCALES) -> dict:
    import s3fs

    out: dict = {}
    spec = reference_spec()
    bucket = s3.bucket("bench-scale")
    figures: dict[str, dict[str, dict]] = {}

    def measure(step, ctx, folder, **args):
        result = _run(step, ctx, folder, **args)
        figures.setdefault(step, {})[ctx["key"]] = result
        return result

    for key, n in scales.items():
        folder = work / "scale" / key
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with contextlib.suppress(FileNotFoundError):  # a previous run's objects
            s3fs.S3FileSystem(**s3.options).rm(f"{bucket.removeprefix('s3://')}/{key}", recursive=True)
        ctx = {"key": key, "n": n, "rows": -(-n // CAPACITY) * CAPACITY, "spec": spec,
               "shards": str(folder / "shards"), "cache": str(folder / "cache"),
               "s3_shards": f"{bucket}/{key}/shards", "s3_cache": f"{bucket}/{key}/cache", "s3_options": s3.options}
        if key == "1m":
            measure("imports", ctx, folder)
        units = sum(-(-c // UNIT_ROWS) for c in _counts(n).values())
        done = int(units * DONE_FRACTION)
        _run("fixture_records", ctx, folder)
        measure("manifest_save", ctx, folder)
        measure("manifest_load", ctx, folder)
        measure("shard_startup", ctx, folder)
        measure("store_create", ctx, folder)
        measure("store_open", ctx, folder)
        _run("fixture_markers", ctx, folder, first=0, last=done)
        measure("list_local", ctx, folder)
        measure("teacher_cache_startup", ctx, folder)
        measure("teacher_cache_refilter_as_is", ctx, folder)
        _run("fixture_markers", ctx, folder, first=done, last=units)
        measure("verify_markers", ctx, folder)
        measure("verify_markers_batched", ctx, folder)
        measure("verify_units_as_is", ctx, folder)
        measure("epoch_plan", ctx, folder)
        measure("distill_startup", ctx, folder)
        _run("fixture_s3", ctx, folder)
        _run("fixture_markers", ctx, folder, first=0, last=int(n * S3_MARKERS_PER_IMAGE), where="s3")
        measure("list_s3", ctx, folder)
        measure("teacher_cache_startup_s3", ctx, folder)
        measure("teacher_cache_refilter_as_is_s3", ctx, folder)
        measure("task_check_as_is_s3", ctx, folder)
        measure("task_check_s3", ctx, folder)
        measure("verify_markers_s3", ctx, folder)
        measure("verify_markers_batched_s3", ctx, folder)
        out[f"scale_units_{key}"] = units
        out[f"scale_manifest_bytes_{key}"] = figures["manifest_save"][key]["bytes"]
        shutil.rmtree(folder, ignore_errors=True)  # 2 GB of records and 156,250 markers at 10M

    for step, by_key in figures.items():
        for key, r in by_key.items():
            if "estimated_seconds" in r:
                out[f"scale_{step}_{key}_estimated_seconds"] = round(r["estimated_seconds"], 3)
            else:
                out[f"scale_{step}_{key}_seconds"] = round(r["seconds"], 3)
            out[f"scale_{step}_{key}_peak_mb"] = round(r["peak_mb"], 1)
            out[f"scale_{step}_{key}_added_mb"] = round(r["added_mb"], 1)
        if set(by_key) >= set(SCALES):
            seconds = {key: r.get("estimated_seconds", r["seconds"]) for key, r in by_key.items()}
            out[f"scale_{step}_growth"] = round(seconds["10m"] / max(seconds["1m"], 1e-6), 2)
    return out


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
