"""Export stage: a student checkpoint -> timm hub folder, checked by reloading it with timm."""
from __future__ import annotations

import tempfile

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.export import load_exported, max_output_difference, upload, write_folder
from pipeline.storage import join_url
from stages.runtime import say


def run(cfg: Config) -> str:
    so = cfg.storage.storage_options
    ckpt = cfg.export.checkpoint or checkpoint.latest(join_url(cfg.students_url, cfg.student.name), so)
    student, state = checkpoint.load_student(ckpt, so)
    provenance = {"checkpoint": ckpt, "step": state["step"], "store": state["store"], "teacher": state["teacher"],
                  "student": state["student"], "method": "PH-Reg (self-distilled registers)"}
    with tempfile.TemporaryDirectory() as folder:
        write_folder(student, folder, provenance)
        rebuilt = load_exported(folder)
        diff = max_output_difference(student, rebuilt)
        if diff != 0.0:
            raise PipelineError(f"the exported model's outputs differ from the checkpoint's by {diff}")
        upload(folder, cfg.export_url, so)
    say(f"export: {ckpt} (step {state['step']}) -> {cfg.export_url}\n"
        f"  load with timm.create_model('local-dir:<folder>', pretrained=True); outputs verified identical")
    return cfg.export_url
