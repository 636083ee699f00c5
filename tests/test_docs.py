"""What the README and docs/ name exists: files, links, modules run with ``python -m`` (make targets:
test_surfaces), and no docstring points outside the repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Paths of the project as the pages write them in backticks: a top-level folder of the checkout
# followed by a file name (placeholders such as <loss> or {seed} are not paths).
TOP = ("oodgate/", "oodgate_mlflow/", "oodgate_servers/", "flows/", "tasks/", "tests/", "benchmarks/")
TOP += ("docs/", "params/", ".ci/")
PATH = re.compile("`((?:" + "|".join(re.escape(t) for t in TOP) + r")[A-Za-z0-9_./-]+)`")
LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")
MODULE = re.compile(r"python -m ([a-z_][a-z0-9_.]*)")


def _text(page: Path) -> str:
    return page.read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_a_page_names_exists(page):
    named = {m for m in PATH.findall(_text(page)) if not re.search(r"[<>{}*]", m)}
    missing = sorted(p for p in named if not (REPO / p.rstrip(".")).exists())
    assert not missing, f"{page.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    links = [x for x in LINK.findall(_text(page)) if not x.startswith(("http", "mailto"))]
    missing = sorted(x for x in links if not (page.parent / x).exists())
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_module_run_with_python_m_exists(page):
    modules = set(MODULE.findall(_text(page))) - {"pip", "venv", "pytest"}
    missing = sorted(m for m in modules if importlib.util.find_spec(m.split(" ")[0]) is None)
    assert not missing, f"{page.name} runs modules that do not exist: {missing}"


def test_the_readme_stays_short_and_links_every_page():
    readme = _text(REPO / "README.md")
    assert len(readme.splitlines()) <= 250
    pages = {p.name for p in PAGES[1:]}
    linked = {Path(x).name for x in LINK.findall(readme)}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


GENERATED = {"report.md", "comparison.md", "comparison_table.md"}  # files the code writes


def test_no_docstring_or_comment_points_outside_the_repository():
    """A ``.md`` named in the code is one the code writes, or a page of this checkout."""
    bad = []
    for src in (p for d in TOP[:7] for p in (REPO / d).rglob("*.py")):
        for name in re.findall(r"[A-Za-z0-9_./-]+\.md\b", src.read_text()):
            if Path(name).name in GENERATED or src.name == "test_docs.py":
                continue
            if not ((REPO / name).exists() or (REPO / "docs" / Path(name).name).exists()):
                bad.append(f"{src.relative_to(REPO)}: {name}")
    assert not bad, bad
