"""What the orchestration costs: the Prefect flow against the core library, whole processes.

Runs ``python -m oodgate run`` (the core: no Prefect, no MLflow) and ``python -m flows.pipeline``
(the flow: a temporary Prefect server, an SQLite MLflow database) with the same params, each from
nothing (fresh work directory, empty tracking database: nothing cached or reused), alternately
``--pairs`` times, and prints the
wall and CPU time of every process and the medians' ratio. Target: the flow within 1.10x the core's
wall time. Run it on a quiet machine: CPU training slows down many times when jobs share the cores.
The tracking database is created (migrated) once, untimed, and copied for each flow run: a user's
database exists after the first run; its creation costs about 2 s once.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_flow.py            # make bench-flow; ~8 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/bench_flow.py --pairs 1 --set train.epochs=2
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    args = p.parse_args(argv)
    sets = [a for kv in args.set for a in ("--set", kv)]
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO),
    }
    rows: dict[str, list[tuple[float, float]]] = {"core": [], "flow": []}
    with tempfile.TemporaryDirectory(prefix="oodgate-bench-flow-") as tmp:
        template = Path(tmp) / "template.db"
        migrate = f"from mlflow.tracking import MlflowClient; MlflowClient('sqlite:///{template}').search_experiments()"
        subprocess.run([sys.executable, "-c", migrate], env=env, check=True, capture_output=True)
        for i in range(args.pairs):
            for name in ("core", "flow"):
                work = Path(tmp) / f"{name}{i}"
                work.mkdir()
                if name == "core":
                    cmd = [
                        sys.executable,
                        "-m",
                        "oodgate",
                        "run",
                        "--quiet",
                        "--set",
                        f"workdir={work}",
                        *sets,
                    ]
                    run_env = env
                else:
                    cmd = [sys.executable, "-m", "flows.pipeline", "--set", f"workdir={work}", *sets]
                    shutil.copyfile(template, work / "mlflow.db")
                    run_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
                wall, cpu = _timed(cmd, run_env)
                rows[name].append((wall, cpu))
                print(f"{name} run {i + 1}: wall {wall:.1f} s, CPU {cpu:.1f} s", file=sys.stderr, flush=True)

    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()
    }
    print("\n| process | runs (wall s) | median wall s | median CPU s | cores busy |")
    print("|---|---|---|---|---|")
    for name, cmd in (("core", "python -m oodgate run"), ("flow", "python -m flows.pipeline")):
        walls = ", ".join(f"{w:.1f}" for w, _ in rows[name])
        wall, cpu = med[name]
        print(f"| `{cmd}` | {walls} | {wall:.1f} | {cpu:.1f} | {cpu / wall:.2f} |")
    ratio = med["flow"][0] / med["core"][0]
    print(
        f"\nflow / core wall time: {ratio:.2f}x (target <= 1.10x); CPU time {med['flow'][1] / med['core'][1]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
