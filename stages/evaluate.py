"""Evaluate stage: teacher vs denoised targets vs student on the last images of the corpus.

Writes to the report folder: report.json (numbers), report.md (numbers and pictures),
pca.png (PCA feature maps side by side), norms.png (norm maps) and norm_hist.png.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.config import Config
from pipeline.export import load_exported
from pipeline.figures import feature_grid, norm_histogram
from pipeline.images import Preprocess, decode_rgb
from pipeline.manifest import Manifest
from pipeline.metrics import cosine_to, norm_summary, pca_rgb, token_norms
from pipeline.models import load_teacher, patch_features
from pipeline.shards import read_tar
from pipeline.storage import join_url, write_bytes_atomic
from pipeline.target_store import find_store
from stages.runtime import say


def load_images(manifest: Manifest, indices: list[int], storage_options=None):
    by_shard: dict[int, list[int]] = {}
    for index in indices:
        shard, pos = manifest.locate(index)
        by_shard.setdefault(shard, []).append(pos)
    images = []
    for shard, positions in by_shard.items():
        samples = read_tar(manifest.tar_url(shard), storage_options)
        images += [decode_rgb(samples[p].image) for p in positions]
    return images


def evaluation_indices(manifest: Manifest, n: int) -> list[int]:
    """`n` indices spread evenly over the corpus (every image when it is smaller)."""
    everything = manifest.indices()
    picks = np.linspace(0, len(everything) - 1, num=min(n, len(everything))).round().astype(int)
    return [everything[i] for i in sorted(set(picks))]


@torch.inference_mode()
def features(model, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([patch_features(model, x[i:i + batch]) for i in range(0, len(x), batch)])


def run(cfg: Config) -> dict:
    so, e = cfg.storage.storage_options, cfg.evaluate
    manifest = Manifest.load(cfg.cache_shards_url, so)
    store = find_store(cfg, manifest)
    indices = evaluation_indices(manifest, e.num_images)
    preprocess = Preprocess.from_dict(store.spec.teacher["preprocess"])
    images = load_images(manifest, indices, so)
    boxes = store.read_boxes(np.array(indices), 0)
    x = torch.stack([preprocess(img, box) for img, box in zip(images, boxes)])

    feats = {
        "teacher": features(load_teacher(cfg.teacher, so), x),
        "target": torch.from_numpy(store.read(np.array(indices), 0)),
    }
    student_url = e.student or cfg.export_url
    feats["student"] = features(load_exported(student_url, so), x)

    norms = {name: token_norms(f) for name, f in feats.items()}
    report = {
        "images": indices,
        "store": store.url,
        "student": student_url,
        "outlier_rule": f"norm > median + {e.outlier_k} * MAD per image",
        "norms": {name: norm_summary(n, e.outlier_k, e.abs_threshold) for name, n in norms.items()},
        "cosine_to_target": {name: cosine_to(feats[name], feats["target"]) for name in ("teacher", "student")},
    }

    out = cfg.eval_url
    k = min(e.pca_images, len(images))
    h, w = preprocess.size
    shown = [np.asarray(img.resize((w, h), box=tuple(map(float, box)))) for img, box in zip(images[:k], boxes[:k])]
    rgb = pca_rgb({name: f[:k] for name, f in feats.items()})
    feature_grid(shown, {name: m.numpy() for name, m in rgb.items()}, join_url(out, "pca.png"), so)
    feature_grid(shown, {f"{name} norm": n[:k].numpy() for name, n in norms.items()}, join_url(out, "norms.png"), so,
                 cmap_columns=tuple(f"{name} norm" for name in norms))
    norm_histogram({name: n.numpy() for name, n in norms.items()}, join_url(out, "norm_hist.png"), so)
    write_bytes_atomic(join_url(out, "report.json"), json.dumps(report, indent=1).encode(), so)
    write_bytes_atomic(join_url(out, "report.md"), markdown(report).encode(), so)
    say(f"evaluate: {len(indices)} images -> {out}\n" + table(report))
    return report


def table(report: dict) -> str:
    rows = ["| model | mean norm | max norm | outliers / image | cosine to target |", "|---|---|---|---|---|"]
    for name, s in report["norms"].items():
        cos = report["cosine_to_target"].get(name, 1.0)
        rows.append(f"| {name} | {s['norm_mean']:.2f} | {s['norm_max']:.2f} | {s['outliers_per_image']:.2f} | {cos:.4f} |")
    return "\n".join(rows)


def markdown(report: dict) -> str:
    return (
        f"# Evaluation\n\nStudent: `{report['student']}`  \nStore: `{report['store']}`  \n"
        f"Images: {len(report['images'])} (global indices {report['images'][0]}..{report['images'][-1]})  \n"
        f"Outliers: {report['outlier_rule']}\n\n{table(report)}\n\n"
        "## PCA of patch features\n\n![pca](pca.png)\n\n## Token norms\n\n![norms](norms.png)\n\n![hist](norm_hist.png)\n"
    )
