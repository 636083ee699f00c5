"""What portable numerics cost: training and evaluation time, portable against native, and each pin alone.

Every variant trains, calibrates and evaluates the same (loss, seed) of ``params.yaml`` (default
softmax, seed 0) in a fresh process, under its own environment (the pins of
:mod:`oodgate.base.numerics` are read when torch and NumPy load, so a variant cannot share a process):

- ``native``: nothing pinned, ``numerics.threads`` threads;
- ``portable``: every pin (the default mode);
- ``only <pin>``: native plus that one pin, to see which pin costs what.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_numerics.py                 # make bench-numerics
    PYTHONPATH=. .venv/bin/python benchmarks/bench_numerics.py --loss dismax_fpr --repeats 3

Times are medians over ``--repeats`` rounds; the variants run in turn within each round, so a slow
spell of a shared machine hits them all alike. Run it alone: two trainings sharing the cores each
take many times as long.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from oodgate.base import numerics

PINS = (
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "NPY_ENABLE_CPU_FEATURES",
    "OPENBLAS_CORETYPE",
)

# The child: the environment is set by the parent; numerics.mode native skips the portable check,
# so that the single-pin variants run as they are.
CHILD = """
import json, sys, time
from pathlib import Path
from oodgate.running import steps
from oodgate.base.config import load_config
from oodgate.running.layout import Layout
params, loss, seed, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
cfg = load_config(params, {"workdir": str(work), "numerics.mode": "native", "seeds": [seed]})
lay = Layout(work)
steps.prepare(cfg, lay.prepared)
t = steps.train(cfg, loss, seed, lay.prepared, lay.train(loss, seed))
t0 = time.perf_counter()
c = steps.calibrate(cfg, loss, seed, lay.train(loss, seed), lay.prepared, lay.calibrate(loss, seed))
s = steps.select(cfg, loss, {seed: lay.calibrate(loss, seed)}, lay.prepared, lay.select(loss))
e = steps.evaluate(cfg, loss, seed, lay.calibrate(loss, seed), lay.prepared, lay.evaluate(loss, seed),
                   lay.select(loss), plots=False)
import torch
print(json.dumps({"train": t.train_seconds, "evaluate": time.perf_counter() - t0,
                  "temperature": c.temperature, "aten": torch.backends.cpu.get_cpu_capability()}))
"""


def variants(threads: int) -> dict[str, dict[str, str]]:
    portable = {k: v for k, v in numerics.environment("portable", threads).items() if k != numerics.MARKER}
    threads_only = {k: v for k, v in portable.items() if k not in PINS}
    out = {"native": threads_only, "portable": portable}
    for pin in PINS:
        out[f"only {pin}"] = {**threads_only, pin: portable[pin]}
    return out


def run(params: str, loss: str, seed: int, env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in PINS and k != numerics.MARKER}
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, params, loss, str(seed), work],
            env={**clean, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--loss", default="softmax")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=numerics.DEFAULT_THREADS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    args = p.parse_args(argv)
    table = variants(args.threads)
    names = [n for n in table if args.only is None or n in args.only]
    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "evaluate": []} for n in names}
    found: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name in names:
            r = run(args.params, args.loss, args.seed, table[name])
            times[name]["train"].append(r["train"])
            times[name]["evaluate"].append(r["evaluate"])
            found[name] = r
    base = {k: statistics.median(v) for k, v in times.get("native", times[names[0]]).items()}
    print(
        f"{args.loss} seed {args.seed}, {args.threads} threads, medians of {args.repeats}; CPU: {numerics.cpu_model()}"
    )
    print("| variant | train s | x native | calibrate + evaluate s | x native | ATen | temperature |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        tr, ev = (statistics.median(times[name][k]) for k in ("train", "evaluate"))
        print(
            f"| {name} | {tr:.2f} | {tr / base['train']:.2f} | {ev:.2f} | {ev / base['evaluate']:.2f} "
            f"| {found[name]['aten']} | {found[name]['temperature']:.6f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
