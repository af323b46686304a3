"""Dense-feature statistics: token norms, outlier (artifact) tokens, where they are, how much
attention they draw, PCA colour maps, and how close features are to the targets.

Pure functions on tensors; the evaluate stage decides what they are applied to.
"""
from __future__ import annotations

import torch


def token_norms(features: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw, D) -> (N, gh, gw) L2 norms."""
    return features.float().norm(dim=-1)


def relative_thresholds(norms: torch.Tensor, k: float, min_mad: float) -> torch.Tensor:
    """(N, gh, gw) -> (N,) per-image threshold median + k * MAD (median absolute deviation).
    The MAD is floored at `min_mad` * median: right after a LayerNorm norms are nearly
    constant, and without a floor rounding noise would count as outliers."""
    flat = norms.flatten(1).float()
    median = flat.quantile(0.5, dim=1)  # the true median: torch.median takes the lower middle value
    mad = (flat - median[:, None]).abs().quantile(0.5, dim=1).clamp(min=min_mad * median)
    return median + k * mad


def outlier_mask(norms: torch.Tensor, k: float, min_mad: float = 0.05) -> torch.Tensor:
    """Tokens whose norm exceeds their own image's median + k * MAD: a relative rule that
    works across models, sizes and layers."""
    return norms > relative_thresholds(norms, k, min_mad).view(-1, *[1] * (norms.dim() - 1))


def norm_summary(norms: torch.Tensor, mask: torch.Tensor, abs_threshold: float | None = None) -> dict:
    """Statistics of one model's norms (N, gh, gw) with its outlier mask (same shape)."""
    flat = norms.flatten().float()
    per_image = mask.flatten(1).sum(1).float()
    out = {
        "norm_mean": flat.mean().item(),
        "norm_median": flat.quantile(0.5).item(),
        "norm_p99": flat.quantile(0.99).item(),
        "norm_max": flat.max().item(),
        "outliers_per_image": per_image.mean().item(),
        "outliers_per_image_max": per_image.max().item(),
        "outlier_fraction": mask.float().mean().item(),
    }
    if abs_threshold is not None:
        out["abs_threshold"] = abs_threshold
        out["abs_outliers_per_image"] = (norms > abs_threshold).flatten(1).sum(1).float().mean().item()
    return out


def outlier_frequency(mask: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw) bool -> (gh, gw): how often each grid position is an outlier."""
    return mask.float().mean(0)


def attention_on(mask: torch.Tensor, attention: torch.Tensor) -> float:
    """Mean over images of the share of the patch attention (N, gh, gw) that falls on the
    masked tokens. Uniform attention would give the masked fraction of tokens."""
    att = attention.flatten(1).float()
    share = (att * mask.flatten(1)).sum(1) / att.sum(1).clamp(min=1e-12)
    return share.mean().item()


def pca_rgb(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: (N, gh, gw, D)} -> {name: (N, gh, gw, 3) in [0, 1]}: every model's tokens
    projected on the first three principal components of all of them together, so colours
    mean the same in every panel; each component stretched between its 1st and 99th
    percentile."""
    flat = {name: f.float().reshape(-1, f.shape[-1]) for name, f in features.items()}
    everything = torch.cat(list(flat.values()))
    mean = everything.mean(0)
    _, _, v = torch.linalg.svd(everything - mean, full_matrices=False)
    proj = {name: (x - mean) @ v[:3].T for name, x in flat.items()}
    joint = torch.cat(list(proj.values()))
    lo, hi = joint.quantile(0.01, dim=0), joint.quantile(0.99, dim=0)
    return {name: ((p - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1).reshape(*features[name].shape[:3], 3)
            for name, p in proj.items()}


def cosine_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw, D) twice -> (N,) mean cosine similarity of corresponding tokens."""
    return torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1).flatten(1).mean(1)


def mse_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw, D) twice -> (N,) mean squared error over tokens and channels."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
