"""`phreg <command> [--config FILE ...] [--section.option VALUE ...]`

Every option of a command's config sections is a flag (`phreg distill --help` lists them
with their meaning and default). Values are YAML: `--student.unlock '[pos_embed]'`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

import yaml
from pydantic import BaseModel

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError

@dataclass(frozen=True)
class Command:
    help: str
    sections: list[str]  # the config sections whose options are its flags
    entry: str  # "module:function" that runs it on the loaded config (imported only then)


EVERYTHING = list(Config.model_fields)
COMMANDS = {
    "shard": Command("Images -> WebDataset shards + manifest.", ["storage", "shard"], "stages.shard:run"),
    "teacher-cache": Command("Shards -> denoised teacher targets (Zarr v3 store).",
                             ["storage", "cluster", "shard", "teacher", "tta", "cache", "tracking"], "stages.teacher_cache:run"),
    "distill": Command("Target store -> student checkpoints (Ray Train).",
                       ["storage", "cluster", "shard", "teacher", "tta", "cache", "student", "distill", "tracking", "students"],
                       "stages.distill:run"),
    "export": Command("Student checkpoint -> timm hub folder.",
                      ["storage", "student", "distill", "export", "tracking", "students"], "stages.export:run"),
    "evaluate": Command("Artifact tokens, target fidelity, linear probes and pictures: teacher vs targets vs student, or one model.",
                        ["storage", "shard", "teacher", "tta", "cache", "student", "export", "evaluate", "tracking", "students"],
                        "stages.evaluate:run"),
    "import-dinov2": Command("A released PH-Reg DINOv2 student (.pth: Hugging Face Dinov2Model + registers, "
                             "--export.checkpoint) -> timm hub folder of architecture --teacher.model at --export.output.",
                             ["storage", "teacher", "student", "export"], "stages.export:import_dinov2"),
    "verify": Command("Check a target store against its manifest; exit non-zero on any problem.",
                      ["storage", "shard", "teacher", "tta", "cache", "distill"], "stages.caches:verify"),
    "list": Command("List the target stores under the cache root with their settings and completeness.",
                    ["storage", "cache"], "stages.caches:list_caches"),
    "demo": Command("shard -> teacher-cache -> distill -> export -> evaluate.", EVERYTHING, "stages.demo:run"),
}


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _describe(field) -> str:
    default = field.default_factory() if field.default_factory else field.default
    if isinstance(default, BaseModel):
        return f"{field.description or ''} [a mapping, merged into the section's values]"
    return f"{field.description or ''} [default: {default!r}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phreg", description="Post-hoc registers for pretrained ViTs, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="YAML config; repeat to layer files (later ones win).")
        for section in command.sections:
            field = Config.model_fields[section]
            model = field.annotation
            if not (isinstance(model, type) and issubclass(model, BaseModel)):  # a top-level value, e.g. students
                p.add_argument(f"--{section}", dest=section, type=_yaml_value, default=argparse.SUPPRESS, metavar="V",
                               help=_describe(field))
                continue
            _add_section(p.add_argument_group(section), section, model)
    return parser


def _add_section(group, prefix: str, model: type[BaseModel]) -> None:
    """A flag per option; a nested section (e.g. evaluate.zeroshot) gets one for the whole
    mapping (merged into the section) and one per option of its own."""
    for field_name, field in model.model_fields.items():
        name = f"{prefix}.{field_name}"
        group.add_argument(f"--{name}", dest=name, type=_yaml_value, default=argparse.SUPPRESS, metavar="V",
                           help=_describe(field))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            _add_section(group, name, field.annotation)


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    command, paths = args.pop("command"), args.pop("config")
    try:
        cfg = load_config(paths, args)
        run(command, cfg)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a user-facing tool ends with a sentence, not a stack trace
        if os.environ.get("PHREG_DEBUG"):
            raise
        cause = root_cause(e)
        if isinstance(cause, PipelineError):
            print(f"phreg {command}: error: {cause}", file=sys.stderr)
            sys.exit(2)
        kind = "storage error" if is_storage_error(cause) else "failed"
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        print(f"phreg {command}: {kind}: {type(cause).__name__}: {message}\n"
              f"  (set PHREG_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)


def root_cause(e: BaseException) -> BaseException:
    """The exception a Ray task or a Ray Train worker raised, through Ray's wrappers."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
            continue
        errors = getattr(e, "worker_failures", None)  # Ray Train: {rank: exception}
        if isinstance(errors, dict) and errors:
            e = next(iter(errors.values()))
            continue
        break
    return e


def is_storage_error(e: BaseException) -> bool:
    module = type(e).__module__ or ""
    return isinstance(e, OSError) or module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "fsspec"))


def run(command: str, cfg: Config):
    module, function = COMMANDS[command].entry.split(":")
    return getattr(importlib.import_module(module), function)(cfg)
