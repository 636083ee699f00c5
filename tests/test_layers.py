"""The packages' boundaries, read from the source: the core package ``oodgate`` runs without the
orchestration and tracking stack, the adapters do not reach back into the flows, the config schema
loads without torch, and ``oodgate.project`` is a leaf."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("oodgate", "oodgate_mlflow", "oodgate_servers", "flows", "tasks")
OUTSIDE_CORE = ("prefect", "mlflow", "dvc", "flows", "tasks", "oodgate_mlflow", "oodgate_servers")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module or "")
    return found


def _files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    return files


def _top(name: str) -> str:
    return name.split(".")[0]


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
    found = imports(REPO / "oodgate" / "project.py")
    assert not [m for m in found if _top(m) in PROJECT_PACKAGES]


def test_the_config_module_imports_no_torch_and_no_registry():
    """Checked in a fresh interpreter, which also validates params.yaml: what loading and validating
    a config really loads, whatever the route (a validator importing a registry counted too)."""
    code = (
        "import sys, oodgate.config\n"
        "oodgate.config.load_config('params.yaml')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m in "
        "('oodgate.methods', 'oodgate.models', 'oodgate.scores', 'oodgate.data', 'oodgate.metrics'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"importing oodgate.config loads {out.stdout.strip()}"
