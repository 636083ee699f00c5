"""Scaling out on one machine: the flow's fan-out per task runner, each runner's per-task overhead,
and data-parallel training's step time and loss against one process.

1. **Fan-out**: ``python -m flows.pipeline`` on a fresh copy of the project (nothing cached, its
   own SQLite MLflow store, a temporary Prefect server), with the thread runner and with a local
   Dask cluster of 1 and 2 worker processes: wall time of the whole process.
2. **Per-task overhead**: a flow of ``--tasks`` tasks that do nothing, submitted at once, under each
   runner (a temporary Prefect server in this process): wall time per task.
3. **DDP**: one (loss, seed) of the project's params trained by 1 and 2 gloo processes
   (``train.processes``): time per optimizer step (from a 1-epoch and an ``--ddp-epochs``-epoch run,
   so the launch and start-up cancel out) and the per-epoch mean training loss of each.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_scaling.py                   # default params, minutes
    PYTHONPATH=. .venv/bin/python benchmarks/bench_scaling.py --set seeds=[0] --skip ddp

On 2 cores the Dask workers and DDP processes share the cores a single training already keeps
busy: the ratios are what this machine gives, not what more cores would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oodgate.base import numerics

numerics.apply()  # before torch loads: the DDP part trains in this process (oodgate.base.numerics)

REPO = Path(__file__).resolve().parents[1]
RUNNERS = {
    "threads": [],
    "dask, 1 worker": ["--set", "orchestration.task_runner=dask", "--set", "orchestration.workers=1"],
    "dask, 2 workers": ["--set", "orchestration.task_runner=dask", "--set", "orchestration.workers=2"],
}


def _env(tmp: Path, name: str) -> dict[str, str]:
    from oodgate.base.project import TELEMETRY_OFF

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(TELEMETRY_OFF, PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp / f"prefect-{name}"))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / f'{name}.db'}"
    return env


def fan_out(args: argparse.Namespace, tmp: Path) -> list[str]:
    rows = []
    for i, (name, extra) in enumerate(RUNNERS.items()):
        if args.runner and name not in args.runner:
            continue
        project = tmp / f"project{i}"  # as a user has it after `make data`, outside git
        project.mkdir()
        shutil.copy(REPO / "params.yaml", project / "params.yaml")
        shutil.copytree(REPO / "data", project / "data")
        dvc = [sys.executable, "-m", "dvc"]
        for step in (
            ["init", "--no-scm", "-q"],
            ["config", "core.analytics", "false"],
            ["add", "-q", "data"],
        ):
            subprocess.run([*dvc, *step], cwd=project, check=True, capture_output=True)
        sets = [x for s in args.set for x in ("--set", s)]
        cmd = [sys.executable, "-m", "flows.pipeline", "--root", str(project), *sets, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(tmp, f"run{i}"), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        tasks = len(list((project / "artifacts" / "cache").glob("train-*")))
        rows.append(f"| {name} | {tasks} | {wall:.1f} |")
        print(f"fan-out {name}: {wall:.1f} s", flush=True)
    return rows


def overhead(args: argparse.Namespace) -> list[str]:
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.testing.utilities import prefect_test_harness

    from flows.dask_cluster import task_runner_for
    from oodgate.base.config import parse_config

    @task(cache_policy=None)
    def noop(i: int) -> int:
        return i

    def run(n: int) -> None:
        futures = [noop.submit(i) for i in range(n)]
        assert [f.result() for f in futures] == list(range(n))

    base = {
        "losses": {"softmax": {"method": "softmax"}},
        "gate": {"confidence": None},
        "data": {"ood": ["gaussian_noise"]},
    }
    rows = []
    with prefect_test_harness(server_startup_timeout=60):
        for name, runner in (
            ("threads (1 thread, as the flow)", ThreadPoolTaskRunner(max_workers=1)),
            (
                "dask, 2 workers",
                task_runner_for(parse_config({**base, "orchestration": {"task_runner": "dask"}})),
            ),
        ):
            f = flow(name="overhead", task_runner=runner)(run)
            f(2)  # start-up: the cluster, the first task of each kind
            t0 = time.perf_counter()
            f(args.tasks)
            wall = time.perf_counter() - t0
            rows.append(f"| {name} | {args.tasks} | {wall:.2f} | {1000 * wall / args.tasks:.0f} |")
            print(f"overhead {name}: {1000 * wall / args.tasks:.0f} ms per task", flush=True)
    return rows


def ddp(args: argparse.Namespace, tmp: Path) -> list[str]:
    import math

    from oodgate.base.config import load_config
    from oodgate.data.embedded import materialize_embedded
    from oodgate.running import steps

    materialize_embedded(tmp / "data")
    rows, curves = [], {}
    for n in (1, 2):
        times = {}
        # an untimed 1-epoch run first: in this process the first training pays torch's warm-up
        for run, epochs in (("warm-up", 1), ("short", 1), ("long", args.ddp_epochs)):
            overrides = {
                "data.root": str(tmp / "data"),
                "train.epochs": epochs,
                "train.milestones": [],
                "train.warmup_epochs": 0,
                "train.processes": n,
                "workdir": str(tmp / "w"),
            }
            cfg = load_config(REPO / "params.yaml", overrides)
            prepared = tmp / "prepared"
            if not (prepared / "data.json").exists():
                steps.prepare(cfg, prepared)
            out = tmp / f"ddp{n}-{run}"
            t0 = time.perf_counter()
            steps.train(cfg, "softmax", 0, prepared, out)
            times[run] = time.perf_counter() - t0
            if run == "long":
                curves[n] = [h["train_loss"] for h in json.loads((out / "history.json").read_text())]
        n_train = json.loads((prepared / "data.json").read_text())["sizes"]["train"]
        steps_per_epoch = math.ceil(n_train / cfg.train.batch_size)
        per_step = (times["long"] - times["short"]) / ((args.ddp_epochs - 1) * steps_per_epoch)
        rows.append(f"| {n} | {cfg.train.batch_size} | {1000 * per_step:.1f} | {times['short']:.1f} |")
        print(f"ddp {n}: {1000 * per_step:.1f} ms per step", flush=True)
    diff = [abs(a - b) / a for a, b in zip(curves[1], curves[2], strict=True)]
    rows.append("")
    rows.append("per-epoch mean training loss, 1 process: " + ", ".join(f"{x:.4f}" for x in curves[1]))
    rows.append("per-epoch mean training loss, 2 processes: " + ", ".join(f"{x:.4f}" for x in curves[2]))
    rows.append("relative difference: " + ", ".join(f"{100 * d:.1f}%" for d in diff))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="params override (fan-out)"
    )
    p.add_argument(
        "--runner", action="append", default=[], choices=list(RUNNERS), help="only these (fan-out)"
    )
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--ddp-epochs", type=int, default=4)
    p.add_argument("--skip", action="append", default=[], choices=("fan-out", "overhead", "ddp"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "fan-out" not in args.skip:
            rows = fan_out(args, tmp)
            print("\n| task runner | trainings | wall s (whole process) |\n|---|---|---|\n" + "\n".join(rows))
        if "overhead" not in args.skip:
            rows = overhead(args)
            print("\n| task runner | tasks | wall s | ms per task |\n|---|---|---|---|\n" + "\n".join(rows))
        if "ddp" not in args.skip:
            rows = ddp(args, tmp)
            print(
                "\n| processes | global batch | ms per step | 1-epoch run, s |\n|---|---|---|---|\n"
                + "\n".join(rows)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
