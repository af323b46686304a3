"""Distill stage: Ray Train workers distill a student from a target store.

The driver checks the config against the store (teacher, weights, resolution, grid,
preprocessing) before any compute, then runs a `TorchTrainer`. Each worker builds the
student from the teacher, reads its share of (image, target) pairs and trains with DDP.
Checkpoints go to the run folder `<distill.output>/<student.name>`; running the same
command again resumes from the latest one.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import tempfile
import time

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.images import Preprocess
from pipeline.losses import distill_loss, exp_decay_lr
from pipeline.manifest import Manifest
from pipeline.models import PatchFeatures, build_student, load_teacher, unlock
from pipeline.pairs import PairReader, batches, epoch_plan, samples_per_rank, skip
from pipeline.prefetch import prefetch
from pipeline.storage import exists, has_scheme, join_url, read_bytes, read_json, url_to_fs, write_bytes_atomic, write_json
from pipeline.target_store import TargetStore, describe_differences, find_store
from stages.runtime import cluster_gpus, init_ray, say

METRICS = ["step", "epoch", "loss", "cosine", "mse", "lr", "samples_per_s", "data_wait_fraction", "seconds"]


def run_identity(cfg: Config, store: TargetStore) -> dict:
    """What a resumed run must share with the run it continues."""
    keep = {"epochs", "batch_size", "lr", "final_lr", "weight_decay", "mse_scale", "num_workers", "seed"}
    return {
        "store": store.spec.fingerprint,
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


def ray_storage(url: str, storage_options) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's storage_path (+ filesystem for URLs, so custom endpoints work)."""
    if not has_scheme(url):
        return os.path.abspath(url), None
    fs, path = url_to_fs(url, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run(cfg: Config):
    so = cfg.storage.storage_options
    manifest = Manifest.load(cfg.cache_shards_url, so)
    store = find_store(cfg, manifest)
    per_rank = samples_per_rank(manifest.counts, cfg.distill.num_workers)
    if per_rank < cfg.distill.batch_size:
        raise ConfigError(f"{manifest.num_images} images give each of {cfg.distill.num_workers} workers {per_rank} "
                          f"samples per epoch, fewer than distill.batch_size={cfg.distill.batch_size}")
    run_url = join_url(cfg.students_url, cfg.student.name)
    claim_run(run_url, run_identity(cfg, store), so)
    init_ray()
    use_gpu = cfg.distill.use_gpu if cfg.distill.use_gpu is not None else cluster_gpus() >= 1
    storage_path, storage_fs = ray_storage(cfg.students_url, so)
    say(f"distill: student {cfg.student.name} ({cfg.student.registers} registers) from {store.url}\n"
        f"  {cfg.distill.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}, {cfg.distill.epochs} epochs of "
        f"{per_rank // cfg.distill.batch_size} steps -> {run_url}")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "store": store.url, "manifest": manifest.url, "run": run_url},
        scaling_config=ScalingConfig(
            num_workers=cfg.distill.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.distill.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.student.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.distill.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2), logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    say(f"distill: done, final metrics {result.metrics}\n  checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return result


# --- on each worker ------------------------------------------------------------------------

class MetricsLog:
    """Rank 0 keeps the run's metric rows and rewrites `metrics.csv` in the run folder."""

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


def _mean_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train_loop(config: dict) -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one progress line per log step is enough
    cfg = Config.model_validate(config["cfg"])
    so, d = cfg.storage.storage_options, cfg.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(d.threads_per_worker or max(1, int(d.cpus_per_worker)))

    manifest = Manifest.load(config["manifest"], so)
    store = TargetStore(config["store"], so)
    student = build_student(load_teacher(cfg.teacher, so), cfg.teacher, cfg.student)
    unlock(student, cfg.student.unlock)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=d.lr, weight_decay=d.weight_decay)
    step = 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as folder:
            step = checkpoint.load_training_state(folder, student, optimizer)["step"]
    model = ray.train.torch.prepare_model(PatchFeatures(student))

    reader = PairReader(manifest, store, Preprocess.from_dict(store.spec.teacher["preprocess"]), so)
    counts = reader.unit_counts()
    steps_per_epoch = samples_per_rank(counts, world) // d.batch_size
    total = steps_per_epoch * d.epochs
    log = MetricsLog(join_url(config["run"], "metrics.csv"), so, step) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if rank == 0 and step:
        print(f"[distill] resuming at step {step}/{total}", flush=True)

    sums, steps_in_window, window_start, wait = [0.0, 0.0, 0.0], 0, time.perf_counter(), 0.0
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        plan = skip(epoch_plan(counts, epoch, d.seed, rank, world), done_in_epoch * d.batch_size)
        stream = prefetch(batches(reader.pairs(plan, epoch % store.spec.variants), d.batch_size), depth=2)
        while True:
            t_wait = time.perf_counter()
            try:
                images, targets = next(stream)
            except StopIteration:
                break
            wait += time.perf_counter() - t_wait
            if device.type == "cuda":
                images, targets = images.pin_memory(), targets.pin_memory()
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            lr = exp_decay_lr(step, total, d.lr, d.final_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                pred = model(images)
            loss, cos, mse = distill_loss(pred, targets, d.mse_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            steps_in_window += 1
            for i, v in enumerate((loss.item(), cos.item(), mse.item())):
                sums[i] += v

            save = step % d.checkpoint_every == 0 or step == total
            if step % d.log_every == 0 or save:
                n = steps_in_window
                loss_m, cos_m, mse_m = _mean_across_ranks([s / n for s in sums], device)
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "epoch": epoch, "loss": round(loss_m, 6), "cosine": round(cos_m, 6),
                       "mse": round(mse_m, 6), "lr": f"{lr:.3e}", "samples_per_s": round(n * d.batch_size * world / elapsed, 2),
                       "data_wait_fraction": round(wait / elapsed, 4), "seconds": round(elapsed, 2)}
                if rank == 0:
                    log.append(row)
                    print(f"[distill] step {step}/{total} epoch {epoch + 1}/{d.epochs} loss {loss_m:.4f} "
                          f"cos {cos_m:.4f} lr {lr:.2e} {row['samples_per_s']} img/s wait {row['data_wait_fraction']:.0%}",
                          flush=True)
                sums, steps_in_window, window_start, wait = [0.0, 0.0, 0.0], 0, time.perf_counter(), 0.0
            if save:
                _report(row, rank, student, optimizer, cfg, step, epoch, total, config["store"])
        stream.close()


def _report(metrics: dict, rank: int, student, optimizer, cfg: Config, step: int, epoch: int, total: int, store_url: str):
    """Checkpoint (rank 0 writes it; every rank must call report: it is a barrier)."""
    with tempfile.TemporaryDirectory() as folder:
        ckpt = None
        if rank == 0:
            state = {"step": step, "epoch": epoch, "total_steps": total, "store": store_url,
                     "teacher": cfg.teacher.model_dump(mode="json"), "student": cfg.student.model_dump(mode="json")}
            checkpoint.save(folder, student, optimizer, state)
            ckpt = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=ckpt)
