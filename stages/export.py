"""Export stage: a student checkpoint -> timm hub folder, checked by reloading it with timm."""
from __future__ import annotations

import tempfile

from pipeline.config import Config, expand_students
from pipeline.errors import ConfigError, PipelineError
from pipeline.models.export import load_exported_features, max_output_difference, upload, write_folder
from pipeline.models.reference_weights import export_phreg_dinov2
from pipeline.models.vit import PatchFeatures
from pipeline.storage import join_url
from pipeline.training import checkpoint
from stages.runtime import say
from pipeline.tracking import log_export


def run(cfg: Config) -> list[str]:
    """Export every student of the config (see `students`); returns the export folders."""
    return [export_one(c) for c in expand_students(cfg)]


def export_one(cfg: Config) -> str:
    so = cfg.storage.storage_options
    run_url, epoch = join_url(cfg.students_url, cfg.student.name), cfg.export.epoch
    ckpt = cfg.export.checkpoint or (checkpoint.of_epoch(run_url, epoch, so) if epoch else checkpoint.latest(run_url, so))
    student, projection, state = checkpoint.load_student(ckpt, so)
    provenance = {"checkpoint": ckpt, "step": state["step"], "store": state["store"], "teacher": state["teacher"],
                  "student": state["student"], "method": "PH-Reg (self-distilled registers)"}
    with tempfile.TemporaryDirectory() as folder:
        write_folder(student, folder, provenance, projection)
        rebuilt = load_exported_features(folder)
        diff = max_output_difference(PatchFeatures(student, projection), rebuilt)
        if diff != 0.0:
            raise PipelineError(f"the exported model's outputs differ from the checkpoint's by {diff}")
        upload(folder, cfg.export_url, so)
        log_export(cfg, run_url, folder)
    say(f"export: {ckpt} (step {state['step']}) -> {cfg.export_url}\n"
        f"  load with timm.create_model('local-dir:<folder>', pretrained=True); outputs verified identical"
        + ("\n  projection.safetensors maps its features to the teacher's width" if projection is not None else ""))
    return cfg.export_url


def import_dinov2(cfg: Config) -> str:
    """A released PH-Reg DINOv2 student (`export.checkpoint`: a Hugging Face Dinov2Model state
    dict plus `registers`, path or URL) -> a timm hub folder of architecture `teacher.model` at
    `export.output`, checked by reloading it; `evaluate --evaluate.model <folder>` measures it."""
    so = cfg.storage.storage_options
    if not cfg.export.checkpoint:
        raise ConfigError("import-dinov2 needs --export.checkpoint: the released student's .pth file (a path or URL)")
    with tempfile.TemporaryDirectory() as folder:
        student = export_phreg_dinov2(cfg.export.checkpoint, folder, cfg.teacher.model, so, **cfg.teacher.model_kwargs)
        diff = max_output_difference(PatchFeatures(student, None), load_exported_features(folder))
        if diff != 0.0:
            raise PipelineError(f"the imported model's outputs differ after reloading by {diff}")
        upload(folder, cfg.export_url, so)
    say(f"import-dinov2: {cfg.export.checkpoint} ({cfg.teacher.model}, {student.num_reg_tokens} registers) -> {cfg.export_url}")
    return cfg.export_url
