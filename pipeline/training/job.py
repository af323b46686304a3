"""One student's run as the driver decided it, and the function Ray Train runs with it.

Ray Train unpickles the trainer, this function and its config included, in its controller
actor too, which never trains. This module keeps the training code (timm, the readers,
tracking) out of that process: each student's controller starts ~2 CPU-seconds sooner.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config
from pipeline.targets.store import StoreSpec


@dataclass(frozen=True)
class DistillJob:
    """One student's run as the driver decided it, handed to each worker as it is."""

    cfg: Config  # distill.resources.use_gpu and distill.num_workers as the cluster places them
    manifest: str  # the shards' folder
    spec: StoreSpec  # what the targets are (the store's, or the online regime's)
    store: str | None  # the target store's URL; None for online targets
    run: str  # the student's run folder
    total_steps: int
    mlflow: dict | None  # the MLflow run to log into, if any


def train_loop(config: dict) -> None:
    """Ray Train's function per worker; `config["job"]` is the student's `DistillJob`."""
    from pipeline.training.loop import train  # on the workers only (see above)

    train(config["job"])
