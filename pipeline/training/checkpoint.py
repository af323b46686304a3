"""Student checkpoints: a folder with the student's timm weights, the optimiser and a state.

    student.safetensors     the student's full state dict (plain timm parameter names)
    projection.safetensors  the linear map to the teacher's width (students of another width only)
    optimizer.pt            AdamW state (tensors only: loads with weights_only=True)
    state.json              step, epoch, and the configs that rebuild the student
"""
from __future__ import annotations

import json
import os

import safetensors.torch
import torch
from torch import nn

from pipeline.config import StudentConfig, TeacherConfig
from pipeline.errors import PipelineError
from pipeline.models.vit import student_skeleton
from pipeline.storage import join_url, list_names, read_bytes, read_json

WEIGHTS, PROJECTION, OPTIMIZER, STATE = "student.safetensors", "projection.safetensors", "optimizer.pt", "state.json"


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save(folder: str, student: nn.Module, projection: nn.Module | None, optimizer: torch.optim.Optimizer | None,
         state: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_file(_tensors(student), os.path.join(folder, WEIGHTS))
    if projection is not None:
        safetensors.torch.save_file(_tensors(projection), os.path.join(folder, PROJECTION))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER))
    with open(os.path.join(folder, STATE), "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)


def load_training_state(folder: str, student: nn.Module, projection: nn.Module | None,
                        optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights and optimiser in place from a local checkpoint folder; returns the state."""
    student.load_state_dict(safetensors.torch.load_file(os.path.join(folder, WEIGHTS)))
    if projection is not None:
        projection.load_state_dict(safetensors.torch.load_file(os.path.join(folder, PROJECTION)))
    optimizer.load_state_dict(torch.load(os.path.join(folder, OPTIMIZER), map_location="cpu", weights_only=True))
    with open(os.path.join(folder, STATE)) as f:
        return json.load(f)


def latest(run_url: str, storage_options=None) -> str:
    """The checkpoint folder with the highest step under a student's run folder."""
    best, best_step = None, -1
    for name in list_names(run_url, storage_options):
        if not name.startswith("checkpoint_"):
            continue
        url = join_url(run_url, name)
        try:
            step = read_json(join_url(url, STATE), storage_options)["step"]
        except (FileNotFoundError, NotADirectoryError):
            continue  # not a checkpoint folder, or one still being uploaded
        if step > best_step:
            best, best_step = url, step
    if best is None:
        raise PipelineError(f"no checkpoint under {run_url}: run the distill stage first")
    return best


def epoch_folder(run_url: str, epoch: int) -> str:
    """Where the student kept at the end of `epoch` (1-based) lives (distill.keep_every_epochs)."""
    return join_url(run_url, "epochs", f"epoch_{epoch:04d}")


def kept_epochs(run_url: str, storage_options=None) -> list[int]:
    try:
        names = list_names(join_url(run_url, "epochs"), storage_options)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n.removeprefix("epoch_")) for n in names if n.startswith("epoch_") and n[6:].isdigit())


def of_epoch(run_url: str, epoch: int, storage_options=None) -> str:
    """The kept checkpoint of `epoch`, or an error that lists the epochs there are."""
    folder = epoch_folder(run_url, epoch)
    try:
        read_json(join_url(folder, STATE), storage_options)
    except (FileNotFoundError, NotADirectoryError):
        kept = kept_epochs(run_url, storage_options)
        raise PipelineError(f"no student kept for epoch {epoch} under {run_url}: kept epochs are "
                            f"{kept or 'none'} (set distill.keep_every_epochs before training)") from None
    return folder


def load_student(checkpoint_url: str, storage_options=None) -> tuple[nn.Module, nn.Linear | None, dict]:
    """Rebuild the trained student (eval mode) and its projection, if any, from a checkpoint
    folder, local or remote."""
    state = read_json(join_url(checkpoint_url, STATE), storage_options)
    base = TeacherConfig.model_validate(state["student_base"])
    cfg = StudentConfig.model_validate(state["student"])
    model = student_skeleton(base, cfg.registers)
    model.load_state_dict(safetensors.torch.load(read_bytes(join_url(checkpoint_url, WEIGHTS), storage_options)))
    projection = None
    if state.get("projection"):
        weights = safetensors.torch.load(read_bytes(join_url(checkpoint_url, PROJECTION), storage_options))
        projection = nn.Linear(*reversed(weights["weight"].shape))
        projection.load_state_dict(weights)
        projection.eval()
    return model.eval(), projection, state
