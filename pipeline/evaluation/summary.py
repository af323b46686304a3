"""The evaluate stage's report and pictures from its tasks' results: token-norm statistics and
outliers per model, attention on them, fidelity to the targets, the probes' and zero-shot
segmentation's scores."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.images import Preprocess, crop_box
from pipeline.evaluation import figures, metrics
from pipeline.evaluation.labeled import LabeledSet, load_item
from pipeline.evaluation.plan import Plan
from pipeline.evaluation.probes import ProbeSums, iou_per_class, mean_iou
from pipeline.evaluation.tasks import resized
from pipeline.storage import join_url


def masks(norms: dict[str, np.ndarray], e) -> dict[str, torch.Tensor]:
    return {name: metrics.outlier_mask(torch.from_numpy(n), e.outlier_k, e.min_mad) for name, n in norms.items()}


def summarize(cfg: Config, p: Plan, data: dict) -> dict:
    e = cfg.evaluate
    final, residual = data["final"], data["residual"]
    final_masks, residual_masks = masks(final, e), masks(residual, e)
    note = None
    if p.trained_on:
        note = ("these images were used to train the student (evaluate.shards defaults to the training shards); "
                "set evaluate.shards to a held-out shard folder for an unbiased comparison")
    report = {
        "mode": p.mode,
        "models": p.described,
        "images": {"shards": p.manifest.url, "corpus_id": p.manifest.corpus_id, "count": len(data["indices"]),
                   "indices": data["indices"], "trained_on": p.trained_on, "note": note},
        "outlier_rule": {"relative": f"norm > median + {e.outlier_k:g} * max(MAD, {e.min_mad:g} * median), per image",
                         "abs_threshold_final": e.abs_threshold_final, "abs_threshold_residual": e.abs_threshold},
        "norms": {name: metrics.norm_summary(torch.from_numpy(n), final_masks[name], e.abs_threshold_final)
                  for name, n in final.items()},
        "residual": {"block": data["block"],
                     "norms": {name: metrics.norm_summary(torch.from_numpy(n), residual_masks[name], e.abs_threshold)
                               for name, n in residual.items()}},
        "outlier_maps": {"final": {n: metrics.outlier_frequency(m).tolist() for n, m in final_masks.items()},
                         "residual": {n: metrics.outlier_frequency(m).tolist() for n, m in residual_masks.items()}},
        "attention": {},
        "fidelity": {name: {"cosine": float(data["cosine"][name].mean()), "mse": float(data["mse"][name].mean())}
                     for name in data["cosine"]},
    }
    report["cosine_to_target"] = {name: f["cosine"] for name, f in report["fidelity"].items()}
    for name, att in data["attention"].items():
        a = torch.from_numpy(att)
        entry = {"on_final_outliers": metrics.attention_on(final_masks[name], a),
                 "final_outlier_fraction": final_masks[name].float().mean().item()}
        if name in residual_masks:
            entry["on_residual_outliers"] = metrics.attention_on(residual_masks[name], a)
            entry["residual_outlier_fraction"] = residual_masks[name].float().mean().item()
        report["attention"][name] = entry
    return report


def draw(cfg: Config, p: Plan, data: dict, report: dict) -> None:
    so, e, out = cfg.storage.storage_options, cfg.evaluate, p.output
    pixels, k = data["pixels"], len(data["pixels"])
    final, residual = data["final"], data["residual"]
    final_masks, residual_masks = masks(final, e), masks(residual, e)
    report["figures"] = {}

    def saved(name: str, caption: str) -> str:
        report["figures"][name] = caption
        return join_url(out, name)

    rgb = metrics.pca_rgb({name: torch.from_numpy(f) for name, f in data["features"].items()})
    figures.feature_grid(pixels, {n: m.numpy() for n, m in rgb.items()},
                         saved("pca.png", "PCA of final-layer patch features, joint over all models"), so)
    figures.map_grid(pixels, {n: v[:k] for n, v in final.items()}, saved("norms.png", "final-layer norms, outliers outlined"), so,
                     title="Final-layer patch-token norms (outliers outlined)", label="norm", vmin=0,
                     marks={n: m[:k].numpy() for n, m in final_masks.items()})
    panels = {"final layer": final}
    if residual:
        where = f"residual stream after block {report['residual']['block']}"
        figures.map_grid(pixels, {n: v[:k] for n, v in residual.items()}, saved("norms_residual.png", f"{where} norms"), so,
                         title=f"Norms on the {where}, before the final norm (outliers outlined)", label="norm", vmin=0,
                         marks={n: m[:k].numpy() for n, m in residual_masks.items()})
        panels[where] = residual
    figures.norm_histogram(panels, saved("norm_hist.png", "norm histograms"), so,
                           thresholds={"final layer": e.abs_threshold_final, **({where: e.abs_threshold} if residual else {})})
    maps = {f"{n} (final)": m for n, m in final_masks.items()} | {f"{n} (residual)": m for n, m in residual_masks.items()}
    figures.map_grid(None, {n: metrics.outlier_frequency(m).numpy()[None] for n, m in maps.items()},
                     saved("outlier_map.png", "outlier frequency per grid position"), so,
                     title=f"How often each grid position is an outlier ({len(data['indices'])} images)",
                     label="fraction of images", cmap="viridis", vmin=0, vmax=1)
    if data["attention"]:
        figures.map_grid(pixels, {f"{n} CLS attention": a[:k] for n, a in data["attention"].items()},
                         saved("attention.png", "class-token attention in the last block"), so,
                         title="Class-token attention over patches, last block, mean over heads (final-layer outliers outlined)",
                         label="attention", vmin=0,
                         marks={f"{n} CLS attention": final_masks[n][:k].numpy() for n in data["attention"]})


def probe_report(e, preprocess: Preprocess, labeled: LabeledSet, url: str, results: dict[str, ProbeSums],
                 examples: list[str], output: str, so) -> dict:
    """The probes' section of the report (scores per model and split sizes) and their pictures."""
    if e.probes.protocol == "trained":
        report = {"labeled": url, "probe_protocol": "trained", "protocol": trained_protocol(e, preprocess), "models": {}}
    else:
        report = {"labeled": url, "probe_protocol": "ridge", "protocol": "ridge regression on final-layer patch features "
                  "(patch-level targets), predictions upsampled bilinearly to the model's input pixels", "ridge": e.probes.ridge,
                  "models": {}}
    for name, r in results.items():
        entry = {}
        if r.seg_conf is not None:
            iou = iou_per_class(r.seg_conf)
            entry["segmentation"] = {"miou": mean_iou(r.seg_conf), "pixel_accuracy": float(np.trace(r.seg_conf) / r.seg_conf.sum()),
                                     "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(labeled.classes, iou)}}
        if r.depth is not None:
            entry["depth"] = r.depth.scores()
        report["models"][name] = entry
    report["splits"] = {s: {"segmentation": len(labeled.with_masks(s)), "depth": len(labeled.with_depth(s))} for s in labeled.splits}
    report["figures"] = probe_figures(labeled, preprocess, results, examples, output, so)
    return report


def trained_protocol(e, preprocess: Preprocess) -> str:
    h, w = preprocess.size
    side = {"window": min(h, w), None: None}.get(e.probes.short_side, e.probes.short_side)
    seg_scale = f"short side {side}" if side else "each val image's own resolution"
    return (f"trained linear heads on frozen final-layer features, DINOv2 / PH-Reg protocol: "
            f"{e.probes.iterations} AdamW steps of {e.probes.batch_size} augmented {h}x{w} windows; "
            f"segmentation: BatchNorm + 1x1 conv, cross-entropy, lr {e.probes.lr:g} poly 0.9, sliding windows "
            f"(stride {e.probes.stride:.2f} of the window) at {seg_scale}, logits resized back to the image; "
            f"depth: 1x1 conv, {e.probes.depth_bins} bins over {e.probes.min_depth:g}-{e.probes.max_depth:g} m "
            f"(patch + class tokens, relu + 0.1 normalised, SigLog lambda {e.probes.siglog_lambda:g} + "
            f"{e.probes.gradient_weight:g} x gradient loss), lr {e.probes.depth_lr:g} cosine with "
            f"{e.probes.depth_warmup:.0%} warm-up, weight decay {e.probes.depth_weight_decay:g}, sliding windows at each val "
            f"image's own resolution{', Eigen crop' if e.probes.eigen_crop else ''}")


def probe_figures(labeled: LabeledSet, preprocess: Preprocess, results: dict[str, ProbeSums], examples: list[str],
                  output: str, so) -> list[str]:
    """Val images, ground truth and every model's probe prediction; returns the files written."""
    items, written = {it.id: it for it in labeled.splits["val"]}, []
    for kind, ext in (("seg", "probe_seg.png"), ("depth", "probe_depth.png")):
        ids = [i for i in examples if all(kind in results[m].examples.get(i, {}) for m in results)]
        if not ids:
            continue
        pixels, truth = [], []
        for i in ids:
            img, mask, depth = load_item(items[i], labeled, so)
            box = crop_box(img.width, img.height, preprocess.size, "center")
            h, w = preprocess.size
            pixels.append(np.asarray(img.resize((w, h), box=tuple(map(float, box)))))
            truth.append(resized(mask if kind == "seg" else depth, box, preprocess.size))
        columns = {"ground truth": np.stack(truth), **{f"{m} probe": np.stack([results[m].examples[i][kind] for i in ids])
                                                       for m in results}}
        url = join_url(output, ext)
        written.append(ext)
        if kind == "seg":
            figures.label_grid(pixels, columns, url, so, title="Linear probe: segmentation on val images",
                               class_names=labeled.classes, ignore_index=labeled.ignore_index)
        else:
            gt = columns["ground truth"]
            columns["ground truth"] = np.where(gt > 0, gt, np.nan)
            figures.map_grid(pixels, columns, url, so, title="Linear probe: depth on val images (metres; blank = no ground truth)",
                             label="depth (m)", cmap="viridis", vmin=float(np.nanmin(columns["ground truth"])),
                             vmax=float(np.nanmax(columns["ground truth"])))
    return written


def zeroshot_report(z, labeled: LabeledSet, url: str, items: list, p: Plan, parts: list[dict], examples: list[str],
                    output: str, so) -> dict:
    """The zero-shot section of the report (mIoU per model) and its picture, from the tasks' parts."""
    report = {"labeled": url, "split": z.split, "images": len(items), "classes": labeled.classes, "models": {},
              "protocol": f"short side {z.short_side}, windows {z.crop}/{z.stride}, logit scale {z.logit_scale:g}, "
                          f"background below probability {z.prob_threshold:g}, "
                          + (f"class embeddings `{z.embeddings}`" if z.embeddings else
                             f"text tower {z.text_model} ({z.text_pretrained or f'random, seed {z.text_seed}'})")}
    predictions = {}
    for ref in p.models:
        conf = sum(part[ref.name]["confusion"] for part in parts)
        iou = iou_per_class(conf)
        report["models"][ref.name] = {"miou": mean_iou(conf), "iou": {c: (None if np.isnan(v) else float(v))
                                                                     for c, v in zip(labeled.classes, iou)}}
        predictions[ref.name] = {k: v for part in parts for k, v in part[ref.name]["examples"].items()}
    pixels, columns = [], {"ground truth": []} | {f"{m} zero-shot": [] for m in predictions}
    for item in (it for it in items if it.id in examples):
        img, mask, _ = load_item(item, labeled, so)
        box = crop_box(img.width, img.height, p.preprocess.size, "center")
        h, w = p.preprocess.size
        pixels.append(np.asarray(img.resize((w, h), box=tuple(map(float, box)))))
        columns["ground truth"].append(resized(mask, box, p.preprocess.size))
        for m in predictions:
            columns[f"{m} zero-shot"].append(resized(predictions[m][item.id], box, p.preprocess.size))
    figures.label_grid(pixels, {k: np.stack(v) for k, v in columns.items()}, join_url(output, "zeroshot_seg.png"), so,
                       title="Zero-shot segmentation on labeled images", class_names=labeled.classes,
                       ignore_index=labeled.ignore_index)
    report["figures"] = ["zeroshot_seg.png"]
    return report
