"""Distill stage: Ray Train workers distill students from a target store (or online).

The driver checks every student's config against the store and its own run folder before
any compute, then runs one `TorchTrainer` per student, concurrently when the cluster has
room, and shows a progress bar per student from the metrics the workers write. Each worker
builds the student, reads its share of (image, target) pairs and trains with DDP.
Checkpoints go to `<distill.output>/<student.name>`; running the same command again
resumes every student from its latest checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, replace

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import Config, expand_students
from pipeline.data.images import Preprocess
from pipeline.data.manifest import Manifest
from pipeline.data.readers import in_order
from pipeline.errors import ConfigError
from pipeline.evaluation import figures
from pipeline.placement import Node, cluster_gpus, default_readers, plan_workers
from pipeline.models.vit import PatchFeatures, build_any_student, describe_teacher, load_teacher, patch_features, student_base, unlock
from pipeline.storage import exists, has_scheme, join_url, read_bytes, read_json, url_to_fs, write_bytes_atomic, write_json
from pipeline.targets.store import StoreSpec, TargetStore, describe_differences, find_store, store_spec
from pipeline.targets.tta import denoise
from pipeline.training import checkpoint
from pipeline.training.losses import compiled_loss, exp_decay_lr
from pipeline.training.pairs import CachedPairs, OnlineViews, StepBatches, samples_per_rank
from stages.runtime import cluster_nodes, init_ray, progress, say
from stages.tracking import MLflow, Tracker, start_run

METRICS = ["step", "epoch", "loss", "cosine", "mse", "lr", "samples_per_s", "data_wait_fraction", "seconds"]


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
    use_gpu = d.use_gpu if d.use_gpu is not None else cluster_gpus(nodes) >= 1
    workers = plan_workers("distill.num_workers", d.num_workers, use_gpu, d.cpus_per_worker, nodes,
                           autoscaling=cfg.cluster.autoscaling)
    cfg = cfg.model_copy(deep=True)
    cfg.distill.use_gpu, cfg.distill.num_workers = use_gpu, workers
    return cfg


def prepare(cfg: Config, nodes: list[Node]) -> dict:
    """Every check that can refuse a student, before any compute; returns its job."""
    cfg = placed(cfg, nodes)
    so, d = cfg.storage.storage_options, cfg.distill
    manifest = Manifest.load(cfg.cache_shards_url, so)
    teacher = describe_teacher(cfg.teacher, so)
    if d.targets == "cached":
        store = find_store(cfg, manifest)
        spec, store_url = store.spec, store.url
    else:  # the reference's augmentation: a new random crop and new views every epoch
        spec, store_url = replace(store_spec(cfg, teacher, manifest), crop="random"), None
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
    return {"cfg": cfg.model_dump(mode="json"), "manifest": manifest.url, "store": store_url, "spec": asdict(spec),
            "run": run_url, "total_steps": per_rank // d.batch_size * d.epochs,
            "mlflow": start_run(cfg, run_url, cfg.student.name, {"phreg.targets": spec.fingerprint})}


def ray_storage(url: str, storage_options) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's storage_path (+ filesystem for URLs, so custom endpoints work)."""
    if not has_scheme(url):
        return os.path.abspath(url), None
    fs, path = url_to_fs(url, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def fit(job: dict):
    cfg = Config.model_validate(job["cfg"])
    d = cfg.distill
    storage_path, storage_fs = ray_storage(cfg.students_url, cfg.storage.storage_options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker={"CPU": d.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.student.name, storage_path=storage_path, storage_filesystem=storage_fs,
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
        c = Config.model_validate(job["cfg"])
        say(f"distill: student {c.student.name} ({c.student.registers} registers"
            f"{', ' + c.student.model if c.student.model else ''}) from {job['store'] or 'online targets'}\n"
            f"  {c.distill.num_workers} worker(s) on {'GPUs' if c.distill.use_gpu else 'CPUs'}, {c.distill.epochs} epochs, "
            f"{job['total_steps']} steps -> {job['run']}")
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(fit, job) for job in jobs]
        watch(jobs, futures, Config.model_validate(jobs[0]["cfg"]).storage.storage_options)
        results = [f.result() for f in futures]
    for job, result in zip(jobs, results):
        say(f"distill: {job['run']}: step {result.metrics.get('step')}, loss {result.metrics.get('loss')}, "
            f"cosine {result.metrics.get('cosine')}")
        if job["mlflow"]:
            tracked = MLflow(job["mlflow"]["uri"], job["mlflow"]["run_id"])
            if gap := tracked.missing_steps("train/loss", job["total_steps"]):
                say(gap)
            tracked.finish()
    return results


def watch(jobs: list[dict], futures, storage_options) -> None:
    """A progress bar per student, fed by the metrics.csv its rank 0 writes."""
    bars = [progress(job["total_steps"], Config.model_validate(job["cfg"]).student.name, "step") for job in jobs]
    running = True
    while running:
        running = bool(wait(futures, timeout=2.0).not_done)
        for job, bar in zip(jobs, bars):
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                rows = list(csv.DictReader(io.StringIO(read_bytes(join_url(job["run"], "metrics.csv"), storage_options).decode())))
                if rows:
                    last = rows[-1]
                    bar.update(int(last["step"]) - bar.n)
                    bar.set_postfix(loss=last["loss"], cos=last["cosine"], img_s=last["samples_per_s"],
                                    wait=last["data_wait_fraction"])
    for bar in bars:
        bar.close()


# --- on each worker ------------------------------------------------------------------------

class MetricsLog:
    """Rank 0 keeps a CSV of metric rows in the run folder (`metrics.csv`: one row per
    `log_every` steps; `epochs.csv`: one per epoch), rewritten whole at each row."""

    def __init__(self, url: str, storage_options, resume_step: int):
        self.url, self.storage_options = url, storage_options
        self.rows: list[dict] = []
        with contextlib.suppress(FileNotFoundError):
            text = read_bytes(url, storage_options).decode()
            self.rows = [r for r in csv.DictReader(io.StringIO(text)) if int(r["step"]) <= resume_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(self.rows)
        write_bytes_atomic(self.url, buf.getvalue().encode(), self.storage_options)


def scalars(row: dict, prefix: str) -> dict[str, float]:
    """A metrics row as TensorBoard/MLflow scalars, e.g. `train/loss`."""
    return {f"{prefix}/{k}": float(row[k]) for k in ("loss", "cosine", "mse", "lr", "samples_per_s", "data_wait_fraction")}


class Meter:
    """Loss, cosine, MSE and data-wait time summed over a window of steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.waited, self.start = [0.0, 0.0, 0.0], 0, 0.0, time.perf_counter()

    def add(self, values, waited: float) -> None:
        self.sums = [a + b for a, b in zip(self.sums, values)]
        self.steps += 1
        self.waited += waited

    def row(self, step: int, epoch: int, lr: float, samples_per_step: int, device) -> dict:
        """The window's averages over all ranks (a collective: every rank must call it)."""
        loss, cos, mse = _mean_across_ranks([v / self.steps for v in self.sums], device)
        elapsed = time.perf_counter() - self.start
        return {"step": step, "epoch": epoch, "loss": round(loss, 6), "cosine": round(cos, 6), "mse": round(mse, 6),
                "lr": f"{lr:.3e}", "samples_per_s": round(self.steps * samples_per_step / elapsed, 2),
                "data_wait_fraction": round(self.waited / elapsed, 4), "seconds": round(elapsed, 2)}


def record_event(run_url: str, storage_options, event: dict) -> None:
    """Append to the run's events.jsonl: every (re)start of the workers, with its step."""
    url = join_url(run_url, "events.jsonl")
    try:
        previous = read_bytes(url, storage_options)
    except FileNotFoundError:
        previous = b""
    write_bytes_atomic(url, previous + (json.dumps(event) + "\n").encode(), storage_options)


def _mean_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train_loop(job: dict) -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = Config.model_validate(job["cfg"])
    so, d = cfg.storage.storage_options, cfg.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(d.threads_per_worker or max(1, int(d.cpus_per_worker)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    manifest = Manifest.load(job["manifest"], so)
    spec = StoreSpec(**job["spec"])
    preprocess = Preprocess.from_dict(spec.teacher["preprocess"])
    online = d.targets == "online"
    teacher = load_teacher(cfg.teacher, so, device) if online or cfg.student.model is None else None
    student, projection = build_any_student(cfg.teacher, cfg.student, spec, so, loaded_teacher=teacher)
    unlock(student, cfg.student.unlock_patterns)
    trainable = [p for p in student.parameters() if p.requires_grad] + (list(projection.parameters()) if projection else [])
    optimizer = torch.optim.AdamW(trainable, lr=d.lr, weight_decay=d.weight_decay)
    step = 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as folder:
            step = checkpoint.load_training_state(folder, student, projection, optimizer)["step"]
    model = ray.train.torch.prepare_model(PatchFeatures(student, projection))

    if online:
        source = OnlineViews(manifest, preprocess, so, spec=spec)
        fill, patch = preprocess.white().to(device), tuple(spec.teacher["patch"])

        def targets_of(images, batch):
            with torch.no_grad(), autocast:
                return denoise(lambda x: patch_features(teacher, x).float(), images, batch[1].numpy(), batch[2].numpy(),
                               patch, fill)
    else:
        del teacher
        source = CachedPairs(manifest, preprocess, so, store=TargetStore(job["store"], so), hflip=d.hflip, seed=d.seed)

        def targets_of(images, batch):
            return batch[1].to(device, non_blocking=True).float()

    plan = StepBatches(source, d.seed, rank, world, d.batch_size, d.epochs, first_step=step)
    steps_per_epoch, total = plan.steps_per_epoch, plan.steps_per_epoch * d.epochs
    log = MetricsLog(join_url(job["run"], "metrics.csv"), so, step) if rank == 0 else None
    epochs_log = MetricsLog(join_url(job["run"], "epochs.csv"), so, step) if rank == 0 else None
    tracker = Tracker(cfg, job["run"], job.get("mlflow"), resume_step=step) if rank == 0 else None
    nodes = [ray.get_runtime_context().get_node_id()] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes, nodes[0])
    if rank == 0:
        record_event(job["run"], so, {"event": "resume" if step else "start", "step": step, "total_steps": total,
                                      "workers": world, "nodes": nodes, "time": time.time()})
        if step:
            print(f"[distill] {cfg.student.name}: resuming at step {step}/{total}", flush=True)

    forward_loss = compiled_loss(d.compile)
    window, whole_epoch = Meter(), Meter()
    readers = default_readers(d.readers, device.type == "cuda", d.cpus_per_worker)
    # one stream across epochs: the readers prepare the next epoch's first batches while this
    # epoch's last ones train
    stream = in_order(plan, len(plan), readers, d.prefetch, pin_memory=device.type == "cuda")
    while step < total:
        epoch = step // steps_per_epoch
        t_wait = time.perf_counter()
        batch = next(stream)
        waited = time.perf_counter() - t_wait
        images = preprocess.normalize(batch[0].to(device, non_blocking=True))
        targets = targets_of(images, batch)
        lr = exp_decay_lr(step, total, d.lr, d.final_lr, every=steps_per_epoch if d.lr_decay == "epoch" else 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, cos, mse = forward_loss(model, images, targets, d.mse_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        values = (loss.item(), cos.item(), mse.item())
        window.add(values, waited)
        whole_epoch.add(values, waited)

        save = step % d.checkpoint_every == 0 or step == total
        if step % d.log_every == 0 or save:
            row = window.row(step, epoch, lr, d.batch_size * world, device)
            if rank == 0:
                log.append(row)
                tracker.scalars(scalars(row, "train"), step)
            window.reset()
        if save:
            if rank == 0:
                tracker.flush()
            _report(row, rank, student, projection, optimizer, cfg, step, epoch, total, job["store"])
        if step % steps_per_epoch == 0:
            row = whole_epoch.row(step, epoch, lr, d.batch_size * world, device)
            if rank == 0:
                epochs_log.append(row)
                tracker.scalars(scalars(row, "epoch"), step)
                if d.keep_every_epochs and (epoch + 1) % d.keep_every_epochs == 0:
                    _keep_epoch(job["run"], epoch + 1, student, projection, _state(cfg, step, epoch, total, job["store"], projection), so)
            whole_epoch.reset()
    stream.close()
    if rank == 0:
        tracker.close()
    if rank == 0 and log.rows:
        figures.training_curves(log.rows, join_url(job["run"], "loss.png"), so, title=f"Distillation of {cfg.student.name}")


def _report(metrics: dict, rank: int, student, projection, optimizer, cfg: Config, step: int, epoch: int, total: int,
            store_url: str | None):
    """Checkpoint (rank 0 writes it; every rank must call report: it is a barrier)."""
    with tempfile.TemporaryDirectory() as folder:
        ckpt = None
        if rank == 0:
            checkpoint.save(folder, student, projection, optimizer, _state(cfg, step, epoch, total, store_url, projection))
            ckpt = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=ckpt)


def _state(cfg: Config, step: int, epoch: int, total: int, store_url: str | None, projection) -> dict:
    return {"step": step, "epoch": epoch, "total_steps": total, "store": store_url, "targets": cfg.distill.targets,
            "teacher": cfg.teacher.model_dump(mode="json"), "student": cfg.student.model_dump(mode="json"),
            "student_base": student_base(cfg.teacher, cfg.student).model_dump(mode="json"),
            "projection": projection is not None}


def _keep_epoch(run_url: str, epoch: int, student, projection, state: dict, storage_options) -> None:
    """The student at the end of `epoch` (1-based), kept for model selection: weights and state,
    no optimiser. Outside Ray Train's checkpoints, so their retention never deletes it; state.json
    goes last, so a half-uploaded folder is never taken for a kept epoch."""
    target = checkpoint.epoch_folder(run_url, epoch)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(folder, student, projection, None, state)
        names = sorted(os.listdir(folder), key=lambda n: n == checkpoint.STATE)
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                write_bytes_atomic(join_url(target, name), f.read(), storage_options)
