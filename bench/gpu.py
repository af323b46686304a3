"""The `gpu` section of `make bench` (only where CUDA exists): one GPU fed by the pipeline.

DINOv2 ViT-B/14 at 518 px with random weights, on the `data_path` reference corpus:
- teacher cache: images/s of `TeacherTargets` (10 views per image, bf16 autocast, two reader
  processes) over whole units after a warm-up unit, and its fraction of the bound set by the
  bare teacher forward on batches of the same shape;
- distillation: samples/s of the distill stage (one Ray Train worker on the GPU, two reader
  processes) and the fraction of step time it waited for data.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.data_path import REFERENCE, reference_corpus
from pipeline.config import load_config
from pipeline.models.vit import describe_teacher
from pipeline.storage import join_url
from pipeline.targets.store import TargetStore, store_spec
from pipeline.targets.teacher_targets import TeacherTargets

BATCH_IMAGES, COUNTS, READERS = 4, 10, 2


def _config(work: Path, shards: str, **extra):
    return load_config([], {"storage.run_root": str(work / "gpu"), "shard.output": shards,
                            "teacher.model": REFERENCE.model, "teacher.img_size": REFERENCE.img_size,
                            "tta.counts": COUNTS, "cache.batch_images": BATCH_IMAGES, "cache.readers": READERS,
                            "distill.readers": READERS, **extra})


def forward_images_per_s(computer: TeacherTargets, repeats: int = 10) -> float:
    """Images/s of the bare teacher forward on batches of BATCH_IMAGES x COUNTS views."""
    x = torch.randn(BATCH_IMAGES * COUNTS, 3, *computer.preprocess.size, device="cuda")
    computer.features(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        computer.features(x)
    torch.cuda.synchronize()
    return repeats * BATCH_IMAGES / (time.perf_counter() - start)


def gpu(work: Path) -> dict:
    from bench.run import _steady_rate
    from stages import distill

    if not torch.cuda.is_available():
        print("[bench] gpu: no CUDA device here, section skipped")
        return {}
    manifest = reference_corpus(str(work / "gpu" / "corpus"))
    cfg = _config(work, manifest.url)
    spec = store_spec(cfg, describe_teacher(cfg.teacher), manifest)
    store = TargetStore.create_or_open(cfg.cache_root, spec, manifest.url, manifest.num_rows)
    computer = TeacherTargets(cfg.teacher, store, manifest, BATCH_IMAGES, device="cuda", readers=READERS)
    units = manifest.units()
    computer.compute_units(units[:1])  # warm-up: cuDNN autotuning, reader start-up
    start = time.perf_counter()
    computer.compute_units(units[1:])
    cache_rate = sum(u.count for u in units[1:]) / (time.perf_counter() - start)
    bound = forward_images_per_s(computer)
    del computer
    torch.cuda.empty_cache()

    run = _config(work, manifest.url, **{"distill.store": store.url, "distill.use_gpu": True, "distill.num_workers": 1,
                                         "distill.cpus_per_worker": READERS + 1, "distill.batch_size": 8,
                                         "distill.epochs": 3, "distill.log_every": 4, "distill.checkpoint_every": 1000,
                                         "student.name": "gpu-bench"})
    distill.run(run)
    samples_per_s, waited = _steady_rate(join_url(run.students_url, "gpu-bench"))
    return {
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_teacher_cache_images_per_s": round(cache_rate, 2),
        "gpu_teacher_forward_bound_images_per_s": round(bound, 2),
        "gpu_teacher_cache_fraction_of_bound": round(cache_rate / bound, 3),
        "gpu_distill_samples_per_s": round(samples_per_s, 2),
        "gpu_distill_data_wait_fraction": round(waited, 4),
    }
