"""Change -> what re-runs, measured in both orchestrators.

A copy of this project (code, dvc.yaml, the embedded data) with a small params.yaml (two losses,
one seed, one epoch: what re-runs does not depend on the scale, what it costs does) gets one change
at a time. For each change it runs, for real:

- ``dvc repro``: the stages DVC executed (``Running stage '...'``), then back to the committed
  state (``git checkout`` + ``dvc checkout``);
- ``python -m flows.pipeline``: the steps that computed something, i.e. the content-addressed
  result directories that appeared under ``<workdir>/cache/`` (a step whose inputs did not change
  finds its directory and reuses it), and the losses whose finished MLflow child run was reused.
  The flow's gate always runs (it is cheap and not cached).

and prints a markdown table. About 10 minutes on 2 cores:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_reruns.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from oodgate.base.project import TELEMETRY_OFF

REPO = Path(__file__).resolve().parents[1]
LOSSES = {"softmax": {"method": "softmax"}, "dismax_fpr": {"method": "dismax", "options": {"fpr": True}}}
COPY = ("oodgate", "flows", "tasks")
FILES = ("dvc.yaml", ".dvcignore", ".gitignore", "data.dvc", ".dvc/config", ".dvc/.gitignore")


def small_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seeds"] = [0]
    params["data"] = {**params["data"], "classes": [0, 1, 2], "ood": ["mnist_unseen", "gaussian_noise"]}
    params["data"]["ood_size"] = 100
    params["model"] = {"backbone": "small_cnn", "options": {"width": 8}}
    params["train"] = {**params["train"], "epochs": 1, "milestones": []}
    params["losses"] = LOSSES
    return params


def env(root: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        PYTHONPATH=str(root),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")]),
        **TELEMETRY_OFF,
        PREFECT_HOME=str(root / ".prefect"),  # a private Prefect home: its own result cache
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@oodgate.invalid",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@oodgate.invalid",
    )
    return e


def sh(root: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=root, env=env(root), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def make_project(root: Path) -> None:
    for name in COPY:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(), sort_keys=False))
    if (REPO / "data").is_dir():
        shutil.copytree(REPO / "data", root / "data")
    else:
        sh(root, sys.executable, "-m", "oodgate", "materialize", "--root", "data")
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "project")


def commit(root: Path) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "state", "--allow-empty")


# ---------------------------------------------------------------- the changes
def setting(key: str, value) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        p = yaml.safe_load((root / "params.yaml").read_text())
        *parents, leaf = key.split(".")
        node = p
        for part in parents:
            node = node[part]
        node[leaf] = value
        (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

    return apply


def editing(path: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        f = root / path
        text = f.read_text()
        assert old in text, (path, old)
        f.write_text(text.replace(old, new, 1))

    return apply


CHANGES: list[tuple[str, Callable[[Path], None]]] = [
    ("`losses.dismax_fpr.score: energy` (an OOD score)", setting("losses.dismax_fpr.score", "energy")),
    ("`train.eval_batch_size: 256`", setting("train.eval_batch_size", 256)),
    ("`calibration.objective: ece`", setting("calibration.objective", "ece")),
    ("`gate.accuracy.margin: 0.01`", setting("gate.accuracy.margin", 0.01)),
    (
        "`data.ood`: one OOD set more",
        setting("data.ood", ["mnist_unseen", "gaussian_noise", "uniform_noise"]),
    ),
    ("`seeds: [0, 1]` (a seed more)", setting("seeds", [0, 1])),
    ("`train.epochs: 2`", setting("train.epochs", 2)),
    ("`registry.model_name: other`", setting("registry.model_name", "other")),
    (
        "a docstring in `oodgate/learning/training/engine.py`",
        editing("oodgate/learning/training/engine.py", '"""One training loop', '"""The one training loop'),
    ),
    (
        "code in `oodgate/measuring/plots.py`",
        editing(
            "oodgate/measuring/plots.py", "\nimport numpy as np\n", "\nimport numpy as np\n\nEDITED = 1\n"
        ),
    ),
    (
        "code in `oodgate/deciding/gate.py`",
        editing("oodgate/deciding/gate.py", "\nimport numpy as np\n", "\nimport numpy as np\n\nEDITED = 1\n"),
    ),
]


# ---------------------------------------------------------------- the two orchestrators
def dvc_reruns(root: Path) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    out = sh(root, sys.executable, "-m", "dvc", "repro")
    return re.findall(r"Running stage '([^']+)'", out), time.perf_counter() - t0


def _describe(d: Path) -> str:
    step = d.name.split("-", 1)[0]
    for record in ("train.json", "calibration.json", "evaluation.json"):
        if (d / record).is_file():
            r = json.loads((d / record).read_text())
            return f"{step} {r['loss']}-{r['seed']}"
    return step


def flow_reruns(root: Path) -> tuple[list[str], str, float]:
    cache = root / "artifacts" / "cache"
    before = set(cache.iterdir()) if cache.is_dir() else set()
    t0 = time.perf_counter()
    out = sh(root, sys.executable, "-m", "flows.pipeline", "--root", str(root))
    seconds = time.perf_counter() - t0
    new = sorted(_describe(d) for d in set(cache.iterdir()) - before)
    reused = sorted(set(re.findall(r"(\w+): reusing run", out)))
    return new, ", ".join(reused) or "none", seconds


def _fmt(names: list[str]) -> str:
    return ", ".join(names) if names else "nothing"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the temporary project and print its path")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="oodgate-reruns-"))
    root = tmp / "project"
    root.mkdir()
    try:
        make_project(root)
        stages, dvc_s = dvc_reruns(root)
        commit(root)
        steps, _, flow_s = flow_reruns(root)
        print(
            f"first runs: dvc repro {len(stages)} stages in {dvc_s:.0f} s; flow computed {len(steps)} steps in {flow_s:.0f} s\n"
        )
        rows = []
        for label, change in CHANGES:
            change(root)
            try:
                stages, dvc_s = dvc_reruns(root)
                steps, reused, flow_s = flow_reruns(root)
            finally:
                sh(root, "git", "checkout", "--", ".")
                sh(root, sys.executable, "-m", "dvc", "checkout", "--force")
            rows.append((label, _fmt(stages), f"{dvc_s:.0f}", _fmt(steps), reused, f"{flow_s:.0f}"))
            print(f"done: {label}", file=sys.stderr)
        head = ("change", "`dvc repro` runs", "s", "flow computes (+ gate)", "child runs reused", "s")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    finally:
        if args.keep:
            print(f"project kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
