"""Dense-feature statistics: token norms, outlier (artifact) tokens, PCA colour maps."""
from __future__ import annotations

import torch


def token_norms(features: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw, D) -> (N, gh, gw) L2 norms."""
    return features.float().norm(dim=-1)


def outlier_mask(norms: torch.Tensor, k: float, min_mad: float = 0.01) -> torch.Tensor:
    """Tokens whose norm exceeds their own image's median + k * MAD (median absolute
    deviation): a relative threshold that works across models, sizes and layers. The MAD is
    floored at `min_mad` * median so that nearly constant norms (e.g. right after a
    LayerNorm with unit weights) do not turn rounding noise into outliers."""
    flat = norms.flatten(1)
    median = flat.median(dim=1, keepdim=True).values
    mad = (flat - median).abs().median(dim=1, keepdim=True).values.clamp(min=min_mad * median)
    return (flat > median + k * mad).view_as(norms)


def norm_summary(norms: torch.Tensor, k: float, abs_threshold: float | None = None) -> dict:
    mask = outlier_mask(norms, k)
    per_image = mask.flatten(1).sum(1).float()
    out = {
        "norm_mean": norms.mean().item(),
        "norm_median": norms.median().item(),
        "norm_p99": norms.flatten().quantile(0.99).item(),
        "norm_max": norms.max().item(),
        "outliers_per_image": per_image.mean().item(),
        "outlier_fraction": mask.float().mean().item(),
    }
    if abs_threshold is not None:
        out["abs_outliers_per_image"] = (norms > abs_threshold).flatten(1).sum(1).float().mean().item()
    return out


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


def cosine_to(pred: torch.Tensor, target: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1).mean().item()
