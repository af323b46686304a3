"""`make bench`: measure the pipeline on this machine and write bench/results.json.

Every figure is measured here, in one run, and written with flat keys so that a script can
compare runs. Variants are compared as ratios measured side by side (this machine is shared
and noisy). BENCHMARKS.md summarises a run and names the command that produced it.

    python -m bench.run                      # everything
    python -m bench.run --only storage,planning
    python -m bench.run --only scale         # the control plane at 1M and 10M images (bench/scale.py)
    python -m bench.run --only teacher_sink  # a teacher actor's targets into the store (bench/sink.py)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import bench.clip_planted  # noqa: E402
import bench.data_path  # noqa: E402
import bench.gpu  # noqa: E402
import bench.neuron_planted  # noqa: E402
import bench.planted  # noqa: E402
import bench.scale  # noqa: E402
import bench.sink  # noqa: E402
from bench.common import flops, steady_rate, vitb_features  # noqa: E402
from bench.planted_run import HELDOUT_IMAGES, heldout_corpus, heldout_input  # noqa: E402
from pipeline.config import load_config  # noqa: E402

RESULTS = Path(__file__).with_name("results.json")
TINY_TEACHER = {"teacher.model": "vit_tiny_patch16_224", "teacher.img_size": 224}


class S3:
    """moto's S3 server on loopback, as the tests use it."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server._server.server_address
        self.options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}

    def bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(**self.options).mkdir(name)
        return f"s3://{name}"


@ray.remote(num_cpus=1)
class ForwardActor:
    """The teacher forward alone, on inputs shaped like the teacher-cache's batches."""

    def __init__(self, teacher_cfg, threads: int):
        from pipeline.models.vit import load_teacher

        torch.set_num_threads(threads)
        self.model = load_teacher(teacher_cfg)
        self.size = teacher_cfg.hw

    def run(self, images: int, batch_images: int, counts: int) -> tuple[float, float]:
        from pipeline.models.vit import patch_features

        x = torch.randn(batch_images * counts, 3, *self.size)
        with torch.inference_mode():
            patch_features(self.model, x)  # warm-up
            start = time.time()
            for _ in range(images // batch_images):
                patch_features(self.model, x)
        return start, time.time()


def forward_bound(cfg, actors: int, images_each: int) -> float:
    """images/s of the bare teacher forward at `counts` views per image, on `actors`
    concurrent actors with the stage's threads: the bound the full stage is compared to."""
    pool = [ForwardActor.remote(cfg.teacher, cfg.cache.resources.threads or 1) for _ in range(actors)]
    spans = ray.get([a.run.remote(images_each, cfg.cache.batch_images, cfg.tta.counts) for a in pool])
    for a in pool:
        ray.kill(a)
    return actors * images_each / (max(e for _, e in spans) - min(s for s, _ in spans))


def teacher_cache(work: Path, s3: S3) -> dict:
    """Full stage (decode -> TTA -> forward -> recover -> compress -> write) against the
    forward-only bound, same model, same actors' resources, same run; local and S3 stores."""
    from stages import shard
    from stages import teacher_cache as stage

    out = {}
    shutil.rmtree(work / "tc", ignore_errors=True)
    settings = {**TINY_TEACHER, "shard.sample_size": 48, "shard.shard_size": 8, "tta.counts": 10,
                "cache.batch_images": 2, "cache.num_actors": 2, "cache.resources.cpus": 1, "cache.resources.threads": 1,
                # one task of 3 units per actor: the steady state of a large corpus, where each task holds
                # up to 16 units and the reader and writer overlap across them
                "cache.units_per_task": 3}
    roots = {"local": str(work / "tc"), "s3": f"{s3.bucket('bench-tc')}/tc"}
    bounds, rates, driver_cpu = [], {}, {}
    for where, root in [("local", roots["local"]), ("s3", roots["s3"]), ("local2", roots["local"])]:
        opts = s3.options if where == "s3" else {}
        cfg = load_config([], {**settings, "storage.run_root": root, "storage.storage_options": opts,
                               "cache.root": f"{root}/cache-{where}"})
        if where != "local2":
            shard.run(cfg)
        bounds.append(forward_bound(cfg, actors=2, images_each=24))
        manifest, store, todo = stage.plan(cfg)
        cpu = time.process_time()  # this process also serves the S3 endpoint: its CPU is taken from the actors
        stats = stage.compute(cfg, store, manifest, todo)
        rates[where], driver_cpu[where] = stats["images_per_s"], (time.process_time() - cpu) / stats["seconds"]
    bound = float(np.mean(bounds))
    local = float(np.mean([rates["local"], rates["local2"]]))
    out["teacher_cache_forward_bound_images_per_s"] = round(bound, 3)
    out["teacher_cache_images_per_s"] = round(local, 3)
    out["teacher_cache_efficiency"] = round(local / bound, 3)
    out["teacher_cache_images_per_s_s3"] = round(rates["s3"], 3)
    out["teacher_cache_efficiency_s3"] = round(rates["s3"] / bound, 3)
    out["teacher_cache_endpoint_cpu_share_s3"] = round((driver_cpu["s3"] - driver_cpu["local"]) / (os.cpu_count() or 1), 3)
    return out


def storage(work: Path) -> dict:
    """Bytes per image and fidelity against float32 for each storage type (ViT-B/14 @ 518)."""
    from pipeline.data.manifest import Unit
    from pipeline.targets.store import StoreSpec, TargetStore

    feats = vitb_features(4)
    n, gh, gw, D = feats.shape
    out = {}
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        spec = StoreSpec(teacher={"grid": [gh, gw], "dim": D}, counts=10, shift_frac=0.15, flip=True, seed=0,
                         dtype=dtype, variants=1, crop="center", corpus_id="bench", unit_rows=n)
        root = work / "storage" / dtype
        shutil.rmtree(root, ignore_errors=True)
        store = TargetStore.create_or_open(str(root), spec, "bench", num_rows=n)
        store.write_unit(Unit(0, 0, 0, n, 0), feats[:, None], np.tile([0, 0, 518, 518], (n, 1, 1)))
        stored = sum(f.stat().st_size for name in ("targets", "scales") for f in (Path(store.zarr_url) / name).rglob("*")
                     if f.is_file() and f.name != "zarr.json")
        back = torch.from_numpy(store.read(slice(0, n), 0))
        cos = torch.nn.functional.cosine_similarity(back, feats, dim=-1)
        rel = (back - feats).norm(dim=-1) / feats.norm(dim=-1)
        out[f"bytes_per_image_{dtype}"] = int(stored / n)
        out[f"cosine_mean_{dtype}"] = float(cos.mean())
        out[f"cosine_min_{dtype}"] = float(cos.min())
        out[f"relative_error_mean_{dtype}"] = float(rel.mean())
        out[f"relative_error_max_{dtype}"] = float(rel.max())
    out["bytes_per_image_raw_float16"] = gh * gw * D * 2
    return out


@ray.remote(num_cpus=1)
def _write_units(url, options, spec_dict, unit_ids, rows):
    from pipeline.data.manifest import Unit
    from pipeline.targets.store import TargetStore

    store = TargetStore(url, options)
    rng = np.random.default_rng(unit_ids[0])
    start = time.time()
    for u in unit_ids:
        feats = torch.from_numpy(rng.standard_normal((rows, 1, *spec_dict["teacher"]["grid"], spec_dict["teacher"]["dim"]),
                                                     dtype=np.float32))
        store.write_unit(Unit(u, u, 0, rows, u * rows), feats, np.tile([0, 0, 1, 1], (rows, 1, 1)))
    return start, time.time()


def s3_write(s3: S3) -> dict:
    """Throughput of two writers putting ViT-B/14-sized float16 units into a store on the
    S3 endpoint (MB of stored objects per second)."""
    import s3fs

    from pipeline.targets.store import StoreSpec, TargetStore

    rows, units = 8, 8
    spec = StoreSpec(teacher={"grid": [37, 37], "dim": 768}, counts=10, shift_frac=0.15, flip=True, seed=0,
                     dtype="float16", variants=1, crop="center", corpus_id="bench", unit_rows=rows)
    root = f"{s3.bucket('bench-write')}/cache"
    store = TargetStore.create_or_open(root, spec, "bench", num_rows=rows * units, storage_options=s3.options)
    spans = ray.get([_write_units.remote(store.url, s3.options, {"teacher": spec.teacher}, list(range(w, units, 2)), rows)
                     for w in range(2)])
    fs = s3fs.S3FileSystem(**s3.options)
    stored = sum(fs.du(store.zarr_url.removeprefix("s3://") + "/targets", total=False).values())
    seconds = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"s3_write_mb_per_s": round(stored / seconds / 1e6, 2), "s3_write_mb": round(stored / 1e6, 1)}


def planning(work: Path) -> dict:
    """Planning and resume over a synthetic corpus of 1,000,000 inputs (no image data)."""
    from pipeline.data.ingest import digest, plan_shards, record_url, resume_state
    from pipeline.data.manifest import Manifest
    from pipeline.storage import write_json
    from pipeline.data.records import finished_records

    out, folder = {}, work / "planning"
    shutil.rmtree(folder, ignore_errors=True)
    inputs = [f"s3://corpus/raw/{i // 1000:04d}/{i:08d}.jpg" for i in range(1_000_000)]
    t = time.perf_counter()
    plan = plan_shards(inputs, 256)
    out["planning_1m_plan_seconds"] = round(time.perf_counter() - t, 3)
    for s, group in plan.items():  # a finished shard's record, as the shard stage writes it
        write_json(record_url(str(folder), s), {"inputs_digest": digest(group), "keys": [str(i) for i in range(len(group))],
                                                "offsets": list(range(0, 512 * len(group), 512)), "sizes": [512] * len(group)})
    t = time.perf_counter()
    done = finished_records(str(folder), plan, None)
    todo = resume_state(plan, {s: r["inputs_digest"] for s, r in done.items()})
    out["planning_1m_resume_seconds"] = round(time.perf_counter() - t, 3)
    assert not todo
    manifest = Manifest(str(folder), "bench", 256, 256, {s: len(v) for s, v in plan.items()},
                        {s: r["inputs_digest"] for s, r in done.items()})
    t = time.perf_counter()
    manifest.save()
    loaded = Manifest.load(str(folder))
    units = loaded.units()
    out["planning_1m_manifest_seconds"] = round(time.perf_counter() - t, 3)
    out["planning_1m_manifest_bytes"] = (folder / "manifest.json").stat().st_size
    assert len(units) == 3907
    return out


def _raw_compute_ratio(cfg, threads: int = 2, repeats: int = 6) -> float:
    """(teacher forward over all views + student step) / student step, compute alone: what the
    cached-vs-online speed-up would be with free I/O, measured now on this machine."""
    from pipeline.models.vit import PatchFeatures, build_student, load_teacher, patch_features, unlock
    from pipeline.training.losses import distill_loss

    torch.set_num_threads(threads)
    teacher = load_teacher(cfg.teacher)
    student = build_student(teacher, cfg.teacher, cfg.student)
    unlock(student, cfg.student.unlock_patterns)
    model = PatchFeatures(student, None)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(cfg.distill.batch_size, 3, *cfg.teacher.hw)
    views = x.repeat(cfg.tta.counts, 1, 1, 1)

    def student_step():
        pred = model(x)
        loss, _, _ = distill_loss(pred, torch.randn_like(pred), cfg.distill.mse_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def teacher_views():
        with torch.inference_mode():
            patch_features(teacher, views)

    times = {f: [] for f in (student_step, teacher_views)}
    for i in range(repeats + 1):
        for f in times:
            t = time.perf_counter()
            f()
            if i:  # the first round warms up
                times[f].append(time.perf_counter() - t)
    s, t = float(np.median(times[student_step])), float(np.median(times[teacher_views]))
    return (s + t) / s


def distill_speed(work: Path, s3: S3) -> dict:
    """Students per second from cached targets vs online TTA (counts=10), 1 vs 2 Ray Train
    workers on the same two cores, and the share of step time spent waiting for data from a
    local and an S3 store. Same student, same images, same run."""
    from pipeline.storage import join_url
    from stages import distill, shard, teacher_cache

    out = {}
    shutil.rmtree(work / "distill", ignore_errors=True)
    base = {**TINY_TEACHER, "shard.sample_size": 64, "shard.shard_size": 16, "tta.counts": 10, "cache.batch_images": 2,
            "distill.batch_size": 8, "distill.log_every": 2, "distill.checkpoint_every": 1000}
    roots = {"local": str(work / "distill"), "s3": f"{s3.bucket('bench-distill')}/distill"}
    for where, root in roots.items():
        cfg = load_config([], {**base, "storage.run_root": root, "storage.storage_options": s3.options if where == "s3" else {}})
        shard.run(cfg)
        teacher_cache.run(cfg)
    runs = {  # name: (root, overrides)
        "cached_1w": ("local", {"distill.num_workers": 1, "distill.resources.cpus": 2, "distill.resources.threads": 2,
                                "distill.epochs": 6}),
        "cached_2w": ("local", {"distill.num_workers": 2, "distill.resources.cpus": 1, "distill.resources.threads": 1,
                                "distill.epochs": 6}),
        "online_1w": ("local", {"distill.num_workers": 1, "distill.resources.cpus": 2, "distill.resources.threads": 2,
                                "distill.epochs": 2, "distill.targets": "online"}),
        "cached_1w_s3": ("s3", {"distill.num_workers": 1, "distill.resources.cpus": 2, "distill.resources.threads": 2,
                                "distill.epochs": 3}),
    }
    rates = {}
    for name, (where, overrides) in runs.items():
        options = s3.options if where == "s3" else {}
        cfg = load_config([], {**base, **overrides, "storage.run_root": roots[where], "storage.storage_options": options,
                               "student.name": name})
        distill.run(cfg)
        rates[name] = steady_rate(join_url(cfg.students_url, name), options)
    out["distill_samples_per_s_1_worker"] = round(rates["cached_1w"][0], 3)
    out["distill_samples_per_s_2_workers"] = round(rates["cached_2w"][0], 3)
    out["distill_online_samples_per_s"] = round(rates["online_1w"][0], 3)
    out["cached_vs_online_speedup"] = round(rates["cached_1w"][0] / rates["online_1w"][0], 3)
    out["cached_vs_online_speedup_compute_only"] = round(_raw_compute_ratio(load_config([], base)), 3)
    out["data_wait_fraction_local"] = round(rates["cached_1w"][1], 4)
    out["data_wait_fraction_local_2_workers"] = round(rates["cached_2w"][1], 4)
    out["data_wait_fraction_s3"] = round(rates["cached_1w_s3"][1], 4)
    out["distill_samples_per_s_s3"] = round(rates["cached_1w_s3"][0], 3)
    return out


def caching_price(work: Path) -> dict:
    """Online targets (fresh crops and views every epoch, the reference) vs cached V=1 (centre
    crop) vs cached V=4 (random crops): same planted-artifact teacher, same 48 training images,
    same steps; fidelity and outliers measured on 16 held-out images against their V=1 targets."""
    from pipeline.storage import join_url
    from stages import distill, evaluate, export, shard, teacher_cache

    configs = bench.planted.CONFIGS
    root = work / "caching"
    shutil.rmtree(root, ignore_errors=True)
    photos, heldout_shards = heldout_corpus(str(root))
    base = {"storage.run_root": str(root), "distill.epochs": 40, "evaluate.labeled": None}
    heldout = load_config(configs, {**base, **heldout_input(photos, heldout_shards)})
    shard.run(load_config(configs, base))
    shard.run(heldout)
    heldout_store = teacher_cache.run(heldout).url
    students = {
        "online": {"distill.targets": "online"},
        "cached_v1": {},
        "cached_v4": {"cache.variants": 4},
    }
    out = {}
    for name, extra in students.items():
        cfg = load_config(configs, {**base, **extra, "student.name": name, "evaluate.shards": heldout_shards,
                                    "evaluate.store": heldout_store, "evaluate.num_images": HELDOUT_IMAGES})
        if extra.get("distill.targets") != "online":
            teacher_cache.run(cfg)
        distill.run(cfg)
        export.run(cfg)
        report = evaluate.run(cfg)
        samples_per_s, _ = steady_rate(join_url(cfg.students_url, name))
        out[f"caching_cosine_heldout_{name}"] = round(report["fidelity"]["student"]["cosine"], 4)
        out[f"caching_outliers_heldout_{name}"] = round(report["norms"]["student"]["outliers_per_image"], 3)
        out[f"caching_samples_per_s_{name}"] = round(samples_per_s, 2)
    out["caching_cosine_heldout_teacher"] = round(report["fidelity"]["teacher"]["cosine"], 4)
    out["caching_outliers_heldout_teacher"] = round(report["norms"]["teacher"]["outliers_per_image"], 3)
    return out


# The sections kept in their own modules. Each wrapper's parameters name what `main` passes it.

def planted(work: Path) -> dict:
    return bench.planted.planted_outliers(str(work / "planted"))


def neuron_planted(work: Path) -> dict:
    shutil.rmtree(work / "neuron_planted", ignore_errors=True)
    return bench.neuron_planted.neuron_planted(str(work / "neuron_planted"))


def zeroshot(work: Path) -> dict:
    shutil.rmtree(work / "zeroshot", ignore_errors=True)
    return bench.clip_planted.zeroshot_planted(str(work / "zeroshot"))


def data_path(work: Path, s3: S3) -> dict:
    return bench.data_path.data_path(work, s3)


def scale(work: Path, s3: S3) -> dict:
    return bench.scale.scale(work, s3)


def teacher_sink(work: Path, s3: S3) -> dict:
    return bench.sink.teacher_sink(work, s3)


def gpu(work: Path) -> dict:
    return bench.gpu.gpu(work)


SECTIONS = {"planning": planning, "flops": flops, "storage": storage, "s3_write": s3_write,
            "teacher_cache": teacher_cache, "distill": distill_speed, "planted": planted, "caching": caching_price,
            "neuron_planted": neuron_planted, "zeroshot": zeroshot, "data_path": data_path, "teacher_sink": teacher_sink,
            "scale": scale, "gpu": gpu}

# Sections that time processes of their own and use no Ray: Ray's idle daemons would take CPU
# from them on a 2-core machine (2 readers scaled 1.77x beside a running Ray, 1.82x without).
WITHOUT_RAY = {"data_path", "teacher_sink", "scale"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--workdir", default=str(Path(__file__).with_name("work")))
    args = parser.parse_args()
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    s3 = None
    for name in args.only.split(","):
        fn = SECTIONS[name]
        if name in WITHOUT_RAY:
            ray.shutdown()
        elif not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                     runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
        needs = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        if "s3" in needs and s3 is None:
            s3 = S3()
        kwargs = {"work": work, "s3": s3}
        t = time.perf_counter()
        figures = fn(**{k: kwargs[k] for k in needs})
        print(f"[bench] {name} ({time.perf_counter() - t:.0f} s): {json.dumps(figures)}", flush=True)
        # Read again before writing: another run may have added its sections' keys meanwhile.
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.update(figures)
        results["bench_cpus"] = os.cpu_count()
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"[bench] results -> {RESULTS}")


if __name__ == "__main__":
    main()
