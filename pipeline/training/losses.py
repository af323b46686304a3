"""The distillation objective and its learning-rate schedule (DESIGN section 1)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def student_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, mse_scale: float = 1.0):
    """The student's patch features of `images` against `targets`: `distill_loss` of one step,
    with bf16 autocast on a GPU. One function, so `compiled_loss` can compile forward and loss
    together."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
    with autocast:
        pred = model(images)
    return distill_loss(pred, targets, mse_scale)


def compiled_loss(enabled: bool):
    """`student_loss`, compiled with torch.compile when `enabled` (batch shapes are fixed,
    so it compiles once; the first step pays for it)."""
    return torch.compile(student_loss) if enabled else student_loss


def distill_loss(pred: torch.Tensor, target: torch.Tensor, mse_scale: float = 1.0):
    """(1 - mean cosine similarity) + mse_scale * MSE over patch tokens (..., D).
    Returns (loss, mean cosine, mse); the last two detached, for logging."""
    pred, target = pred.float(), target.float()
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    mse = F.mse_loss(pred, target)
    return (1.0 - cos) + mse_scale * mse, cos.detach(), mse.detach()


def exp_decay_lr(step: int, total_steps: int, lr: float, final_lr: float, every: int = 1) -> float:
    """Exponential decay from `lr` at step 0 to `final_lr` at `total_steps`, no warm-up.
    `every` > 1 holds the rate for blocks of that many steps, as the reference's ExponentialLR
    stepped once per epoch before it trains: block b trains at the rate of step (b + 1) * every,
    so the last block trains at `final_lr` (and the first already one decay step below `lr`)."""
    if total_steps <= 0:
        return lr
    reached = step if every == 1 else (step // every + 1) * every
    progress = min(max(reached / total_steps, 0.0), 1.0)
    return lr * (final_lr / lr) ** progress
