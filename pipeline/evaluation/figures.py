"""Figures as PNG files (matplotlib, no display needed), written to any storage URL.

Every figure has a title that says what it shows; maps that share a meaning share one colour
scale and one colour bar, so panels can be compared by eye.
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from pipeline.storage import write_bytes_atomic  # noqa: E402

PANEL = 2.1  # inches per panel
MARK = "#00e5ff"  # outlier outlines: cyan stands out on magma and viridis


def _save(fig, url: str, storage_options=None) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def _panels(rows: int, cols: int, title: str, extra_width: float = 0.0):
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL * cols + extra_width, PANEL * rows + 0.5), squeeze=False)
    fig.suptitle(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _column_titles(axes, names) -> None:
    for j, name in enumerate(names):
        axes[0, j].set_title(name, fontsize=9)


def _outline(ax, mask: np.ndarray, shape: tuple[int, int]) -> None:
    """Draw a box around every True cell of a (gh, gw) mask on an axis showing `shape` pixels."""
    sy, sx = shape[0] / mask.shape[0], shape[1] / mask.shape[1]
    for y, x in zip(*np.nonzero(mask)):
        ax.add_patch(Rectangle((x * sx - 0.5, y * sy - 0.5), sx, sy, fill=False, edgecolor=MARK, linewidth=1.0))


def feature_grid(images: list[np.ndarray], columns: dict[str, np.ndarray], url: str, storage_options=None,
                 title: str = "PCA of patch features (first three components as RGB, shared by all panels)") -> None:
    """One row per image: the image, then one RGB map (N, gh, gw, 3) per named column."""
    fig, axes = _panels(len(images), 1 + len(columns), title)
    for i, img in enumerate(images):
        axes[i, 0].imshow(img)
        for j, maps in enumerate(columns.values(), start=1):
            axes[i, j].imshow(maps[i], interpolation="nearest")
    _column_titles(axes, ["image", *columns])
    _save(fig, url, storage_options)


def map_grid(images: list[np.ndarray] | None, columns: dict[str, np.ndarray], url: str, storage_options=None, *,
             title: str, label: str, cmap: str = "magma", vmin: float | None = None, vmax: float | None = None,
             marks: dict[str, np.ndarray] | None = None) -> None:
    """Scalar maps (N, h, w) per named column on one colour scale with one colour bar, after an
    image column when `images` is given. `marks` outlines cells (N, gh, gw) in a column."""
    n = len(next(iter(columns.values())))
    first = 0 if images is None else 1
    lo = min(float(np.nanmin(m)) for m in columns.values()) if vmin is None else vmin
    hi = max(float(np.nanmax(m)) for m in columns.values()) if vmax is None else vmax
    fig, axes = _panels(n, first + len(columns), title, extra_width=0.8)
    shown = None
    for i in range(n):
        if images is not None:
            axes[i, 0].imshow(images[i])
        for j, (name, maps) in enumerate(columns.items(), start=first):
            shown = axes[i, j].imshow(maps[i], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            if marks and name in marks:
                _outline(axes[i, j], marks[name][i], maps[i].shape)
    _column_titles(axes, (["image"] if images is not None else []) + list(columns))
    fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02, label=label)
    _save(fig, url, storage_options)


def norm_histogram(panels: dict[str, dict[str, np.ndarray]], url: str, storage_options=None, *,
                   thresholds: dict[str, float | None] | None = None) -> None:
    """One histogram panel per layer: token norms of every model on a log count axis, with the
    layer's absolute threshold as a dashed line when there is one."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    fig.suptitle("Patch-token norms (log count)", fontsize=10)
    names = list(dict.fromkeys(name for norms in panels.values() for name in norms))
    for ax, (layer, norms) in zip(axes[0], panels.items()):
        hi = max(float(v.max()) for v in norms.values())
        bins = np.linspace(0, hi * 1.02, 80)
        for name, values in norms.items():  # a model keeps its colour in every panel
            ax.hist(values.ravel(), bins=bins, histtype="step", linewidth=1.5, label=name, color=f"C{names.index(name)}")
        threshold = (thresholds or {}).get(layer)
        if threshold is not None:
            ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"abs. threshold {threshold:g}")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("norm")
        ax.set_ylabel("tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, url, storage_options)


def label_grid(images: list[np.ndarray], columns: dict[str, np.ndarray], url: str, storage_options=None, *,
               title: str, class_names: list[str], ignore_index: int) -> None:
    """Segmentation maps (N, H, W) of labels per named column, one colour per class (legend),
    ignored pixels black."""
    n = len(class_names)
    colours = plt.get_cmap("tab10")(np.arange(n)) if n <= 10 else plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))
    cmap = ListedColormap(np.vstack([colours, [0, 0, 0, 1]]))
    fig, axes = _panels(len(images), 1 + len(columns), title, extra_width=1.6)
    for i, img in enumerate(images):
        axes[i, 0].imshow(img)
        for j, maps in enumerate(columns.values(), start=1):
            shown = np.where(maps[i] == ignore_index, len(class_names), maps[i])
            axes[i, j].imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(class_names) + 0.5, interpolation="nearest")
    _column_titles(axes, ["image", *columns])
    present = sorted({int(v) for m in columns.values() for v in np.unique(m) if v != ignore_index and v < len(class_names)})
    handles = [Patch(color=cmap(c), label=class_names[c]) for c in present] + [Patch(color="k", label="ignored")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.subplots_adjust(right=1 - 1.4 / fig.get_figwidth())
    _save(fig, url, storage_options)


def training_curves(rows: list[dict], url: str, storage_options=None, title: str = "Distillation") -> None:
    """Loss, cosine to the targets and learning rate against the step, from metrics.csv rows."""
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    fig.suptitle(title, fontsize=10)
    for ax, key, label in zip(axes, ("loss", "cosine", "lr"), ("loss: (1 - cos) + mse_scale * MSE", "cosine to target",
                                                                  "learning rate")):
        ax.plot(steps, [float(r[key]) for r in rows], marker=".", linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    _save(fig, url, storage_options)
