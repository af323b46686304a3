"""Distill stage: Ray Train workers distill students from a target store (or online).

The driver checks every student's config against the store and its own run folder before
any compute, then runs one `TorchTrainer` per student, concurrently when the cluster has
room, and shows a progress bar per student from the metrics the workers write. Each worker
builds the student, reads its share of (image, target) pairs and trains with DDP.
Checkpoints go to `<distill.output>/<student.name>`; running the same command again
resumes every student from its latest checkpoint. The workers' loop is
`pipeline.training.loop`.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace

import pyarrow.fs
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import Config, expand_students
from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError
from pipeline.evaluation import figures
from pipeline.models.vit import describe_teacher, student_base
from pipeline.placement import Node, cluster_gpus, plan_workers
from pipeline.storage import exists, has_scheme, join_url, read_json, url_to_fs, write_json
from pipeline.targets.store import StoreSpec, describe_differences, find_store, store_spec
from pipeline.tracking import MLflow, start_run
from pipeline.training.job import DistillJob, train_loop
from pipeline.training.metrics import MetricsLog
from pipeline.training.pairs import samples_per_rank
from stages.runtime import cluster_nodes, init_ray, progress, say

# --- on the driver ------------------------------------------------------------------------

def run_identity(cfg: Config, spec: StoreSpec) -> dict:
    """What a resumed run must share with the run it continues."""
    keep = {"targets", "epochs", "batch_size", "lr", "final_lr", "weight_decay", "mse_scale", "num_workers", "seed", "hflip"}
    return {
        "targets": spec.fingerprint,
        "teacher": cfg.teacher.model_dump(mode="json"),
        "student": cfg.student.model_dump(mode="json"),
        "distill": {k: v for k, v in cfg.distill.model_dump(mode="json").items() if k in keep},
    }


def claim_run(run_url: str, identity: dict, storage_options) -> None:
    """Record the run's settings on its first start; refuse to resume it with others."""
    url = join_url(run_url, "run.json")
    if exists(url, storage_options):
        diff = describe_differences(read_json(url, storage_options), identity, "run", "config")
        if diff:
            raise ConfigError(f"the student run {run_url} was started with other settings:\n  " + "\n  ".join(diff)
                              + "\nUse another student.name, or delete that folder to start over.")
    else:
        write_json(url, identity, storage_options)


def placed(cfg: Config, nodes: list[Node]) -> Config:
    """The config with the workers it runs on decided: use_gpu and num_workers as the
    cluster can place them (refused here otherwise, instead of waiting forever)."""
    d = cfg.distill
    use_gpu = d.resources.use_gpu if d.resources.use_gpu is not None else cluster_gpus(nodes) >= 1
    workers = plan_workers("distill.num_workers", d.num_workers, use_gpu, d.resources.cpus, nodes,
                           autoscaling=cfg.cluster.autoscaling)
    cfg = cfg.model_copy(deep=True)
    cfg.distill.resources.use_gpu, cfg.distill.num_workers = use_gpu, workers
    return cfg


def prepare(cfg: Config, nodes: list[Node]) -> DistillJob:
    """Every check that can refuse a student, before any compute; returns its job."""
    cfg = placed(cfg, nodes)
    so, d = cfg.storage.storage_options, cfg.distill
    manifest = Manifest.load(cfg.cache_shards_url, so)
    teacher = describe_teacher(cfg.teacher, so)
    spec = store_spec(cfg.tta, cfg.cache, teacher, manifest)
    if d.targets == "cached":
        store = find_store(spec, cfg.cache_root, manifest, so, d.store)
        spec, store_url = store.spec, store.url
    else:  # the reference's augmentation: a new random crop and new views every epoch
        spec, store_url = replace(spec, crop="random"), None
    if cfg.student.model is not None:
        grid = describe_teacher(student_base(cfg.teacher, cfg.student), so).grid
        if grid != teacher.grid:
            raise ConfigError(f"student {cfg.student.model} has a {grid[0]}x{grid[1]} patch grid at img_size "
                              f"{cfg.teacher.img_size}, the teacher's targets are {teacher.grid[0]}x{teacher.grid[1]}")
    per_rank = samples_per_rank(manifest.counts, d.num_workers)
    if per_rank < d.batch_size:
        raise ConfigError(f"{manifest.num_images} images give each of {d.num_workers} workers {per_rank} "
                          f"samples per epoch, fewer than distill.batch_size={d.batch_size}")
    run_url = join_url(cfg.students_url, cfg.student.name)
    claim_run(run_url, run_identity(cfg, spec), so)
    return DistillJob(cfg, manifest.url, spec, store_url, run_url, per_rank // d.batch_size * d.epochs,
                      start_run(cfg, run_url, cfg.student.name, {"phreg.targets": spec.fingerprint}))


def ray_storage(url: str, storage_options) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's storage_path (+ filesystem for URLs, so custom endpoints work)."""
    if not has_scheme(url):
        return os.path.abspath(url), None
    fs, path = url_to_fs(url, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def fit(job: DistillJob):
    d = job.cfg.distill
    storage_path, storage_fs = ray_storage(job.cfg.students_url, job.cfg.storage.storage_options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.resources.use_gpu,
                                     resources_per_worker={"CPU": d.resources.cpus}),
        run_config=RunConfig(
            name=job.cfg.student.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.keep_last), logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def run(cfg: Config) -> list:
    init_ray()
    nodes = cluster_nodes()
    jobs = [prepare(c, nodes) for c in expand_students(cfg)]
    for job in jobs:
        c = job.cfg
        say(f"distill: student {c.student.name} ({c.student.registers} registers"
            f"{', ' + c.student.model if c.student.model else ''}) from {job.store or 'online targets'}\n"
            f"  {c.distill.num_workers} worker(s) on {'GPUs' if c.distill.resources.use_gpu else 'CPUs'}, {c.distill.epochs} epochs, "
            f"{job.total_steps} steps -> {job.run}")
    so = cfg.storage.storage_options
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(fit, job) for job in jobs]
        watch(jobs, futures, so)
        results = [f.result() for f in futures]
    for job, result in zip(jobs, results):
        say(f"distill: {job.run}: step {result.metrics.get('step')}, loss {result.metrics.get('loss')}, "
            f"cosine {result.metrics.get('cosine')}")
        if rows := MetricsLog(join_url(job.run, "metrics.csv"), so).rows:
            figures.training_curves(rows, join_url(job.run, "loss.png"), so, title=f"Distillation of {job.cfg.student.name}")
        if job.mlflow:
            tracked = MLflow(job.mlflow["uri"], job.mlflow["run_id"])
            if gap := tracked.missing_steps("train/loss", job.total_steps):
                say(gap)
            tracked.finish()
    return results


def watch(jobs: list[DistillJob], futures, storage_options) -> None:
    """A progress bar per student, fed by the metrics.csv its rank 0 writes."""
    bars = [progress(job.total_steps, job.cfg.student.name, "step") for job in jobs]
    running = True
    while running:
        running = bool(wait(futures, timeout=2.0).not_done)
        for job, bar in zip(jobs, bars):
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                rows = MetricsLog(join_url(job.run, "metrics.csv"), storage_options).rows
                if rows:
                    last = rows[-1]
                    bar.update(int(last["step"]) - bar.n)
                    bar.set_postfix(loss=last["loss"], cos=last["cosine"], img_s=last["samples_per_s"],
                                    wait=last["data_wait_fraction"])
    for bar in bars:
        bar.close()
