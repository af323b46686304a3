"""The distillation objective and its learning-rate schedule (DESIGN section 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(pred: torch.Tensor, target: torch.Tensor, mse_scale: float = 1.0):
    """(1 - mean cosine similarity) + mse_scale * MSE over patch tokens (..., D).
    Returns (loss, mean cosine, mse); the last two detached, for logging."""
    pred, target = pred.float(), target.float()
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    mse = F.mse_loss(pred, target)
    return (1.0 - cos) + mse_scale * mse, cos.detach(), mse.detach()


def exp_decay_lr(step: int, total_steps: int, lr: float, final_lr: float, every: int = 1) -> float:
    """Exponential decay from `lr` at step 0 to `final_lr` at `total_steps`, no warm-up.
    `every` > 1 holds the rate for blocks of that many steps (every = steps per epoch is the
    reference's ExponentialLR stepped once per epoch: epoch e trains at the rate of step e * every)."""
    if total_steps <= 0:
        return lr
    progress = min(max((step // every) * every / total_steps, 0.0), 1.0)
    return lr * (final_lr / lr) ** progress
