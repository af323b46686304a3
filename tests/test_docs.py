"""The documentation stays true to the code: the configuration reference is regenerated when a
field changes, and every relative link in README.md and docs/ reaches a file and heading."""
from __future__ import annotations

import pathlib
import re
from urllib.parse import unquote

import pytest
from pydantic import BaseModel

from pipeline.config import Config
from stages import config_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks, inline code removed (links there are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeated headings numbered as GitHub does."""
    found, seen = set(), {}
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(pages: list[pathlib.Path], root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for page in pages:
        for number, line in enumerate(prose_lines(page.read_text()), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                    continue
                path_part, _, anchor = target.partition("#")
                dest = (page.parent / unquote(path_part)).resolve() if path_part else page
                if not dest.exists():
                    bad.append(f"{page.relative_to(root)}: {target}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    bad.append(f"{page.relative_to(root)}: {target}: no heading #{anchor} in {dest.name}")
    return bad


def test_configuration_reference_is_current():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == config_reference.render(), "docs/configuration.md is stale: run `make docs`"


def test_every_config_option_is_described():
    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(Config, "")
    assert missing == [], f"add a description= to these fields in pipeline/config.py: {missing}"


def test_every_relative_link_reaches_a_file_and_heading():
    assert len(PAGES) > 1
    assert broken_links(PAGES) == []


@pytest.mark.parametrize("text, problem", [
    ("[x](nowhere.md)", "no such file"),
    ("[x](README.md#no-such-heading)", "no heading"),
    ("[x](#not-here)", "no heading"),
])
def test_the_link_check_catches(tmp_path, text, problem):
    (tmp_path / "README.md").write_text("# Title\n\n## A heading\n")
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\n{text}\n\n[fine](README.md#a-heading) `[code](nowhere.md)`\n")
    (found,) = broken_links([page], tmp_path)
    assert problem in found


@pytest.mark.parametrize("heading, anchor", [
    ("The authors' released DINOv2 students", "the-authors-released-dinov2-students"),
    ("evaluate.zeroshot", "evaluatezeroshot"),
    ("Submitting stages: `RAY_ADDRESS` + `make`", "submitting-stages-ray_address--make"),
    ("Planted artifacts (proof of mechanism)", "planted-artifacts-proof-of-mechanism"),
])
def test_slugs_follow_github(heading, anchor):
    assert slug(heading) == anchor


TEST_REFERENCE = re.compile(r"\b(test_\w+\.py)(?:::(test_\w+))?")


def missing_tests(pages: list[pathlib.Path], tests: pathlib.Path = ROOT / "tests") -> list[str]:
    """References such as `test_store.py::test_x` (or a file alone) whose file or test is gone."""
    missing = []
    for page in pages:
        for file, test in TEST_REFERENCE.findall(page.read_text()):
            path = tests / file
            if not path.exists() or (test and not re.search(rf"^def {test}\(", path.read_text(), re.M)):
                missing.append(f"{page.name}: {file}{'::' + test if test else ''}")
    return sorted(set(missing))


def test_every_test_the_docs_name_exists(tmp_path):
    assert missing_tests(PAGES + [ROOT / "BENCHMARKS.md"]) == []
    (tmp_path / "test_a.py").write_text("def test_here():\n    pass\n")
    page = tmp_path / "page.md"
    page.write_text("`test_a.py::test_here`, `test_a.py::test_gone`, `test_b.py`, `test_a.py`")
    assert missing_tests([page], tmp_path) == ["page.md: test_a.py::test_gone", "page.md: test_b.py"]
