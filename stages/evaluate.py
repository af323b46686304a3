"""Evaluate stage: artifact tokens, target fidelity, dense linear probes, pictures, one report.

Two modes:
- pipeline (default): the teacher, its denoised targets and the exported student on the images
  of `evaluate.shards` (default: the training shards; the report then says the student was
  trained on them);
- one model (`evaluate.model`): any timm model, weights file or export folder on its own, to
  check it for artifacts before deciding to distill.

Ray tasks do the per-image work: each loads the models once and reads its own images (and
target rows) from storage. The driver combines their small per-image results, draws the
figures and writes everything under the report folder (a local folder or any storage URL):
report.md, report.json, pca.png, norms.png, norms_residual.png, norm_hist.png,
outlier_map.png, attention.png, probe_seg.png, probe_depth.png.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from PIL import Image
from torch import nn

from pipeline import figures, metrics
from pipeline.config import Config, TeacherConfig, expand_students
from pipeline.errors import ConfigError, PipelineError
from pipeline.export import load_exported_features
from pipeline.images import INTERPOLATIONS, Preprocess, crop_box, decode_rgb
from pipeline.labeled import SAMPLE as SAMPLE_LABELED
from pipeline.labeled import LabeledItem, LabeledSet, load_item, open_labeled, write_labeled_sample
from pipeline.manifest import Manifest
from pipeline.models import PatchFeatures, describe_teacher, load_teacher, readout
from pipeline.probes import ProbeSums, iou_per_class, mean_iou
from pipeline.shards import read_images
from pipeline.storage import absolute, exists, has_scheme, join_url, read_json, write_bytes_atomic
from pipeline.target_store import TargetStore, find_store
from stages.runtime import init_ray, progress, say

TARGET = "target"
ORDER = ("teacher", TARGET, "student")  # columns, rows and colours follow this order
BATCH = 8  # images per forward inside a task


# --- what is evaluated -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    """A model a Ray task loads by itself: a teacher config, or an export folder."""

    name: str
    teacher: dict | None = None  # TeacherConfig as JSON
    export: str | None = None

    def load(self, storage_options=None) -> PatchFeatures:
        """The timm model (`.model`) with the projection to the teacher's width an export of a
        narrower student carries (`.projection`, else None)."""
        if self.export:
            return load_exported_features(self.export, storage_options)
        return PatchFeatures(load_teacher(TeacherConfig.model_validate(self.teacher), storage_options))


@dataclass
class Plan:
    mode: str  # "pipeline" or "model"
    models: list[ModelRef]
    manifest: Manifest
    indices: list[int]
    store: TargetStore | None
    preprocess: Preprocess
    trained_on: bool | None
    output: str
    described: dict = field(default_factory=dict)  # name -> what it is, for the report


def evaluation_indices(manifest: Manifest, n: int) -> list[int]:
    """`n` indices spread evenly over the corpus (every image when it is smaller)."""
    everything = manifest.indices()
    picks = np.linspace(0, len(everything) - 1, num=min(n, len(everything))).round().astype(int)
    return [everything[i] for i in sorted(set(picks))]


def export_folder(value: str) -> str | None:
    """The export folder `evaluate.model` names, or None when it names a timm model."""
    if value.startswith("local-dir:"):
        return absolute(value[len("local-dir:"):])
    if has_scheme(value) or os.path.isdir(value):
        return absolute(value)
    return None


def export_preprocess(url: str, storage_options=None) -> Preprocess:
    """An export folder's preprocessing, from the config.json timm wrote (no weights loaded)."""
    try:
        config = read_json(join_url(url, "config.json"), storage_options)
    except FileNotFoundError:
        raise PipelineError(f"{url} is not an export folder (no config.json)") from None
    pcfg, args = config.get("pretrained_cfg", {}), config.get("model_args", {})
    size = args.get("img_size") or pcfg["input_size"][1:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = pcfg.get("interpolation", "bicubic")
    return Preprocess(size, interpolation if interpolation in INTERPOLATIONS else "bicubic", tuple(pcfg["mean"]), tuple(pcfg["std"]))


def eval_store(cfg: Config, manifest: Manifest) -> TargetStore:
    """The target store of the evaluated images: evaluate.store, or the one this config's
    teacher and TTA settings give for that manifest (its corpus is part of the fingerprint)."""
    lookup = cfg.model_copy(deep=True)
    lookup.distill.store = cfg.evaluate.store
    try:
        return find_store(lookup, manifest)
    except ConfigError as e:
        raise ConfigError(f"{e}\nFor held-out images, run teacher-cache with cache.shards={manifest.url}; "
                          "to evaluate without targets set evaluate.targets: false.") from None


def plan(cfg: Config) -> Plan:
    so, e = cfg.storage.storage_options, cfg.evaluate
    manifest = Manifest.load(e.shards or cfg.cache_shards_url, so)
    indices = evaluation_indices(manifest, e.num_images)
    return (one_model_plan if e.model else pipeline_plan)(cfg, manifest, indices)


def one_model_plan(cfg: Config, manifest: Manifest, indices: list[int]) -> Plan:
    so, e = cfg.storage.storage_options, cfg.evaluate
    folder = export_folder(e.model)
    if folder:
        if e.checkpoint or e.pretrained:
            raise ConfigError("evaluate.checkpoint / evaluate.pretrained apply to a timm model name, not to an export folder")
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        ref, preprocess = ModelRef(name, export=folder), export_preprocess(folder, so)
        described = {name: f"export folder `{folder}`"}
    else:
        tcfg = TeacherConfig.model_validate(
            {**cfg.teacher.model_dump(), "model": e.model, "checkpoint": e.checkpoint, "pretrained": e.pretrained})
        spec = describe_teacher(tcfg, so)
        ref, preprocess = ModelRef(e.model, teacher=tcfg.model_dump(mode="json")), spec.preprocess
        described = {e.model: f"timm `{e.model}`, weights `{spec.weights}`, {spec.img_size[0]}x{spec.img_size[1]} px"}
    output = e.output or cfg.under_root("eval", re.sub(r"[^A-Za-z0-9_.-]+", "_", ref.name))
    return Plan("model", [ref], manifest, indices, None, preprocess, None, output, described)


def pipeline_plan(cfg: Config, manifest: Manifest, indices: list[int]) -> Plan:
    so, e = cfg.storage.storage_options, cfg.evaluate
    student_url = e.student or cfg.export_url
    if not exists(join_url(student_url, "config.json"), so):
        raise PipelineError(f"no exported student at {student_url}: run the export stage, or set evaluate.student "
                            "(or evaluate.model to check one model on its own)")
    store = eval_store(cfg, manifest) if e.targets else None
    spec = describe_teacher(cfg.teacher, so)
    preprocess = Preprocess.from_dict(store.spec.teacher["preprocess"]) if store else spec.preprocess
    training = cfg.cache_shards_url
    trained_on = manifest.url == training or (
        exists(join_url(training, "manifest.json"), so) and Manifest.load(training, so).corpus_id == manifest.corpus_id)
    described = {"teacher": f"timm `{cfg.teacher.model}`, weights `{spec.weights}`, {spec.img_size[0]}x{spec.img_size[1]} px"}
    if store:
        described[TARGET] = f"denoised targets, store `{store.url}` ({store.spec.counts} views)"
    described["student"] = f"export folder `{student_url}`"
    models = [ModelRef("teacher", teacher=cfg.teacher.model_dump(mode="json")), ModelRef("student", export=student_url)]
    return Plan("pipeline", models, manifest, indices, store, preprocess, trained_on, cfg.eval_url, described)


# --- per-image measurements (a Ray task per group of images of one shard) -----------------

@dataclass
class MeasureJob:
    manifest: Manifest
    shard: int
    indices: list[int]
    pictured: list[int]  # indices whose features and pixels come back for the pictures
    store: TargetStore | None
    preprocess: Preprocess
    models: list[ModelRef]
    block: int | None
    storage_options: dict


def block_index(model: nn.Module, block: int, name: str) -> int:
    """The index `evaluate.residual_block` names in this model (-2 -> depth - 2)."""
    try:
        return range(len(model.blocks))[block]
    except IndexError:
        raise ConfigError(f"evaluate.residual_block={block}, but {name} has {len(model.blocks)} blocks") from None


def _batched_readout(model: nn.Module, x: torch.Tensor, block: int | None):
    parts = [readout(model, x[i:i + BATCH], block) for i in range(0, len(x), BATCH)]
    return [None if p[0] is None else torch.cat(p) for p in zip(*parts)]


def measure(job: MeasureJob) -> dict:
    """Norm maps (final layer, residual stream), class-token attention maps and fidelity to the
    targets of every image of the job, plus features and pixels of the pictured ones."""
    so = job.storage_options
    images = [decode_rgb(data) for data in read_images(job.manifest, job.indices, so)]
    if job.store is not None:
        boxes = job.store.read_boxes(np.array(job.indices), 0)
    else:
        boxes = [crop_box(img.width, img.height, job.preprocess.size, "center") for img in images]
    x = torch.stack([job.preprocess(img, box) for img, box in zip(images, boxes)])
    shown = [i for i, index in enumerate(job.indices) if index in job.pictured]
    h, w = job.preprocess.size
    out = {"indices": job.indices, "block": None, "final": {}, "residual": {}, "attention": {}, "cosine": {}, "mse": {}, "features": {},
           "pixels": [np.asarray(images[i].resize((w, h), box=tuple(map(float, boxes[i])))) for i in shown]}
    target = torch.from_numpy(job.store.read(np.array(job.indices), 0)) if job.store is not None else None
    if target is not None:
        out["final"][TARGET] = metrics.token_norms(target).numpy()
        out["features"][TARGET] = target[shown].numpy()
    for ref in job.models:
        loaded = ref.load(so)
        if job.block is not None:
            out["block"] = block_index(loaded.model, job.block, ref.name)
        # norms, outliers and attention are the model's own; pictures and fidelity compare in the teacher's space
        final, residual, attention = _batched_readout(loaded.model, x, job.block)
        with torch.inference_mode():
            comparable = final if loaded.projection is None else loaded.projection(final)
        out["final"][ref.name] = metrics.token_norms(final).numpy()
        out["features"][ref.name] = comparable[shown].numpy()
        if residual is not None:
            out["residual"][ref.name] = metrics.token_norms(residual).numpy()
        if attention is not None:
            out["attention"][ref.name] = attention.numpy()
        if target is not None:
            out["cosine"][ref.name] = metrics.cosine_per_image(comparable, target).numpy()
            out["mse"][ref.name] = metrics.mse_per_image(comparable, target).numpy()
    return out


@ray.remote(num_cpus=1, max_retries=2)
def _measure(job: MeasureJob) -> dict:
    return measure(job)


def measure_jobs(p: Plan, block: int | None, pictures: int, per_task: int, so) -> list[MeasureJob]:
    by_shard: dict[int, list[int]] = {}
    for index in p.indices:
        by_shard.setdefault(p.manifest.locate(index)[0], []).append(index)
    pictured = p.indices[:pictures]
    return [MeasureJob(p.manifest, shard, group[i:i + per_task], pictured, p.store, p.preprocess, p.models, block, so)
            for shard, group in by_shard.items() for i in range(0, len(group), per_task)]


def combine(parts: list[dict]) -> dict:
    """Task results -> one dict of arrays in index order."""
    parts = sorted(parts, key=lambda r: r["indices"][0])
    out = {"indices": [i for r in parts for i in r["indices"]], "pixels": [px for r in parts for px in r["pixels"]],
           "block": parts[0]["block"]}
    for key in ("final", "residual", "attention", "cosine", "mse", "features"):
        names = sorted(parts[0][key], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
        out[key] = {name: np.concatenate([r[key][name] for r in parts]) for name in names}
    return out


# --- linear probes (Ray tasks over groups of labeled images) ------------------------------

@dataclass
class ProbeJob:
    labeled: LabeledSet
    items: list[LabeledItem]
    preprocess: Preprocess
    models: list[ModelRef]
    weights: dict | None  # None: accumulate fit sums; else {model: {"seg": W, "depth": W}}: score
    examples: list[str]  # item ids whose predictions come back for the pictures
    storage_options: dict


def _resized(arr: np.ndarray, box, size: tuple[int, int]) -> np.ndarray:
    """A label or depth map cropped to `box` and resized to (h, w) with nearest neighbour."""
    h, w = size
    img = Image.fromarray(arr.astype(np.int32) if arr.dtype.kind in "iu" else arr.astype(np.float32))
    return np.array(img.resize((w, h), Image.Resampling.NEAREST, box=tuple(map(float, box))))


def probe(job: ProbeJob) -> dict[str, ProbeSums]:
    """Fit sums (no weights yet) or val scores of every model on the job's labeled images."""
    so, labeled, size = job.storage_options, job.labeled, job.preprocess.size
    xs, masks, depths = [], [], []
    for item in job.items:
        img, mask, depth = load_item(item, labeled, so)
        box = crop_box(img.width, img.height, size, "center")
        xs.append(job.preprocess(img, box))
        masks.append(None if mask is None else torch.from_numpy(_resized(mask, box, size).astype(np.int64)))
        depths.append(None if depth is None else torch.from_numpy(_resized(depth, box, size)))
    num_classes = len(labeled.classes or [])
    out = {}
    for ref in job.models:
        model = ref.load(so).model  # the probe reads the model's own features, whatever their width
        feats = _batched_readout(model, torch.stack(xs), None)[0]
        sums = ProbeSums()
        for item, f, mask, depth in zip(job.items, feats, masks, depths):
            if job.weights is None:
                sums.add_fit(f, mask, depth, tuple(model.patch_embed.patch_size), num_classes, labeled.ignore_index)
            else:
                sums.add_scores(f, mask, depth, job.weights[ref.name], num_classes, labeled.ignore_index,
                                item.id if item.id in job.examples else None)
        out[ref.name] = sums
    return out


@ray.remote(num_cpus=1, max_retries=2)
def _probe(job: ProbeJob) -> dict[str, ProbeSums]:
    return probe(job)


def run_probes(cfg: Config, p: Plan, output: str) -> dict | None:
    so, e = cfg.storage.storage_options, cfg.evaluate
    if not e.labeled:
        return None
    url = write_labeled_sample(cfg.under_root("sample_labeled"), so) if e.labeled == SAMPLE_LABELED else absolute(e.labeled)
    labeled = open_labeled(url, so)

    def jobs(split, weights, examples):
        items = [it for it in labeled.splits[split] if it.mask or it.depth]
        return [ProbeJob(labeled, items[i:i + e.images_per_task], p.preprocess, p.models, weights, examples, so)
                for i in range(0, len(items), e.images_per_task)]

    fits = _gather([_probe.remote(j) for j in jobs("train", None, [])], "probe fit")
    weights = {}
    for ref in p.models:
        total = _merge(f[ref.name] for f in fits)
        weights[ref.name] = {k: s.solve(e.probe_ridge) for k, s in (("seg", total.seg_fit), ("depth", total.depth_fit)) if s}
    k = e.pca_images
    examples = [it.id for it in labeled.with_masks("val")[:k]] + [it.id for it in labeled.with_depth("val")[:k]]
    scored = _gather([_probe.remote(j) for j in jobs("val", weights, examples)], "probe val")
    results = {ref.name: _merge(s[ref.name] for s in scored) for ref in p.models}

    report = {"labeled": url, "protocol": "ridge regression on final-layer patch features (patch-level targets), "
              "predictions upsampled bilinearly to the model's input pixels", "ridge": e.probe_ridge, "models": {}}
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
    report["figures"] = _probe_figures(labeled, p, results, examples, output, so)
    return report


def _merge(sums) -> ProbeSums:
    total = ProbeSums()
    for s in sums:
        total = total.merge(s)
    return total


def _probe_figures(labeled: LabeledSet, p: Plan, results: dict[str, ProbeSums], examples: list[str], output: str,
                   so) -> list[str]:
    """Val images, ground truth and every model's probe prediction; returns the files written."""
    items, written = {it.id: it for it in labeled.splits["val"]}, []
    for kind, ext in (("seg", "probe_seg.png"), ("depth", "probe_depth.png")):
        ids = [i for i in examples if all(kind in results[m].examples.get(i, {}) for m in results)]
        if not ids:
            continue
        pixels, truth = [], []
        for i in ids:
            img, mask, depth = load_item(items[i], labeled, so)
            box = crop_box(img.width, img.height, p.preprocess.size, "center")
            h, w = p.preprocess.size
            pixels.append(np.asarray(img.resize((w, h), box=tuple(map(float, box)))))
            truth.append(_resized(mask if kind == "seg" else depth, box, p.preprocess.size))
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


# --- the run ------------------------------------------------------------------------------

def _gather(refs: list, desc: str) -> list:
    bar, pending, results = progress(len(refs), desc, "task"), list(refs), {}
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[done[0]] = ray.get(done[0])
        bar.update(1)
    bar.close()
    return [results[r] for r in refs]


def run(cfg: Config) -> dict:
    """Evaluate and write the report. With `students`, every student gets its own report
    folder (eval/<name>); the first student's report is returned."""
    if cfg.evaluate.model:
        return evaluate_one(cfg)
    return [evaluate_one(c) for c in expand_students(cfg)][0]


def evaluate_one(cfg: Config) -> dict:
    so, e = cfg.storage.storage_options, cfg.evaluate
    p = plan(cfg)
    init_ray()
    jobs = measure_jobs(p, e.residual_block, e.pca_images, e.images_per_task, so)
    say(f"evaluate: {', '.join(p.described)} on {len(p.indices)} images of {p.manifest.url} ({len(jobs)} tasks)")
    data = combine(_gather([_measure.remote(j) for j in jobs], "evaluate"))
    report = summarize(cfg, p, data)
    report["probes"] = run_probes(cfg, p, p.output)
    draw(cfg, p, data, report)
    write_bytes_atomic(join_url(p.output, "report.json"), json.dumps(report, indent=1).encode(), so)
    write_bytes_atomic(join_url(p.output, "report.md"), markdown(report).encode(), so)
    if report["images"]["note"]:
        say(f"evaluate: note: {report['images']['note']}")
    say(f"evaluate: report -> {join_url(p.output, 'report.md')}\n" + table(report))
    return report


def _masks(norms: dict[str, np.ndarray], e) -> dict[str, torch.Tensor]:
    return {name: metrics.outlier_mask(torch.from_numpy(n), e.outlier_k, e.min_mad) for name, n in norms.items()}


def summarize(cfg: Config, p: Plan, data: dict) -> dict:
    e = cfg.evaluate
    final, residual = data["final"], data["residual"]
    final_masks, residual_masks = _masks(final, e), _masks(residual, e)
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
    final_masks, residual_masks = _masks(final, e), _masks(residual, e)
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


# --- the report ---------------------------------------------------------------------------

def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> str:
    """Final-layer norms and outliers per model (printed by the demo)."""
    rows = ["| model | mean norm | max norm | outliers / image | abs. outliers / image | cosine to target |",
            "|---|---|---|---|---|---|"]
    for name, s in report["norms"].items():
        cos = 1.0 if name == TARGET else report.get("cosine_to_target", {}).get(name)
        rows.append(f"| {name} | {s['norm_mean']:.2f} | {s['norm_max']:.2f} | {s['outliers_per_image']:.2f} | "
                    f"{_f(s.get('abs_outliers_per_image'))} | {_f(cos, 4)} |")
    return "\n".join(rows)


def _norm_table(norms: dict) -> str:
    rows = ["| model | mean | median | p99 | max | outliers / image | max / image | outlier fraction | abs. outliers / image |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, s in norms.items():
        rows.append(f"| {name} | {s['norm_mean']:.2f} | {s['norm_median']:.2f} | {s['norm_p99']:.2f} | {s['norm_max']:.2f} | "
                    f"{s['outliers_per_image']:.2f} | {s['outliers_per_image_max']:.0f} | {s['outlier_fraction']:.4f} | "
                    f"{_f(s.get('abs_outliers_per_image'))} |")
    return "\n".join(rows)


def markdown(report: dict) -> str:
    img, rule, figs = report["images"], report["outlier_rule"], report.get("figures", {})
    lines = ["# Evaluation", ""]
    lines += [f"- **{name}**: {what}" for name, what in report["models"].items()]
    lines += [f"- **images**: {img['count']} from `{img['shards']}` (corpus {img['corpus_id']}, global indices "
              f"{img['indices'][0]}..{img['indices'][-1]})"]
    if img["note"]:
        lines += [f"- **note**: {img['note']}"]
    lines += [f"- **outliers**: {rule['relative']}; absolute thresholds: final layer {rule['abs_threshold_final']}, "
              f"residual stream {rule['abs_threshold_residual']}", ""]
    lines += ["## Artifact tokens: final (normed) layer", "", _norm_table(report["norms"]), ""]
    if report["residual"]["norms"]:
        lines += [f"## Artifact tokens: residual stream after block {report['residual']['block']} (before the final norm)", "",
                  _norm_table(report["residual"]["norms"]), ""]
    if report["fidelity"]:
        lines += ["## Fidelity to the denoised targets", "", "| model | cosine | MSE |", "|---|---|---|"]
        lines += [f"| {n} | {f['cosine']:.4f} | {f['mse']:.4f} |" for n, f in report["fidelity"].items()] + [""]
    if report["attention"]:
        lines += ["## Class-token attention on outliers (last block)", "",
                  "Share of the class token's attention over patches that falls on outlier tokens; the outlier fraction is "
                  "what uniform attention would give.", "",
                  "| model | on final-layer outliers | final outlier fraction | on residual outliers | residual outlier fraction |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {_f(a['on_final_outliers'], 3)} | {_f(a['final_outlier_fraction'], 3)} | "
                  f"{_f(a.get('on_residual_outliers'), 3)} | {_f(a.get('residual_outlier_fraction'), 3)} |"
                  for n, a in report["attention"].items()] + [""]
    probes = report.get("probes")
    if probes:
        lines += ["## Dense linear probes", "", f"Labeled set `{probes['labeled']}` ({probes['splits']}); {probes['protocol']}; "
                  f"ridge {probes['ridge']:g}.", "",
                  "| model | seg. mIoU | seg. pixel acc. | depth RMSE (m) | depth AbsRel | depth δ<1.25 |", "|---|---|---|---|---|---|"]
        for n, r in probes["models"].items():
            s, d = r.get("segmentation", {}), r.get("depth", {})
            lines.append(f"| {n} | {_f(s.get('miou'), 3)} | {_f(s.get('pixel_accuracy'), 3)} | {_f(d.get('rmse'), 3)} | "
                         f"{_f(d.get('abs_rel'), 3)} | {_f(d.get('delta_1.25'), 3)} |")
        lines.append("")
        lines += [f"![{name}]({name})" for name in probes["figures"]] + [""]
    lines += ["## Pictures", ""]
    for name, caption in figs.items():
        lines += [f"**{caption}**", "", f"![{name}]({name})", ""]
    return "\n".join(lines)
