"""The library's layout is its architecture: each subpackage imports only the layers below it.

The rules are the ones the subpackages' docstrings state; `pipeline/__init__.py` draws them.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
TOP = {"config", "storage", "errors", "placement", "tracking"}
# What each part of `pipeline` may import, besides itself.
ALLOWED = {
    "top": set(),
    "data": {"top"},
    "models": {"top", "data"},
    "targets": {"top", "data", "models"},
    "training": {"top", "data", "models", "targets"},
    "evaluation": {"top", "data", "models", "targets"},
}


def part_of(module: str) -> str:
    """'pipeline.targets.store' -> 'targets'; 'pipeline.config' -> 'top'."""
    parts = module.split(".")
    return "top" if len(parts) < 2 or parts[1] in TOP else parts[1]


def pipeline_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for every `pipeline...` import in a file, including `from pipeline import x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pipeline"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipeline":
                found += [(node.lineno, f"pipeline.{a.name}") for a in node.names]
            elif node.module.startswith("pipeline."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "relative import"))
    return found


def violations(root: pathlib.Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        here = "top" if len(rel.parts) == 2 else rel.parts[1]  # pipeline/x.py or pipeline/<part>/x.py
        for line, module in pipeline_imports(path):
            if module == "relative import":
                bad.append(f"{rel}:{line}: relative import (use absolute `pipeline...` imports)")
                continue
            there = part_of(module)
            if there != here and there not in ALLOWED[here]:
                bad.append(f"{rel}:{line}: `{here}` imports `{module}` (allowed: {sorted(ALLOWED[here]) or 'none'})")
    return bad


def test_every_module_belongs_to_a_known_part():
    top_modules = {p.stem for p in PIPELINE.glob("*.py")} - {"__init__"}
    assert top_modules == TOP, f"modules at the top of pipeline/ must be {sorted(TOP)}, found {sorted(top_modules)}"
    packages = {p.name for p in PIPELINE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED) - {"top"}
    for package in packages:
        doc = ast.get_docstring(ast.parse((PIPELINE / package / "__init__.py").read_text()))
        assert doc and "Imports" in doc, f"pipeline/{package}/__init__.py must say what it holds and may import"


def test_no_part_imports_a_layer_it_must_not():
    assert violations(PIPELINE) == []


def test_the_library_never_imports_the_stages():
    for path in PIPELINE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in {"stages", "bench", "tests"} for n in names), f"{path} imports {names}"


@pytest.mark.parametrize("importer, imported, allowed", [
    ("data/images.py", "from pipeline.models.vit import load_teacher", False),
    ("training/pairs.py", "from pipeline.evaluation import metrics", False),
    ("evaluation/tasks.py", "import pipeline.training.losses", False),
    ("targets/store.py", "from pipeline import storage", True),
    ("targets/tta.py", "from pipeline.models import vit", True),
])
def test_the_check_catches_a_forbidden_import(tmp_path, importer, imported, allowed):
    """Plant one import in a copy of the library and see the check react to it."""
    copy = tmp_path / "pipeline"
    for path in PIPELINE.rglob("*.py"):
        target = copy / path.relative_to(PIPELINE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (copy / importer).write_text(f"{imported}\n" + (copy / importer).read_text())
    assert (violations(copy) == []) == allowed


def test_ray_trains_controller_never_imports_the_training_code():
    """Ray Train unpickles `train_loop` and its DistillJob in its controller actor too, which
    never trains: that module must not pull in timm, the readers or tracking (2 CPU-s a student)."""
    import subprocess
    import sys

    heavy = ["timm", "pipeline.training.loop", "pipeline.tracking", "pipeline.data.readers"]
    code = f"import sys, pipeline.training.job; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out
