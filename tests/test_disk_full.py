"""A disk that fills up during a run: a real full file system, not a simulated error.

Each test runs the entry point inside a private mount namespace (``unshare``: as root, or as a user
where unprivileged user namespaces are allowed) in which the work directory is a small tmpfs that
is then filled to the last byte; the mount disappears with the namespace. What a user must see: one
line saying which file system is full and which file was being written, exit status 1, no
traceback, no ``*.tmp`` files left, and every finished result kept and reused after space is freed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_params

pytestmark = pytest.mark.slow

# Runs in the namespace: mount the tmpfs, then run each step given as JSON ({"fill": true} fills
# the file system, {"free": true} frees it, {"argv": [...]} runs a command); prints what happened.
DRIVER = r"""
import hashlib, json, os, subprocess, sys
from pathlib import Path

work, size, steps = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
work.mkdir(parents=True, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "oodgate-test-full", str(work)], check=True)
os.chdir(os.getcwd())  # resolve the working directory again, through the new mount
filler = work / "filler"

def digests():
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(work.rglob("*")) if p.is_file() and p != filler}

results = []
for step in steps:
    if step.get("fill"):
        with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing is left to flush at close
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == 28, e
        results.append({"filled": filler.stat().st_size})
    elif step.get("free"):
        filler.unlink()
        results.append({"freed": True})
    else:
        out = subprocess.run(step["argv"], capture_output=True, text=True)
        results.append({"argv": step["argv"], "rc": out.returncode, "stdout": out.stdout,
                        "stderr": out.stderr, "files": digests()})
print(json.dumps(results))
"""


def _namespace() -> list[str]:
    base = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        base = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]
    try:
        ok = subprocess.run([*base, "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        ok = False
    if not ok:
        pytest.skip("no private mount namespace here (unshare), so no small file system can be mounted")
    return base


def _run(work: Path, size: str, steps: list[dict], cwd: Path, env: dict[str, str]) -> list[dict]:
    out = subprocess.run(
        [*_namespace(), sys.executable, "-c", DRIVER, str(work), size, json.dumps(steps)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _the_one_line(result: dict, work: Path) -> str:
    """The entry point's own line (the flow's stderr also carries Prefect's log of the failed task)."""
    err = result["stderr"]
    assert result["rc"] == 1, result["stdout"][-2000:] + err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    full = f"error: no space left on {work} (oodgate-test-full) while writing {work}/"
    assert line.startswith(full), err[-3000:]
    assert line.endswith("; free space and re-run (finished results are kept and reused)"), line
    return line


def test_the_core_cli_on_a_full_disk_says_so_in_one_line_and_loses_nothing(embedded_root, tmp_path):
    work = tmp_path / "w"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(embedded_root, work)))
    cli = [sys.executable, "-m", "oodgate"]
    steps = [
        {"argv": [*cli, "prepare", "--params", str(params), "--quiet"]},
        {"argv": [*cli, "train", "--params", str(params), "--loss", "softmax", "--quiet"]},
        {"fill": True},
        {"argv": [*cli, "run", "--params", str(params), "--quiet"]},
        {"free": True},
        {"argv": [*cli, "run", "--params", str(params), "--quiet"]},
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    prepared, trained, filled, full, _, again = _run(work, "32m", steps, tmp_path, env)
    assert prepared["rc"] == trained["rc"] == 0, prepared["stderr"][-2000:] + trained["stderr"][-2000:]
    assert filled["filled"] > 0

    line = _the_one_line(full, work)
    assert line.endswith(
        f"while writing {work}/prepared/id.pt; free space and re-run (finished results are kept and reused)"
    )
    assert full["stderr"].count("\n") == 1 and "Traceback" not in full["stderr"]
    assert not [f for f in full["files"] if f.endswith(".tmp")]  # no temporary file left behind
    # nothing finished was damaged: the prepared data and the trained model are as they were
    assert full["files"] == trained["files"]

    assert again["rc"] == 0, again["stderr"][-3000:]
    record = "train/softmax/seed0/train.json"
    assert again["files"][record] == trained["files"][record]  # reused, not trained again
    assert "Best promoted" in again["stdout"]


def test_the_flow_on_a_full_disk_says_so_in_one_line_and_marks_its_run_failed(project, tmp_path):
    from mlflow.tracking import MlflowClient
    from stack import isolated_env

    work = project / "artifacts"
    home = tmp_path / "prefect-home"
    home.mkdir()
    steps = [{"fill": True}, {"argv": [sys.executable, "-m", "flows.pipeline", "--root", str(project)]}]
    _, full = _run(work, "256k", steps, REPO, isolated_env(home))

    line = _the_one_line(full, work)
    assert f"while writing {work}/cache/prepared-" in line
    assert not [f for f in full["files"] if f.endswith(".tmp")]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("oodgate").experiment_id],
        filter_string="tags.`oodgate.role` = 'pipeline'",
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["oodgate.failure"].startswith("NoSpaceError: no space left on ")
