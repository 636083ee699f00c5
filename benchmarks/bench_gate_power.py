"""How often the gate promotes simulated candidates whose truth is known, by evidence and test-set size.

The simulation (:mod:`simulation`) has the embedded default's OOD sets (2,000 near and
3 x 1,000 far images); the test set has 600 (the demo), 2,000 or 10,000 images (CIFAR-10's). Effects
against the SoftMax baseline's population metrics (accuracy 0.972, calibrated ECE 0.007, mean FPR95
0.71), :data:`simulation.MODEL_EFFECTS`:

- ``identical``: the baseline's metrics (another model with the same population metrics);
- ``dismax-like``: accuracy +1 point, calibrated ECE -0.005, FPR95 30% lower (the DisMax paper's claim);
- ``fpr95 lower``: the baseline's accuracy and ECE, FPR95 30% lower (a claim of "OOD better at equal
  accuracy": the literal rule asks accuracy and ECE better too, about a coin's chance);
- ``worse accuracy``: accuracy -1 point (twice the tolerance) with FPR95 30% lower.

Evidence ``models``: the two deployable models, fixed, scored on freshly drawn images (the question
``gate.evidence: models`` answers). Evidence ``seeds``: ``n`` seeds of each loss, each seed's model
drawn with the demo's seed-to-seed noise around the effect (``gate.evidence: seeds``). Beside each
seed-level rate, the number of seeds :func:`oodgate.deciding.gate.seeds_needed` predicts for 80%, from the
effect's mean gains and the simulated seed spread.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gate_power.py            # make bench-gate-power
    PYTHONPATH=. .venv/bin/python benchmarks/bench_gate_power.py --draws 100 --samples 200

Last, the run-level error rate with 1, 3 and 5 null candidates, with Holm's step-down and without.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from oodgate.base import numerics

numerics.apply()  # before NumPy loads: the same rates on any machine

# the simulated models live with their other users, the gate's tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import simulation

from oodgate.base.config import GateConfig
from oodgate.deciding.gate import seeds_needed

EFFECTS = ("identical", "dismax-like", "fpr95 lower", "worse accuracy")
SIZES = (600, 2000, 10_000)


def family(name: str) -> simulation.Family:
    return simulation.BASELINE if name == "identical" else simulation.MODEL_EFFECTS[name]


def predicted_seeds(name: str, world: simulation.World, gate: GateConfig) -> int | None:
    """:func:`seeds_needed` for the effect's criteria at the simulated seed spread (the recipe's
    number: the largest over the three criteria)."""
    cand = simulation.describe(family(name), 150, world)
    base = simulation.describe(simulation.BASELINE, 150, world)
    needs = []
    for key, higher, c in (
        ("test/accuracy", True, gate.accuracy),
        ("test/ece", False, gate.ece),
        ("ood/mean/fpr95", False, gate.fpr95),
    ):
        gain = cand[key][0] - base[key][0] if higher else base[key][0] - cand[key][0]
        n = seeds_needed(gain, c.bound, cand[key][1] ** 2, base[key][1] ** 2, 0.0, gate.confidence)
        needs.append(n)
    return None if None in needs else max(needs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--samples", type=int, default=1000, help="the gate's bootstrap resamples")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print("Population metrics of the fixed models (200,000 test and 500,000 OOD images):")
    print("| effect | skill | separation | overconfidence | accuracy | calibrated ECE | mean FPR95 |")
    print("|---|---|---|---|---|---|---|")
    for name in EFFECTS:
        f, m = family(name), simulation.population(family(name))
        print(
            f"| {name} | {f.skill} | {f.separation} | {f.overconfidence} | "
            + " | ".join(f"{m[k]:.4f}" for k in simulation.KEYS)
            + " |"
        )
    models, seeds = GateConfig(samples=args.samples), GateConfig(samples=args.samples, evidence="seeds")
    head = (
        ["effect", "test images", "models"]
        + [f"seeds, {n}" for n in args.seeds]
        + ["seeds for 80% (predicted)"]
    )
    print(f"\nPromotion rate over {args.draws} draws (confidence 0.95, {args.samples} resamples):")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in EFFECTS:
        for size in args.sizes:
            world = simulation.World(n_test=size)
            cells = [f"{simulation.model_rate(family(name), models, args.draws, world=world).promoted:.3f}"]
            for n in args.seeds:
                r = simulation.promotion_rate(family(name), seeds, args.draws, n, world=world)
                cells.append(f"{r.promoted:.3f}")
            need = predicted_seeds(name, world, models) if name != "identical" else None
            cells.append(str(need) if need is not None else "-")
            print(f"| {name} | {size:,} | " + " | ".join(cells) + " |", flush=True)
    print(
        "\nOne error rate per run: candidates whose FPR95 equals the baseline's (a true null) and which beat"
        " it far on accuracy and ECE, so that FPR95's test alone decides each; how often a run promotes any"
        f" ({args.draws} runs of the demo's images):"
    )
    print("| candidates | promotes any, Holm (the gate) | promotes any, each tested alone at 5% |")
    print("|---|---|---|")
    for k in (1, 3, 5):
        null = {f"c{i}": simulation.MODEL_EFFECTS["fpr95 equal"] for i in range(k)}
        r = simulation.run_rates(null, models, args.draws)
        print(f"| {k} | {r['any']:.3f} | {r['any unadjusted']:.3f} |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
