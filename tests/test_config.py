"""Configs: YAML layering, dotted overrides, validation, the CLI's help."""
import subprocess
import sys

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from stages.cli import build_parser


def test_layering_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("student: {name: a, registers: 8}\ndistill: {lr: 1.0e-3}\n")
    top = tmp_path / "top.yaml"
    top.write_text("student: {registers: 4}\n")
    cfg = load_config([base, top], {"distill.epochs": 3})
    assert (cfg.student.name, cfg.student.registers, cfg.distill.lr, cfg.distill.epochs) == ("a", 4, 1e-3, 3)


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([], {"storage.run_root": "runs/x"})
    assert cfg.storage.run_root == str(tmp_path / "runs/x")
    assert cfg.shards_url == str(tmp_path / "runs/x/shards")
    s3 = load_config([], {"storage.run_root": "s3://bucket/run"})
    assert s3.cache_root == "s3://bucket/run/cache"


@pytest.mark.parametrize("override, message", [
    ({"student.regsters": 4}, "regsters"),  # typo: unknown keys are errors
    ({"tta.counts": 0}, "counts"),
    ({"cache.dtype": "int4"}, "dtype"),
    ({"distill.final_lr": 1.0}, "final_lr"),
])
def test_invalid_values_are_refused_with_their_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], override)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config([tmp_path / "nope.yaml"])


def test_cli_flags_parse_yaml_values():
    args = vars(build_parser().parse_args(["distill", "--student.unlock", "[pos_embed]", "--distill.lr", "3e-4"]))
    del args["command"], args["config"]
    cfg = load_config([], args)
    assert cfg.student.unlock == ["pos_embed"] and cfg.distill.lr == 3e-4


def test_cli_help_explains_options():
    out = subprocess.run([sys.executable, "-m", "stages", "teacher-cache", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--tta.shift_frac" in out and "Largest shift" in out and "default: 0.15" in out


def test_cli_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages", "teacher-cache", "--storage.run_root", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no manifest" in proc.stderr and "Traceback" not in proc.stderr


def test_a_mapping_override_merges_into_its_section():
    """`--evaluate.zeroshot '{text_pretrained: openai}'` (configs/clip.yaml's suggestion)
    keeps the YAML's other zero-shot keys instead of resetting the section."""
    flags = ["evaluate", "--config", "configs/clip.yaml", "--evaluate.zeroshot", "{text_pretrained: openai}"]
    args = vars(build_parser().parse_args(flags))
    cfg = load_config(args.pop("config"), {k: v for k, v in args.items() if k != "command"})
    z = cfg.evaluate.zeroshot
    assert (z.text_pretrained, z.labeled, z.short_side, z.prob_threshold) == ("openai", "sample:labeled", 448, 0.0)


def test_nested_sections_have_flags_of_their_own():
    args = vars(build_parser().parse_args(["evaluate", "--config", "configs/clip.yaml",
                                           "--evaluate.zeroshot.text_pretrained", "openai",
                                           "--evaluate.zeroshot.labeled", "null"]))
    cfg = load_config(args.pop("config"), {k: v for k, v in args.items() if k != "command"})
    assert cfg.evaluate.zeroshot.text_pretrained == "openai" and cfg.evaluate.zeroshot.labeled is None
    assert cfg.evaluate.zeroshot.short_side == 448  # the rest of the YAML's section stays
    out = subprocess.run([sys.executable, "-m", "stages", "evaluate", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--evaluate.zeroshot.text_pretrained" in out
