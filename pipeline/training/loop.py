"""The distill workers' loop: what every Ray Train worker of one student runs.

`DistillJob` (pipeline.training.job) is what the driver decided for a student (its placed
config, the targets, its run folder); Ray hands the same object to every worker, whose
`train_loop` calls `train` here. A worker builds the student (and the teacher in the online
regime), resumes from Ray Train's latest checkpoint, then reads its rank's batches and
trains. Rank 0 keeps the run's records: metric rows, TensorBoard/MLflow
scalars, events and kept epochs; every rank joins the checkpoint report (a barrier).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.data.images import Preprocess
from pipeline.data.manifest import Manifest
from pipeline.data.readers import in_order
from pipeline.models.vit import PatchFeatures, build_any_student, load_teacher, patch_features, student_base, unlock
from pipeline.placement import default_readers
from pipeline.storage import join_url, write_bytes_atomic
from pipeline.targets.store import TargetStore
from pipeline.targets.tta import denoise
from pipeline.tracking import Tracker
from pipeline.training import checkpoint
from pipeline.training.job import DistillJob
from pipeline.training.losses import compiled_loss, exp_decay_lr
from pipeline.training.metrics import Meter, MetricsLog, record_event, scalars
from pipeline.training.pairs import CachedPairs, OnlineViews, StepBatches


def train(job: DistillJob) -> None:
    """One Ray Train worker's share of the student's run."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg, so, d = job.cfg, job.cfg.storage.storage_options, job.cfg.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(d.resources.threads or max(1, int(d.resources.cpus)))

    preprocess = Preprocess.from_dict(job.spec.teacher["preprocess"])
    online = d.targets == "online"
    teacher = load_teacher(cfg.teacher, so, device) if online or cfg.student.model is None else None
    student, projection = build_any_student(cfg.teacher, cfg.student, job.spec, so, loaded_teacher=teacher)
    unlock(student, cfg.student.unlock_patterns)
    trainable = [p for p in student.parameters() if p.requires_grad] + (list(projection.parameters()) if projection else [])
    optimizer = torch.optim.AdamW(trainable, lr=d.lr, weight_decay=d.weight_decay)
    step = 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as folder:
            step = checkpoint.load_training_state(folder, student, projection, optimizer)["step"]
    model = ray.train.torch.prepare_model(PatchFeatures(student, projection))
    source, targets_of = _targets(job, preprocess, device, teacher if online else None)
    del teacher

    plan = StepBatches(source, d.seed, rank, world, d.batch_size, d.epochs, first_step=step)
    steps_per_epoch, total = plan.steps_per_epoch, plan.steps_per_epoch * d.epochs
    records = Records(job, step, world) if rank == 0 else None
    _announce(job, records, step, total, world)

    forward_loss = compiled_loss(d.compile)
    window, whole_epoch = Meter(), Meter()
    readers = default_readers(d.resources.readers, device.type == "cuda", d.resources.cpus)
    # one stream across epochs: the readers prepare the next epoch's first batches while this
    # epoch's last ones train
    stream = in_order(plan, len(plan), readers, d.resources.prefetch, pin_memory=device.type == "cuda")
    while step < total:
        epoch = step // steps_per_epoch
        t_wait = time.perf_counter()
        batch = next(stream)
        waited = time.perf_counter() - t_wait
        images = preprocess.normalize(batch.pixels.to(device, non_blocking=True))
        targets = targets_of(images, batch)
        lr = exp_decay_lr(step, total, d.lr, d.final_lr, every=steps_per_epoch if d.lr_decay == "epoch" else 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, cos, mse = forward_loss(model, images, targets, d.mse_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        values = torch.stack([loss.detach(), cos, mse])
        window.add(values, waited)
        whole_epoch.add(values, waited)

        save = step % d.checkpoint_every == 0 or step == total
        if step % d.log_every == 0 or save:
            row = window.row(step, epoch, lr, d.batch_size * world)  # a collective: every rank
            if records:
                records.train(row, step)
            window.reset()
        if save:
            if records:
                records.tracker.flush()
            _report(row, rank, student, projection, optimizer, _state(job, step, epoch, total, projection))
        if step % steps_per_epoch == 0:
            row = whole_epoch.row(step, epoch, lr, d.batch_size * world)
            if records:
                records.epoch(row, step)
                if d.keep_every_epochs and (epoch + 1) % d.keep_every_epochs == 0:
                    _keep_epoch(job.run, epoch + 1, student, projection, _state(job, step, epoch, total, projection), so)
            whole_epoch.reset()
    stream.close()
    if records:
        records.tracker.close()


def _targets(job: DistillJob, preprocess: Preprocess, device: torch.device, teacher):
    """The samples a worker reads and how a batch becomes its targets on `device`: stored
    rows, or (online, with `teacher`) the teacher's denoised views computed in the step."""
    cfg, so = job.cfg, job.cfg.storage.storage_options
    manifest = Manifest.load(job.manifest, so)
    if teacher is None:
        pairs = CachedPairs(manifest, preprocess, so, store=TargetStore(job.store, so), hflip=cfg.distill.hflip,
                            seed=cfg.distill.seed)
        return pairs, lambda images, batch: batch.targets.to(device, non_blocking=True).float()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    fill, patch = preprocess.white().to(device), tuple(job.spec.teacher["patch"])

    def online(images, batch):
        with torch.no_grad(), autocast:
            return denoise(lambda x: patch_features(teacher, x).float(), images, batch.offsets, batch.flips, patch, fill)

    return OnlineViews(manifest, preprocess, so, spec=job.spec, skip_bad=cfg.cache.on_bad_image == "skip"), online


class Records:
    """Rank 0's records of a run: metrics.csv, epochs.csv and the TensorBoard/MLflow scalars."""

    def __init__(self, job: DistillJob, step: int, world: int):
        so = job.cfg.storage.storage_options
        self.log = MetricsLog(join_url(job.run, "metrics.csv"), so, step)
        self.epochs = MetricsLog(join_url(job.run, "epochs.csv"), so, step)
        self.tracker = Tracker(job.cfg, job.run, job.mlflow, resume_step=step)

    def train(self, row: dict, step: int) -> None:
        self.log.append(row)
        self.tracker.scalars(scalars(row, "train"), step)

    def epoch(self, row: dict, step: int) -> None:
        self.epochs.append(row)
        self.tracker.scalars(scalars(row, "epoch"), step)


def _announce(job: DistillJob, records: Records | None, step: int, total: int, world: int) -> None:
    """Rank 0 appends the (re)start to events.jsonl with the nodes of all ranks."""
    nodes = [ray.get_runtime_context().get_node_id()] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes, nodes[0])  # a collective: every rank
    if records:
        record_event(join_url(job.run, "events.jsonl"), job.cfg.storage.storage_options,
                     {"event": "resume" if step else "start", "step": step, "total_steps": total, "workers": world,
                      "nodes": nodes, "time": time.time()})
        if step:
            print(f"[distill] {job.cfg.student.name}: resuming at step {step}/{total}", flush=True)


def _report(metrics: dict, rank: int, student, projection, optimizer, state: dict) -> None:
    """Checkpoint (rank 0 writes it; every rank must call report: it is a barrier)."""
    with tempfile.TemporaryDirectory() as folder:
        ckpt = None
        if rank == 0:
            checkpoint.save(folder, student, projection, optimizer, state)
            ckpt = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=ckpt)


def _state(job: DistillJob, step: int, epoch: int, total: int, projection) -> dict:
    cfg = job.cfg
    return {"step": step, "epoch": epoch, "total_steps": total, "store": job.store, "targets": cfg.distill.targets,
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
