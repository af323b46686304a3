"""Teacher-cache stage: shards -> denoised teacher targets in a Zarr v3 store.

A pool of Ray actors loads the teacher once each and takes units (a shard, or a block of
a large shard). The driver only plans: it creates (or reopens) the store named by the
config's fingerprint, grows it to the manifest, and hands out the units not yet marked
complete. A rerun therefore resumes, and a grown corpus only computes its new units.
"""
from __future__ import annotations

import time

import ray
import torch
from ray.util import ActorPool

from pipeline.config import Config
from pipeline.manifest import Manifest
from pipeline.models import describe_teacher
from pipeline.target_store import TargetStore, store_spec
from pipeline.teacher_targets import TeacherTargets
from stages.runtime import cluster_cpus, cluster_gpus, init_ray, progress, say


@ray.remote(max_restarts=2, max_task_retries=2)
class CacheActor:
    def __init__(self, cfg: Config, store: TargetStore, manifest: Manifest):
        use_gpu = torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(cfg.cache.threads_per_actor or max(1, int(cfg.cache.cpus_per_actor)))
        self.targets = TeacherTargets(
            cfg.teacher, store, manifest, cfg.cache.batch_images, cfg.cache.prefetch,
            device="cuda" if use_gpu else "cpu", storage_options=cfg.storage.storage_options,
        )

    def compute(self, unit) -> dict:
        return self.targets.compute_unit(unit)


def open_store(cfg: Config, manifest: Manifest) -> TargetStore:
    spec = store_spec(cfg, describe_teacher(cfg.teacher, cfg.storage.storage_options), manifest)
    return TargetStore.create_or_open(cfg.cache_root, spec, manifest.url, manifest.num_rows, cfg.storage.storage_options)


def run(cfg: Config) -> TargetStore:
    so = cfg.storage.storage_options
    manifest = Manifest.load(cfg.cache_shards_url, so)
    store = open_store(cfg, manifest)
    done = store.completed()
    units = manifest.units()
    todo = [u for u in units if u.id not in done]
    say(f"teacher-cache: {cfg.teacher.model} -> {store.url}\n"
        f"  {manifest.num_images} images in {len(units)} units, {len(todo)} to compute "
        f"({len(units) - len(todo)} already complete), {cfg.tta.counts} views, {cfg.cache.variants} variant(s), {cfg.cache.dtype}")
    if not todo:
        return store

    init_ray()
    gpus = cluster_gpus()
    if cfg.cache.num_actors:
        n = cfg.cache.num_actors
    else:
        n = int(gpus) if gpus >= 1 else max(1, int(cluster_cpus() // cfg.cache.cpus_per_actor))
    n = min(n, len(todo))
    options = {"num_gpus": 1, "num_cpus": cfg.cache.cpus_per_actor} if gpus >= 1 else {"num_cpus": cfg.cache.cpus_per_actor}
    actors = [CacheActor.options(**options).remote(cfg, store, manifest) for _ in range(n)]
    pool = ActorPool(actors)

    images = sum(u.count for u in todo)
    bar = progress(images, "teacher-cache", "img")
    t0 = time.perf_counter()
    for stats in pool.map_unordered(lambda actor, unit: actor.compute.remote(unit), todo):
        bar.update(stats["images"])
    bar.close()
    elapsed = time.perf_counter() - t0
    say(f"teacher-cache: {images} images in {elapsed:.1f} s ({images / elapsed:.2f} img/s, {n} actor(s)) -> {store.url}")
    for actor in actors:
        ray.kill(actor)
    return store
