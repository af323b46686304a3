"""Teacher-cache stage: shards -> denoised teacher targets in a Zarr v3 store.

A pool of Ray actors loads the teacher once each and takes units (a shard, or a block of
a large shard). The driver only plans: it creates (or reopens) the store named by the
config's fingerprint, grows it to the manifest, and hands out the units not yet marked
complete. A rerun therefore resumes, and a grown corpus only computes its new units.
"""
from __future__ import annotations

import ray
import torch
from ray.util import ActorPool

from pipeline.config import Config
from pipeline.data.manifest import Manifest, Unit
from pipeline.models.vit import describe_teacher
from pipeline.placement import cluster_gpus, default_readers, fits_on, plan_workers
from pipeline.targets.lease import Lease
from pipeline.targets.store import TargetStore, store_spec
from pipeline.targets.teacher_targets import TeacherTargets
from pipeline.tracking import log_cache_run
from stages.runtime import cluster_nodes, init_ray, progress, say


@ray.remote(max_restarts=2, max_task_retries=2)
class CacheActor:
    def __init__(self, cfg: Config, store: TargetStore, manifest: Manifest):
        # a GPU only if Ray gave this actor one: a CPU actor on a GPU node stays on the CPU
        use_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(cfg.cache.resources.threads or max(1, int(cfg.cache.resources.cpus)))
        readers = default_readers(cfg.cache.resources.readers, use_gpu, cfg.cache.resources.cpus)
        self.targets = TeacherTargets(
            cfg.teacher, store, manifest, cfg.cache.batch_images, cfg.cache.resources.prefetch,
            device="cuda" if use_gpu else "cpu", storage_options=cfg.storage.storage_options, readers=readers,
            skip_bad=cfg.cache.on_bad_image == "skip", compile=cfg.cache.compile,
        )

    def compute(self, units: list) -> list[dict]:
        return self.targets.compute_units(units)


def open_store(cfg: Config, manifest: Manifest) -> TargetStore:
    spec = store_spec(cfg.tta, cfg.cache, describe_teacher(cfg.teacher, cfg.storage.storage_options), manifest)
    return TargetStore.create_or_open(cfg.cache_root, spec, manifest.url, manifest.num_rows, cfg.storage.storage_options,
                                      codec=cfg.cache.codec, crops=cfg.cache.store_crops)


def plan(cfg: Config) -> tuple[Manifest, TargetStore, list[Unit]]:
    """The manifest, the (created or reopened) store, and the units still to compute."""
    manifest = Manifest.load(cfg.cache_shards_url, cfg.storage.storage_options)
    store = open_store(cfg, manifest)
    done = store.completed()
    units = manifest.units()
    todo = [u for u in units if u.id not in done]
    say(f"teacher-cache: {cfg.teacher.model} -> {store.url}\n"
        f"  {manifest.num_images} images in {len(units)} units, {len(todo)} to compute "
        f"({len(units) - len(todo)} already complete), {cfg.tta.counts} views, {cfg.cache.variants} variant(s), {cfg.cache.dtype}"
        f"{', crops stored' if store.has_crops else ', no crops (students decode images)'}")
    return manifest, store, todo


def compute(cfg: Config, store: TargetStore, manifest: Manifest, todo: list[Unit]) -> dict:
    """Run the units on a pool of teacher actors. Returns throughput figures; `images_per_s`
    is measured from the first unit's start to the last unit's end (model loading excluded)."""
    if not todo:
        return {"images": 0, "units": 0, "actors": 0, "seconds": 0.0, "images_per_s": 0.0, "stored_bytes": 0}
    init_ray()
    c = cfg.cache
    nodes = cluster_nodes()
    use_gpu = c.resources.use_gpu if c.resources.use_gpu is not None else cluster_gpus(nodes) >= 1
    # on CPUs, auto is as many actors as the nodes hold
    n = plan_workers("cache.num_actors", c.num_actors, use_gpu, c.resources.cpus, nodes,
                     cpu_default=max(1, sum(fits_on(node, c.resources.cpus, False) for node in nodes)),
                     autoscaling=cfg.cluster.autoscaling)
    n = min(n, len(todo))
    options = {"num_cpus": c.resources.cpus, **({"num_gpus": 1} if use_gpu else {})}
    actors = [CacheActor.options(**options).remote(cfg, store, manifest) for _ in range(n)]
    # Several units per task keep an actor's reader, model and writer busy across units;
    # about four tasks per actor still balance the load.
    per_task = cfg.cache.units_per_task or max(1, min(16, len(todo) // (4 * n)))
    tasks = [todo[i:i + per_task] for i in range(0, len(todo), per_task)]
    images = sum(u.count for u in todo)
    bar = progress(images, "teacher-cache", "img")
    results = []
    for stats in ActorPool(actors).map_unordered(lambda actor, units: actor.compute.remote(units), tasks):
        results += stats
        bar.update(sum(s["images"] for s in stats))
    bar.close()
    for actor in actors:
        ray.kill(actor)
    if not results:  # an earlier, interrupted run finished them after all
        return {"images": 0, "units": 0, "actors": n, "seconds": 0.0, "images_per_s": 0.0, "stored_bytes": 0}
    seconds = max(r["finished"] for r in results) - min(r["started"] for r in results)
    return {"images": images, "units": len(todo), "actors": n, "seconds": seconds, "images_per_s": images / seconds,
            "stored_bytes": sum(r["raw_bytes"] for r in results)}


def run(cfg: Config) -> TargetStore:
    manifest, store, todo = plan(cfg)
    if todo:
        with Lease(store.url, cfg.storage.storage_options, ttl=cfg.cache.lease_seconds, what="teacher-cache run"):
            # one listing (not one per unit): units another run finished since `plan`
            done = store.completed()
            stats = compute(cfg, store, manifest, [u for u in todo if u.id not in done])
        say(f"teacher-cache: {stats['images']} images in {stats['seconds']:.1f} s "
            f"({stats['images_per_s']:.2f} img/s on {stats['actors']} actor(s)) -> {store.url}")
        log_cache_run(cfg, store.spec.fingerprint, store.url, stats)
    return store
