"""The bench's modules import each other without a circle: `bench/run.py` (the entry point)
imports the sections, the sections import `bench/common.py` and `bench/planted_run.py`, and
nothing imports `bench/run.py`.

Imports inside functions count too: they hide a circle from Python at import time, not from a
reader, and a module that imports its own importer can no longer be loaded or tested alone.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def bench_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The bench modules (by stem) a file imports, at module level or in any function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import stays inside bench/
                module = "bench" + (f".{node.module}" if node.module else "")
            else:
                module = node.module or ""
            # `from bench import x` imports module x; `from bench.x import y` imports module x
            names = [f"{module}.{a.name}" for a in node.names] if module == "bench" else [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "bench" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph(folder: pathlib.Path) -> dict[str, set[str]]:
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    return {m: bench_imports(folder / f"{m}.py", modules) - {m} for m in sorted(modules)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle found by a depth-first search, each as the path that closes it."""
    found, state = [], {}  # state: 1 while on the current path, 2 once finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_bench_has_no_import_circle():
    graph = import_graph(BENCH)
    assert {"run", "common", "planted_run"} <= set(graph)
    assert cycles(graph) == []


def test_nothing_imports_the_entry_point():
    graph = import_graph(BENCH)
    assert [m for m, deps in graph.items() if "run" in deps] == []
    assert graph["common"] == set()  # the shared helpers lean on the library only


@pytest.mark.parametrize("importer, planted, circle", [
    ("gpu.py", "def _late():\n    from bench.run import S3\n", True),  # the entry point, from inside a function
    ("common.py", "from bench.data_path import reference_corpus\n", True),  # common -> data_path -> common
    ("data_path.py", "def _late():\n    from bench import gpu\n", True),  # section -> section -> back
    ("planted_run.py", "from .planted import CONFIGS\n", True),  # relative import
    ("sink.py", "from bench.common import flops\n", False),
])
def test_the_check_catches_a_planted_circle(tmp_path, importer, planted, circle):
    """Plant one import in a copy of bench/ and see the check react to it."""
    for path in BENCH.glob("*.py"):
        (tmp_path / path.name).write_text(path.read_text())
    target = tmp_path / importer
    target.write_text(target.read_text() + "\n\n" + planted)
    assert bool(cycles(import_graph(tmp_path))) == circle
