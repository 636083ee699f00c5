"""The layers of docs/architecture.md, held against the source: every module of the core is named there
with its layer, imports only modules of its own layer or below, and no two modules import each other
in a loop; the core runs without the orchestration and tracking stack; the adapters do not reach back
into the flows; the config schema loads without torch; ``oodgate.base.project`` is a leaf."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("oodgate", "oodgate_mlflow", "oodgate_servers", "flows", "tasks")
OUTSIDE_CORE = ("prefect", "mlflow", "dvc", "flows", "tasks", "oodgate_mlflow", "oodgate_servers")
ARCHITECTURE = REPO / "docs" / "architecture.md"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, runtime_only: bool = False) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, relative imports resolved;
    ``runtime_only`` leaves out those under ``if TYPE_CHECKING:`` (for annotations only)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    skipped = {id(n) for t in ast.walk(tree) if runtime_only and _type_checking(t) for n in ast.walk(t)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module or "")
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    return files


def _top(name: str) -> str:
    return name.split(".")[0]


def _layers() -> tuple[list[str], dict[str, str]]:
    """The layers, from the top, and each module's layer, as docs/architecture.md states them."""
    text = ARCHITECTURE.read_text()
    order = re.search(r"^Layers, from the top: (.+)\.$", text, re.M)
    assert order, "docs/architecture.md names its layers in a line 'Layers, from the top: a, b, c.'"
    layers = [x.strip() for x in order.group(1).split(",")]
    of: dict[str, str] = {}
    for row in re.finditer(r"^\| (\w+) \| (.+?) \|", text, re.M):
        layer, cell = row.groups()
        for path in re.findall(r"`(oodgate/[\w/]+\.py)`", cell):
            of[path] = layer
    return layers, of


CORE = [p for p in _files("oodgate") if p.name != "__init__.py"]


def test_architecture_names_every_module_of_the_core_with_its_layer():
    layers, of = _layers()
    named = {p.relative_to(REPO).as_posix() for p in CORE}
    assert sorted(named - set(of)) == [], "modules docs/architecture.md does not name"
    assert sorted(set(of) - named) == [], "docs/architecture.md names modules that do not exist"
    assert set(of.values()) <= set(layers)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_imports_its_own_layer_or_below(path):
    layers, of = _layers()
    rank = {layer: i for i, layer in enumerate(layers)}
    mine = rank[of[path.relative_to(REPO).as_posix()]]
    modules = {_module(p): p.relative_to(REPO).as_posix() for p in CORE}
    up = sorted(
        f"{m} ({of[modules[m]]})" for m in imports(path) if m in modules and rank[of[modules[m]]] < mine
    )
    assert not up, f"{path.relative_to(REPO)} ({layers[mine]}) imports from a layer above: {up}"


def test_no_module_of_the_core_imports_another_that_imports_it_back():
    """No loop of imports between modules (those for annotations only, under TYPE_CHECKING, aside)."""
    modules = {_module(p): p for p in CORE}
    edges = {
        m: {x for x in imports(p, runtime_only=True) if x in modules and x != m} for m, p in modules.items()
    }
    seen, stack, loops = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            loops.append([*stack[stack.index(m) :], m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(edges[m]):
            visit(n)
        stack.pop()

    for m in sorted(modules):
        visit(m)
    assert not loops, loops


@pytest.mark.parametrize("path", _files("oodgate"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_package_imports_no_orchestration_or_tracking(path):
    bad = sorted(m for m in imports(path) if _top(m) in OUTSIDE_CORE)
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("package", ["oodgate_mlflow", "oodgate_servers"])
def test_the_adapters_do_not_import_flows_or_tasks(package):
    bad = {
        str(p.relative_to(REPO)): sorted(m for m in imports(p) if _top(m) in ("flows", "tasks"))
        for p in _files(package)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_the_project_constants_are_a_leaf():
    found = imports(REPO / "oodgate" / "base" / "project.py")
    assert not [m for m in found if _top(m) in PROJECT_PACKAGES]


def test_the_config_module_imports_no_torch_and_no_registry():
    """Checked in a fresh interpreter, which also validates params.yaml: what loading and validating
    a config really loads, whatever the route (a validator importing a registry counted too)."""
    code = (
        "import sys, oodgate.base.config\n"
        "oodgate.base.config.load_config('params.yaml')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy') or m in "
        "('oodgate.learning.methods', 'oodgate.learning.models', 'oodgate.learning.scores', 'oodgate.data', "
        "'oodgate.measuring.metrics'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"importing oodgate.base.config loads {out.stdout.strip()}"


@pytest.mark.parametrize("path", _files("oodgate_mlflow"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_mlflow_edge_holds_no_policy_and_no_orchestration(path):
    """The registry and the runs move aliases and write what they are given: no gate, no Prefect."""
    bad = sorted(
        m
        for m in imports(path)
        if _top(m) in ("prefect", "flows", "tasks") or m.startswith("oodgate.deciding")
    )
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def _imports_inside_functions() -> list[tuple[str, int, str]]:
    found = []
    for package in PROJECT_PACKAGES:
        for path in _files(package):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for sub in ast.walk(node):
                    names = (
                        [sub.module or ""]
                        if isinstance(sub, ast.ImportFrom) and not sub.level
                        else [a.name for a in sub.names]
                        if isinstance(sub, ast.Import)
                        else []
                    )
                    if any(_top(n) in PROJECT_PACKAGES for n in names):
                        here = "\n".join(lines[sub.lineno - 2 : sub.end_lineno])
                        found.append((str(path.relative_to(REPO)), sub.lineno, here))
    return found


def test_imports_are_at_the_top_but_for_a_few_with_their_measured_cost():
    """At most 10 project imports inside functions, each with a comment (on its line or the one
    before) giving the start-up cost it saves; no importlib facades."""
    inside = _imports_inside_functions()
    assert len(inside) <= 10, [f"{p}:{n}" for p, n, _ in inside]
    unexplained = [f"{p}:{n}" for p, n, text in inside if "#" not in text]
    assert not unexplained, f"imports inside functions without a comment saying why: {unexplained}"
    facades = [
        str(p.relative_to(REPO))
        for package in PROJECT_PACKAGES
        for p in _files(package)
        if "import_module" in p.read_text() or "def __getattr__(" in p.read_text()
    ]
    assert not facades, facades
