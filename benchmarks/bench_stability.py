"""Decision stability: does the gate decide the same on disjoint sets of seeds?

Trains every loss of ``params.yaml`` with each seed of the disjoint sets (default {0,1,2}, {3,4,5},
{6,7,8}) with the core library (the steps of ``python -m oodgate run``, no Prefect, no MLflow),
then gates each seed set on its own and prints, per candidate, the decision on each set and whether
they agree; then the per-criterion p-values. Target: every candidate decided the same on every set.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_stability.py              # make bench-stability
    PYTHONPATH=. .venv/bin/python benchmarks/bench_stability.py --sets 0,1,2 3,4,5 --set train.epochs=5

Trained results are kept in ``--workdir`` (default ``artifacts/stability``, ignored by git) and
reused by a rerun with the same inputs, like every step's result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from oodgate import numerics, steps
from oodgate.config import load_config, parse_overrides
from oodgate.layout import Layout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sets", nargs="+", default=["0,1,2", "3,4,5", "6,7,8"], help="disjoint seed sets")
    p.add_argument("--workdir", default="artifacts/stability")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    args = p.parse_args(argv)
    seed_sets = [[int(s) for s in group.split(",")] for group in args.sets]
    every = sorted({s for group in seed_sets for s in group})
    if len(every) != sum(map(len, seed_sets)):
        p.error(f"the seed sets must be disjoint, got {args.sets}")
    overrides = {**parse_overrides(args.set), "seeds": every, "workdir": args.workdir}
    numerics.apply_from_params(args.params, overrides)  # before torch loads
    cfg = load_config(args.params, overrides)
    lay = Layout(Path(args.workdir))

    t0 = time.perf_counter()
    steps.prepare(cfg, lay.prepared)
    for loss_id in cfg.loss_ids():
        for seed in every:
            steps.train(cfg, loss_id, seed, lay.prepared, lay.train(loss_id, seed))
            steps.calibrate(
                cfg, loss_id, seed, lay.train(loss_id, seed), lay.prepared, lay.calibrate(loss_id, seed)
            )
            steps.evaluate(
                cfg,
                loss_id,
                seed,
                lay.calibrate(loss_id, seed),
                lay.prepared,
                lay.evaluate(loss_id, seed),
                plots=False,
            )
            print(
                f"{loss_id} seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True
            )

    reports = []
    for group in seed_sets:
        sub = load_config(args.params, {**overrides, "seeds": group})
        evaluated = steps.collect(sub, lay.evaluate, lay.prepared)
        metrics = {k: [e.metrics for e in evaluated if e.loss == k] for k in sub.loss_ids()}
        samples = {k: [steps.load_samples(lay.evaluate(k, s)) for s in group] for k in sub.loss_ids()}
        reports.append(steps.gate(sub, metrics, samples))

    names = [",".join(map(str, g)) for g in seed_sets]
    print(
        f"\nGate decisions on disjoint seed sets (confidence {cfg.gate.confidence}, FPR95 over {cfg.gate.fpr95.over!r})\n"
    )
    print("| candidate | " + " | ".join(f"seeds {n}" for n in names) + " | agree |")
    print("|---|" + "---|" * (len(names) + 1))
    agree_all = True
    for loss_id in cfg.candidates():
        verdicts = ["PROMOTE" if r.decisions[loss_id].promote else "reject" for r in reports]
        agree = len(set(verdicts)) == 1
        agree_all &= agree
        print(f"| {loss_id} | " + " | ".join(verdicts) + f" | {'yes' if agree else 'NO'} |")
    if cfg.gate.confidence is not None:
        _print_evidence(cfg.candidates(), names, reports)
    print(f"\nall decisions agree: {'yes' if agree_all else 'NO'}; total {time.perf_counter() - t0:.0f} s")
    return 0 if agree_all else 1


def _print_evidence(candidates: list[str], names: list[str], reports: list[steps.GateReport]) -> None:
    print("\nOne-sided p-value of each improvement (gain / lower bound), per seed set\n")
    for loss_id in candidates:
        for name, r in zip(names, reports):
            ev = r.decisions[loss_id].evidence
            metrics_ = sorted({k.split("/", 1)[1].rsplit("/", 1)[0] for k in ev})
            cells = [
                f"{m}: p={ev[f'gate/{m}/p_value']:.3g} ({ev[f'gate/{m}/gain']:+.4f} / {ev[f'gate/{m}/lower']:+.4f})"
                for m in metrics_
            ]
            print(f"- {loss_id}, seeds {name}: " + "; ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
