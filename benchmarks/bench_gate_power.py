"""How often the gate promotes simulated candidates whose truth is known, against the number of seeds.

The simulation (:mod:`oodgate.simulation`) has the embedded default's sizes and seed-to-seed noise.
Candidates: ``identical`` (the baseline's distribution), ``papers`` (the papers' typical effect:
the baseline's accuracy and ECE, mean FPR95 30% lower), ``worse accuracy`` (accuracy lower by twice
the default tolerance, 0.01, with the papers' FPR95). For each number of seeds it prints the
promotion rate under the default rule (``gate.better_means: true``) and without the better-means
requirement, over ``--draws`` simulated runs.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gate_power.py            # make bench-gate-power
    PYTHONPATH=. .venv/bin/python benchmarks/bench_gate_power.py --seeds 3 5 10 --draws 200
"""

from __future__ import annotations

import argparse
import sys
import time

from oodgate import numerics

numerics.apply()  # before NumPy loads: the same rates on any machine

from oodgate import simulation  # noqa: E402
from oodgate.config import GateConfig  # noqa: E402


def candidates() -> dict[str, simulation.Family]:
    base = simulation.BASELINE
    fpr = simulation.describe(base, 150)["ood/mean/fpr95"][0]
    papers = simulation.Family(base.skill, simulation.separation_for_fpr95(0.7 * fpr), base.overconfidence)
    acc = simulation.describe(base, 150)["test/accuracy"][0]
    worse = simulation.Family(
        simulation.skill_for_accuracy(acc - 0.01), papers.separation, base.overconfidence
    )
    return {"identical": base, "papers": papers, "worse accuracy": worse}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--samples", type=int, default=1000, help="the gate's bootstrap resamples")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cands = candidates()
    print("Simulated families (mean ± seed sd over 150 models):")
    print("| family | skill | separation | accuracy | calibrated ECE | mean FPR95 |")
    print("|---|---|---|---|---|---|")
    for name, f in {"baseline": simulation.BASELINE, **cands}.items():
        m = simulation.describe(f, 150)
        cells = " | ".join(f"{m[k][0]:.4f} ± {m[k][1]:.4f}" for k in simulation.KEYS)
        print(f"| {name} | {f.skill} | {f.separation} | {cells} |")
    rules = {
        "default rule": GateConfig(samples=args.samples),
        "without better means": GateConfig(samples=args.samples, better_means=False),
    }
    print(f"\nPromotion rate over {args.draws} draws (confidence 0.95; per criterion: acc / ECE / FPR95):")
    print("| candidate | seeds | " + " | ".join(rules) + " |")
    print("|---|---|" + "---|" * len(rules))
    for name, family in cands.items():
        for seeds in args.seeds:
            cells = []
            for gate in rules.values():
                r = simulation.promotion_rate(family, gate, draws=args.draws, seeds=seeds)
                per = " / ".join(f"{r.criteria[k]:.2f}" for k in simulation.KEYS)
                cells.append(f"{r.promoted:.3f} ({per})")
            print(f"| {name} | {seeds} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
