"""Figures as PNG files (matplotlib, no display needed)."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.storage import write_bytes_atomic  # noqa: E402


def _save(fig, url: str, storage_options=None) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def feature_grid(images: list[np.ndarray], columns: dict[str, np.ndarray], url: str, storage_options=None,
                 cmap_columns: tuple[str, ...] = ()) -> None:
    """One row per image: the image, then one panel per named column (N, gh, gw, 3) or,
    for names in `cmap_columns`, (N, gh, gw) scalar maps drawn with a colour map."""
    n, cols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i, img in enumerate(images):
        axes[i, 0].imshow(img)
        for j, (name, maps) in enumerate(columns.items(), start=1):
            if name in cmap_columns:
                axes[i, j].imshow(maps[i], cmap="magma")
            else:
                axes[i, j].imshow(maps[i], interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["image", *columns]):
        axes[0, j].set_title(name, fontsize=9)
    _save(fig, url, storage_options)


def norm_histogram(norms: dict[str, np.ndarray], url: str, storage_options=None) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    hi = max(float(v.max()) for v in norms.values())
    bins = np.linspace(0, hi * 1.02, 80)
    for name, values in norms.items():
        ax.hist(values.ravel(), bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("patch-token norm")
    ax.set_ylabel("tokens")
    ax.legend()
    _save(fig, url, storage_options)
