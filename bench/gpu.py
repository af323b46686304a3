"""The `gpu` section of `make bench` (only where CUDA exists): one GPU fed by the pipeline.

DINOv2 ViT-B/14 at 518 px with random weights, on IMAGES photographs like the `data_path`
reference corpus:
- teacher cache: images/s of `TeacherTargets` (10 views per image, bf16 autocast, two reader
  processes) between the ends of its first and last units, and its fraction of the bound set
  by the bare teacher forward on batches of the same shape;
- where a teacher-cache batch's time goes (a synchronisation after each phase: reader wait,
  copy and normalise, views, forward, recovery, the sink's encode and copy), the forward's
  TFLOP/s, and the forward eager against `cache.compile`;
- distillation: samples/s of the distill stage (one Ray Train worker on the GPU, two reader
  processes) and the fraction of step time it waited for data, reading the stored crops (the
  default) and, for the same run's ratio, decoding each image (a store without crops); and the
  online regime (targets computed in every step) for the cached-vs-online speed-up end to end.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import REFERENCE, flops, steady_rate
from bench.data_path import reference_corpus
from pipeline.config import load_config
from pipeline.models.vit import describe_teacher
from pipeline.storage import join_url
from pipeline.targets.store import TargetStore, store_spec
from pipeline.targets.teacher_targets import TeacherTargets

BATCH_IMAGES, COUNTS, READERS = 4, 10, 2
IMAGES = 512  # 8 units: the steady rate spans 7


def _config(work: Path, shards: str, **extra):
    return load_config([], {"storage.run_root": str(work / "gpu"), "shard.output": shards,
                            "teacher.model": REFERENCE.model, "teacher.img_size": REFERENCE.img_size,
                            "tta.counts": COUNTS, "cache.batch_images": BATCH_IMAGES, "cache.resources.readers": READERS,
                            "distill.resources.readers": READERS, **extra})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_images_per_s(computer: TeacherTargets, repeats: int = 10) -> float:
    """Images/s of the bare teacher forward on batches of BATCH_IMAGES x COUNTS views."""
    x = torch.randn(BATCH_IMAGES * COUNTS, 3, *computer.preprocess.size, device=computer.device)
    computer.features(x)
    _sync(computer.device)
    start = time.perf_counter()
    for _ in range(repeats):
        computer.features(x)
    _sync(computer.device)
    return repeats * BATCH_IMAGES / (time.perf_counter() - start)


def phases(computer: TeacherTargets, manifest, units) -> dict:
    """Milliseconds per batch of each phase of the teacher-cache loop, the GPU synchronised
    after each (so their sum exceeds the overlapped loop's time)."""
    from pipeline.data.readers import in_order
    from pipeline.targets.sink import UnitSink
    from pipeline.targets.teacher_targets import UnitViews, view_jobs
    from pipeline.targets.tta import recover, render_views

    jobs = view_jobs(units, computer.spec.variants, BATCH_IMAGES)
    batches = in_order(UnitViews(manifest, computer.spec, computer.preprocess, jobs), len(jobs), READERS, 2,
                       pin_memory=computer.device.type == "cuda")
    device = computer.device
    sink, spent = UnitSink(computer.store, device), {}

    def timed(name, fn):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return out

    for unit, pairs in jobs:
        batch = timed("reader_wait", lambda: next(batches))
        pixels, box, offsets, flips = batch.pixels, batch.box, batch.offsets, batch.flips
        if pairs[0] == (0, 0):
            sink.begin(unit)
        images = timed("copy_normalise", lambda: computer.preprocess.normalize(pixels.to(device, non_blocking=True)))
        views = timed("views", lambda: render_views(images, offsets, flips, computer.patch, computer.fill))
        tokens = timed("forward", lambda: computer.features(views.flatten(0, 1)))
        targets = timed("recover", lambda: recover(tokens.view(*views.shape[:2], *tokens.shape[1:]), offsets, flips)[0])
        timed("sink_add", lambda: sink.add(pairs[0][0] * computer.spec.variants + pairs[0][1], targets, box, pixels))
        if pairs[-1] == (unit.count - 1, computer.spec.variants - 1):
            sink.end(unit)
    sink.drain()
    return {f"gpu_teacher_phase_ms_{name}": round(1e3 * s / len(jobs), 2) for name, s in spent.items()}


def steady_images_per_s(units, stats: list[dict]) -> float:
    """Images/s between the first unit's end and the last's (the first holds start-up: reader
    processes, autotuning): units finish at the rate they are computed."""
    counts = {u.id: u.count for u in units}
    stats = sorted(stats, key=lambda r: r["finished"])
    return sum(counts[r["unit"]] for r in stats[1:]) / (stats[-1]["finished"] - stats[0]["finished"])


def gpu(work: Path) -> dict:
    if not torch.cuda.is_available():
        print("[bench] gpu: no CUDA device here, section skipped")
        return {}
    return measure(work, torch.device("cuda"))


def measure(work: Path, device: torch.device, images: int = IMAGES) -> dict:
    """The section's figures on `device` (a CPU only to rehearse the code, with a small teacher
    patched into REFERENCE)."""
    from stages import distill

    manifest = reference_corpus(str(work / "gpu" / "corpus"), images=images)
    cfg = _config(work, manifest.url)
    spec = store_spec(cfg.tta, cfg.cache, describe_teacher(cfg.teacher), manifest)
    store = TargetStore.create_or_open(cfg.cache_root, spec, manifest.url, manifest.num_rows, crops=True)
    units = manifest.units()

    def computer(target=store, compile=False):
        return TeacherTargets(cfg.teacher, target, manifest, BATCH_IMAGES, device=device, readers=READERS, compile=compile)

    teacher = computer()
    cache_rate = steady_images_per_s(units, teacher.compute_units(units))
    bound = forward_images_per_s(teacher)
    breakdown = phases(teacher, manifest, units[1:2])
    compiled = computer(compile=True)
    forward_images_per_s(compiled, repeats=2)  # compiles
    compiled_bound = forward_images_per_s(compiled)
    del teacher, compiled
    plain = TargetStore.create_or_open(str(work / "gpu" / "plain"), spec, manifest.url, manifest.num_rows)
    computer(plain).compute_units(units)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    common = {"distill.resources.use_gpu": device.type == "cuda", "distill.num_workers": 1, "distill.resources.cpus": READERS + 1,
              "distill.batch_size": 8, "distill.log_every": 4, "distill.checkpoint_every": 1000}
    rates = {}
    for name, source in (("gpu-bench", store), ("gpu-bench-decoding", plain)):
        run = _config(work, manifest.url, **common, **{"distill.store": source.url, "distill.epochs": 2, "student.name": name})
        distill.run(run)
        rates[name] = steady_rate(join_url(run.students_url, name))
    (samples_per_s, waited), (decoding, decoding_waited) = rates["gpu-bench"], rates["gpu-bench-decoding"]
    online = _config(work, manifest.url, **common, **{"distill.targets": "online", "distill.epochs": 1,
                                                       "student.name": "gpu-bench-online"})
    distill.run(online)
    online_rate, _ = steady_rate(join_url(online.students_url, "gpu-bench-online"))
    tflop_per_image = flops()["vitb14_518_tflops_per_image_10_views"]
    return {
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "gpu_teacher_cache_images_per_s": round(cache_rate, 2),
        "gpu_teacher_forward_bound_images_per_s": round(bound, 2),
        "gpu_teacher_cache_fraction_of_bound": round(cache_rate / bound, 3),
        **breakdown,
        "gpu_teacher_forward_tflops": round(bound * tflop_per_image, 1),
        "gpu_teacher_forward_compiled_images_per_s": round(compiled_bound, 2),
        "gpu_teacher_forward_compiled_speedup": round(compiled_bound / bound, 3),
        "gpu_distill_samples_per_s": round(samples_per_s, 2),
        "gpu_distill_data_wait_fraction": round(waited, 4),
        "gpu_distill_samples_per_s_decoding": round(decoding, 2),
        "gpu_distill_data_wait_fraction_decoding": round(decoding_waited, 4),
        "gpu_distill_online_samples_per_s": round(online_rate, 2),
        "gpu_distill_cached_vs_online": round(samples_per_s / online_rate, 2),
    }
