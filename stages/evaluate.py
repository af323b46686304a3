"""Evaluate stage: artifact tokens, target fidelity, dense linear probes, zero-shot
segmentation, pictures, one report.

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
outlier_map.png, attention.png, probe_seg.png, probe_depth.png, zeroshot_seg.png.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from pipeline.config import Config, TeacherConfig, expand_students
from pipeline.data.images import INTERPOLATIONS, Preprocess, crop_box
from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluation import figures, metrics, zeroshot
from pipeline.evaluation.baselines import TEST_TIME_REGISTERS, LocateJob, locate_job, registers_baseline
from pipeline.evaluation.labeled import SAMPLE as SAMPLE_LABELED
from pipeline.evaluation.labeled import LabeledSet, load_item, open_labeled, write_labeled_sample
from pipeline.evaluation.probes import ProbeSums, iou_per_class, mean_iou
from pipeline.evaluation.report import markdown, table
from pipeline.evaluation.tasks import TARGET, MeasureJob, ModelRef, ProbeJob, TrainedProbeJob, combine, measure, merge_sums
from pipeline.evaluation.tasks import ZeroShotJob, probe, resized, trained_probe, zeroshot_segment
from pipeline.evaluation.trained_probes import TrainedProbeSettings
from pipeline.models.vit import describe_teacher
from pipeline.storage import absolute, exists, has_scheme, join_url, read_json, write_bytes_atomic
from pipeline.targets.store import TargetStore, find_store
from stages.runtime import cluster_gpus, init_ray, progress, say
from stages.tracking import log_evaluation

# --- what is evaluated -------------------------------------------------------------------

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
    baselines: dict = field(default_factory=dict)  # baseline name -> what was located for it, for the report


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
    student_url = e.student or (cfg.epoch_export_url(e.epoch) if e.epoch else cfg.export_url)
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


# --- baselines: training-free alternatives, measured like every other model ----------------

@ray.remote(num_cpus=1, max_retries=2)
def _locate(job: LocateJob) -> dict:
    return locate_job(job)


def add_baselines(cfg: Config, p: Plan) -> None:
    """Add evaluate.baselines to the plan's models, built from its first model (the teacher, or
    evaluate.model), after locating what they need in one Ray task."""
    so, e = cfg.storage.storage_options, cfg.evaluate
    if TEST_TIME_REGISTERS not in e.baselines:
        return
    base = p.models[0]
    if base.teacher is None:
        raise ConfigError("evaluate.baselines are built from a timm model (the teacher, or evaluate.model given as a "
                          "timm name), not from an export folder")
    # the register neurons are located on the training images when there are any (PH-Reg learned from them too)
    training = cfg.cache_shards_url
    manifest = Manifest.load(training, so) if exists(join_url(training, "manifest.json"), so) else p.manifest
    job = LocateJob(manifest, evaluation_indices(manifest, e.ttr_images), p.preprocess, base, e.ttr_detect_block,
                    e.ttr_threshold, e.ttr_max_block, e.ttr_top_k, e.ttr_max_top_k, so)
    location = ray.get(_locate.options(num_gpus=task_gpus()).remote(job))
    neurons = ", ".join(f"{n['layer']}.{n['index']}" for n in location["neurons"])
    p.models.append(registers_baseline(base, location))
    p.baselines[TEST_TIME_REGISTERS] = location
    p.described[TEST_TIME_REGISTERS] = (
        f"test-time registers on `{base.name}` (Jiang et al. 2025): one extra token takes the activations of "
        f"{len(location['neurons'])} register neurons (block.neuron: {neurons}), located on {location['images']} images "
        f"of `{manifest.url}`")


# --- per-image measurements (a Ray task per group of images of one shard) -----------------

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


# --- linear probes (Ray tasks over groups of labeled images, or per model and kind) --------

@ray.remote(num_cpus=1, max_retries=2)
def _probe(job: ProbeJob) -> dict[str, ProbeSums]:
    return probe(job)


@ray.remote(num_cpus=1, max_retries=2)
def _trained_probe(job: TrainedProbeJob) -> ProbeSums:
    return trained_probe(job)


def run_probes(cfg: Config, p: Plan, output: str) -> dict | None:
    so, e = cfg.storage.storage_options, cfg.evaluate
    if not e.labeled:
        return None
    url = write_labeled_sample(cfg.under_root("sample_labeled"), so) if e.labeled == SAMPLE_LABELED else absolute(e.labeled)
    labeled = open_labeled(url, so)
    k = e.pca_images
    examples = [it.id for it in labeled.with_masks("val")[:k]] + [it.id for it in labeled.with_depth("val")[:k]]
    if e.probe_protocol == "trained":
        results = trained_probes(e, p, labeled, examples, so)
        report = {"labeled": url, "probe_protocol": "trained", "protocol": trained_protocol(e, p), "models": {}}
    else:
        results = ridge_probes(e, p, labeled, examples, so)
        report = {"labeled": url, "probe_protocol": "ridge", "protocol": "ridge regression on final-layer patch features "
                  "(patch-level targets), predictions upsampled bilinearly to the model's input pixels", "ridge": e.probe_ridge,
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
    report["figures"] = _probe_figures(labeled, p, results, examples, output, so)
    return report


def ridge_probes(e, p: Plan, labeled: LabeledSet, examples: list[str], so) -> dict[str, ProbeSums]:
    """Fit sums over the train split, closed-form weights, scores over the val split."""
    def jobs(split, weights, examples):
        items = [it for it in labeled.splits[split] if it.mask or it.depth]
        return [ProbeJob(labeled, items[i:i + e.images_per_task], p.preprocess, p.models, weights, examples, so)
                for i in range(0, len(items), e.images_per_task)]

    task = _probe.options(num_gpus=task_gpus())
    fits = _gather([task.remote(j) for j in jobs("train", None, [])], "probe fit")
    weights = {}
    for ref in p.models:
        total = merge_sums(f[ref.name] for f in fits)
        weights[ref.name] = {k: s.solve(e.probe_ridge) for k, s in (("seg", total.seg_fit), ("depth", total.depth_fit)) if s}
    scored = _gather([task.remote(j) for j in jobs("val", weights, examples)], "probe val")
    return {ref.name: merge_sums(s[ref.name] for s in scored) for ref in p.models}


def trained_probes(e, p: Plan, labeled: LabeledSet, examples: list[str], so) -> dict[str, ProbeSums]:
    """One Ray task per model and probe kind the labeled set has labels for."""
    settings = TrainedProbeSettings.from_config(e, seed=0)
    kinds = [kind for kind, has in (("seg", labeled.with_masks), ("depth", labeled.with_depth)) if has("train") and has("val")]
    jobs = [TrainedProbeJob(labeled, kind, p.preprocess, ref, settings, examples, so) for ref in p.models for kind in kinds]
    task = _trained_probe.options(num_gpus=task_gpus())
    parts = _gather([task.remote(j) for j in jobs], "trained probes")
    return {ref.name: merge_sums(part for job, part in zip(jobs, parts) if job.model.name == ref.name) for ref in p.models}


def trained_protocol(e, p: Plan) -> str:
    h, w = p.preprocess.size
    side = {"window": min(h, w), None: None}.get(e.probe_short_side, e.probe_short_side)
    seg_scale = f"short side {side}" if side else "each val image's own resolution"
    return (f"trained linear heads on frozen final-layer features, DINOv2 / PH-Reg protocol: "
            f"{e.probe_iterations} AdamW steps of {e.probe_batch_size} augmented {h}x{w} windows; "
            f"segmentation: BatchNorm + 1x1 conv, cross-entropy, lr {e.probe_lr:g} poly 0.9, sliding windows "
            f"(stride {e.probe_stride:.2f} of the window) at {seg_scale}, logits resized back to the image; "
            f"depth: 1x1 conv, {e.probe_depth_bins} bins over {e.probe_min_depth:g}-{e.probe_max_depth:g} m "
            f"(patch + class tokens, relu + 0.1 normalised, SigLog lambda {e.probe_siglog_lambda:g} + "
            f"{e.probe_gradient_weight:g} x gradient loss), lr {e.probe_depth_lr:g} cosine with "
            f"{e.probe_depth_warmup:.0%} warm-up, weight decay {e.probe_depth_weight_decay:g}, sliding windows at each val "
            f"image's own resolution{', Eigen crop' if e.probe_eigen_crop else ''}")


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
            truth.append(resized(mask if kind == "seg" else depth, box, p.preprocess.size))
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


# --- zero-shot segmentation (Ray tasks over groups of labeled images) ----------------------

@ray.remote(num_cpus=1, max_retries=2)
def _zeroshot(job: ZeroShotJob) -> dict:
    return zeroshot_segment(job)


def class_queries(z, classes: list[str], dim: int | None, so) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) unit class embeddings and the class of each: from evaluate.zeroshot.embeddings,
    else from the text tower (synonyms x CLIP's 80 templates). Checked against the features'
    width `dim` here when it is known, else in the tasks."""
    if z.embeddings:
        return zeroshot.load_class_embeddings(absolute(z.embeddings), len(classes), dim, so)
    names, index = zeroshot.parse_class_names(classes)
    queries = zeroshot.query_embeddings(zeroshot.open_clip_text_encoder(z.text_model, z.text_pretrained, z.text_seed), names)
    if dim is not None and queries.shape[1] != dim:
        raise ConfigError(f"the text tower {z.text_model} embeds in {queries.shape[1]} dimensions, the models' features have "
                          f"{dim}: choose the CLIP text tower of the image tower, or evaluate.zeroshot.embeddings")
    return queries, torch.tensor(index)


def run_zeroshot(cfg: Config, p: Plan, output: str) -> dict | None:
    so, e, z = cfg.storage.storage_options, cfg.evaluate, cfg.evaluate.zeroshot
    if not z.labeled:
        return None
    url = write_labeled_sample(cfg.under_root("sample_labeled"), so) if z.labeled == SAMPLE_LABELED else absolute(z.labeled)
    labeled = open_labeled(url, so, splits=(z.split,))
    items = labeled.with_masks(z.split)
    if not items:
        raise PipelineError(f"labeled set {url}: no masks in {z.split} for zero-shot segmentation")
    # Checked here for the first model (the teacher, or evaluate.model when it is a timm name);
    # an export folder's width is known once a task loads it, and every model's is checked there.
    first = p.models[0]
    dim = describe_teacher(TeacherConfig.model_validate(first.teacher), so).dim if first.teacher else None
    queries, class_index = class_queries(z, labeled.classes, dim, so)
    params = {k: getattr(z, k) for k in ("short_side", "crop", "stride", "logit_scale", "prob_threshold")}
    examples = [it.id for it in items[:e.pca_images]]
    jobs = [ZeroShotJob(labeled, items[i:i + e.images_per_task], p.preprocess, p.models, queries, class_index, params,
                        examples, so) for i in range(0, len(items), e.images_per_task)]
    parts = _gather([_zeroshot.options(num_gpus=task_gpus()).remote(j) for j in jobs], "zero-shot")
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


# --- the run ------------------------------------------------------------------------------

def task_gpus() -> int:
    """A GPU per task where the cluster has GPUs (the tasks then run one per GPU)."""
    return 1 if cluster_gpus() >= 1 else 0


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
    add_baselines(cfg, p)
    jobs = measure_jobs(p, e.residual_block, e.pca_images, e.images_per_task, so)
    say(f"evaluate: {', '.join(p.described)} on {len(p.indices)} images of {p.manifest.url} ({len(jobs)} tasks)")
    task = _measure.options(num_gpus=task_gpus())
    data = combine(_gather([task.remote(j) for j in jobs], "evaluate"))
    report = summarize(cfg, p, data)
    report["baselines"] = p.baselines
    report["probes"] = run_probes(cfg, p, p.output)
    report["zeroshot"] = run_zeroshot(cfg, p, p.output)
    draw(cfg, p, data, report)
    write_bytes_atomic(join_url(p.output, "report.json"), json.dumps(report, indent=1).encode(), so)
    write_bytes_atomic(join_url(p.output, "report.md"), markdown(report).encode(), so)
    log_evaluation(cfg, report, p.output, next((m.export for m in p.models if m.name == "student"), None))
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
