"""What the evaluate stage measures: the models, images, targets and report folder of a run.

Two modes: pipeline (the teacher, its denoised targets and the exported student on the images
of `evaluate.shards`) and one model (`evaluate.model`: a timm model, weights file or export
folder on its own). Everything here is decided on the driver before any task starts, and a
config that cannot be evaluated is refused with what to change.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import Config, TeacherConfig
from pipeline.data.images import INTERPOLATIONS, Preprocess
from pipeline.data.manifest import Manifest
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluation.tasks import TARGET, MeasureJob, ModelRef, chunks
from pipeline.models.vit import describe_teacher
from pipeline.storage import absolute, exists, has_scheme, join_url, read_json
from pipeline.targets.store import TargetStore, find_store, store_spec


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
    so = cfg.storage.storage_options
    spec = store_spec(cfg.tta, cfg.cache, describe_teacher(cfg.teacher, so), manifest)
    try:
        return find_store(spec, cfg.cache_root, manifest, so, cfg.evaluate.store)
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


def measure_jobs(p: Plan, block: int | None, pictures: int, per_task: int, storage_options) -> list[MeasureJob]:
    """The per-image measurements of `p` as jobs of at most `per_task` images of one shard each;
    the first `pictures` images come back with the pixels the figures need."""
    by_shard: dict[int, list[int]] = {}
    for index in p.indices:
        by_shard.setdefault(p.manifest.locate(index)[0], []).append(index)
    pictured = p.indices[:pictures]
    return [MeasureJob(p.manifest, shard, group, pictured, p.store, p.preprocess, p.models, block, storage_options)
            for shard, images in by_shard.items() for group in chunks(images, per_task)]
