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

import ray

from pipeline.config import Config, TeacherConfig, expand_students
from pipeline.data.manifest import Manifest
from pipeline.errors import PipelineError
from pipeline.evaluation import zeroshot
from pipeline.evaluation.baselines import TEST_TIME_REGISTERS, LocateJob, describe_baseline, locate_job, locate_request
from pipeline.evaluation.baselines import registers_baseline
from pipeline.evaluation.labeled import LabeledSet, labeled_url, open_labeled
from pipeline.evaluation.plan import Plan, measure_jobs, plan
from pipeline.evaluation.probes import ProbeSums
from pipeline.evaluation.report import markdown, table
from pipeline.evaluation.summary import draw, probe_report, summarize, zeroshot_report
from pipeline.evaluation.tasks import MeasureJob, ProbeJob, TrainedProbeJob, ZeroShotJob, chunks, combine, measure, merge_sums
from pipeline.evaluation.tasks import probe, trained_probe, zeroshot_segment
from pipeline.evaluation.trained_probes import TrainedProbeSettings
from pipeline.models.vit import describe_teacher
from pipeline.storage import exists, join_url, write_bytes_atomic
from pipeline.tracking import log_evaluation
from stages.runtime import cluster_gpus, init_ray, progress, say

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
    # the register neurons are located on the training images when there are any (PH-Reg learned from them too)
    training = cfg.cache_shards_url
    manifest = Manifest.load(training, so) if exists(join_url(training, "manifest.json"), so) else p.manifest
    (location,) = run_tasks(_locate, [locate_request(base, manifest, p.preprocess, e.ttr, so)], "locate")
    p.models.append(registers_baseline(base, location))
    p.baselines[TEST_TIME_REGISTERS] = location
    p.described[TEST_TIME_REGISTERS] = describe_baseline(base, location, manifest.url)


# --- per-image measurements (a Ray task per group of images of one shard) -----------------

@ray.remote(num_cpus=1, max_retries=2)
def _measure(job: MeasureJob) -> dict:
    return measure(job)


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
    url = labeled_url(e.labeled, cfg.under_root("sample_labeled"), so)
    labeled = open_labeled(url, so)
    k = e.pca_images
    examples = [it.id for it in labeled.with_masks("val")[:k]] + [it.id for it in labeled.with_depth("val")[:k]]
    results = (trained_probes if e.probes.protocol == "trained" else ridge_probes)(e, p, labeled, examples, so)
    return probe_report(e, p.preprocess, labeled, url, results, examples, output, so)


def ridge_probes(e, p: Plan, labeled: LabeledSet, examples: list[str], so) -> dict[str, ProbeSums]:
    """Fit sums over the train split, closed-form weights, scores over the val split."""
    def jobs(split, weights, examples):
        items = [it for it in labeled.splits[split] if it.mask or it.depth]
        return [ProbeJob(labeled, group, p.preprocess, p.models, weights, examples, so)
                for group in chunks(items, e.images_per_task)]

    fits = run_tasks(_probe, jobs("train", None, []), "probe fit")
    weights = {}
    for ref in p.models:
        total = merge_sums(f[ref.name] for f in fits)
        weights[ref.name] = {k: s.solve(e.probes.ridge) for k, s in (("seg", total.seg_fit), ("depth", total.depth_fit)) if s}
    scored = run_tasks(_probe, jobs("val", weights, examples), "probe val")
    return {ref.name: merge_sums(s[ref.name] for s in scored) for ref in p.models}


def trained_probes(e, p: Plan, labeled: LabeledSet, examples: list[str], so) -> dict[str, ProbeSums]:
    """One Ray task per model and probe kind the labeled set has labels for."""
    settings = TrainedProbeSettings.from_config(e, seed=0)
    kinds = [kind for kind, has in (("seg", labeled.with_masks), ("depth", labeled.with_depth)) if has("train") and has("val")]
    jobs = [TrainedProbeJob(labeled, kind, p.preprocess, ref, settings, examples, so) for ref in p.models for kind in kinds]
    parts = run_tasks(_trained_probe, jobs, "trained probes")
    return {ref.name: merge_sums(part for job, part in zip(jobs, parts) if job.model.name == ref.name) for ref in p.models}


# --- zero-shot segmentation (Ray tasks over groups of labeled images) ----------------------

@ray.remote(num_cpus=1, max_retries=2)
def _zeroshot(job: ZeroShotJob) -> dict:
    return zeroshot_segment(job)


def run_zeroshot(cfg: Config, p: Plan, output: str) -> dict | None:
    so, e, z = cfg.storage.storage_options, cfg.evaluate, cfg.evaluate.zeroshot
    if not z.labeled:
        return None
    url = labeled_url(z.labeled, cfg.under_root("sample_labeled"), so)
    labeled = open_labeled(url, so, splits=(z.split,))
    items = labeled.with_masks(z.split)
    if not items:
        raise PipelineError(f"labeled set {url}: no masks in {z.split} for zero-shot segmentation")
    # Checked here for the first model (the teacher, or evaluate.model when it is a timm name);
    # an export folder's width is known once a task loads it, and every model's is checked there.
    first = p.models[0]
    dim = describe_teacher(TeacherConfig.model_validate(first.teacher), so).dim if first.teacher else None
    queries, class_index = zeroshot.class_queries(z, labeled.classes, dim, so, saved=cfg.under_root("text_queries"))
    params = {k: getattr(z, k) for k in ("short_side", "crop", "stride", "logit_scale", "prob_threshold")}
    examples = [it.id for it in items[:e.pca_images]]
    jobs = [ZeroShotJob(labeled, group, p.preprocess, p.models, queries, class_index, params, examples, so)
            for group in chunks(items, e.images_per_task)]
    parts = run_tasks(_zeroshot, jobs, "zero-shot")
    return zeroshot_report(z, labeled, url, items, p, parts, examples, output, so)


# --- the run ------------------------------------------------------------------------------

def run_tasks(task, jobs: list, desc: str) -> list:
    """The results of `task` on each job, in order, with a progress bar. Each task takes a GPU
    where the cluster has GPUs (the tasks then run one per GPU)."""
    task = task.options(num_gpus=1 if cluster_gpus() >= 1 else 0)
    refs = [task.remote(job) for job in jobs]
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
    data = combine(run_tasks(_measure, jobs, "evaluate"))
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
