"""Decision stability: does the gate decide the same on disjoint sets of seeds?

Trains every loss of ``params.yaml`` with each seed of the disjoint sets (default {0,1,2}, {3,4,5},
{6,7,8}) with the core library (the steps of ``python -m oodgate run``, no Prefect, no MLflow),
then, for each seed set on its own, chooses every loss's score, evaluates and gates, and prints per
candidate the decision on each set and whether they agree; the scores chosen; the deployable seed
against the test-best seeds; then the per-criterion p-values. With ``gate.evidence: seeds`` the
target is every candidate decided the same on every set (the exit status says); with ``models``
each set judges its own deployable models, and the table shows how much that depends on the seeds.

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

from oodgate.base import numerics

if __name__ == "__main__":  # this process trains: the numerics of --params/--set, before torch loads
    numerics.apply_from_argv(sys.argv[1:])

from oodgate.base.config import load_config, parse_overrides
from oodgate.running import steps
from oodgate.running.layout import Layout


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
    numerics.apply_from_params(args.params, overrides)  # the same numerics, or a clear refusal
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
            print(
                f"{loss_id} seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True
            )

    # each seed set is a run of its own: its scores are chosen over its seeds, its models evaluated
    reports, choices = [], []
    names = [",".join(map(str, g)) for g in seed_sets]
    for name, group in zip(names, seed_sets):
        sub = load_config(args.params, {**overrides, "seeds": group})
        runs = Path(args.workdir) / "sets" / name.replace(",", "-")

        def evaluate_dir(loss_id: str, seed: int, runs: Path = runs) -> Path:
            return runs / "evaluate" / loss_id / f"seed{seed}"

        chosen = {}
        for loss_id in sub.loss_ids():
            select_dir = runs / "select" / loss_id
            calibrated = {s: lay.calibrate(loss_id, s) for s in group}
            chosen[loss_id] = steps.select(sub, loss_id, calibrated, lay.prepared, select_dir).choice["text"]
            for seed in group:
                steps.evaluate(
                    sub,
                    loss_id,
                    seed,
                    lay.calibrate(loss_id, seed),
                    lay.prepared,
                    evaluate_dir(loss_id, seed),
                    select_dir,
                    plots=False,
                )
        choices.append(chosen)
        evaluated = steps.collect(sub, evaluate_dir, lay.prepared)
        metrics = {k: [e.metrics for e in evaluated if e.loss == k] for k in sub.loss_ids()}
        samples = {k: [steps.load_samples(evaluate_dir(k, s)) for s in group] for k in sub.loss_ids()}
        reports.append(steps.gate(sub, metrics, samples))

    print(
        f"\nGate decisions on disjoint seed sets (evidence {cfg.gate.evidence}, confidence {cfg.gate.confidence}, "
        f"FPR95 over {cfg.gate.fpr95.over!r})\n"
    )
    print("| candidate | " + " | ".join(f"seeds {n}" for n in names) + " | agree |")
    print("|---|" + "---|" * (len(names) + 1))
    agree_all = True
    for loss_id in cfg.candidates():
        verdicts = ["PROMOTE" if r.decisions[loss_id].promote else "reject" for r in reports]
        agree = len(set(verdicts)) == 1
        agree_all &= agree
        print(f"| {loss_id} | " + " | ".join(verdicts) + f" | {'yes' if agree else 'NO'} |")
    _print_choices(cfg.loss_ids(), names, choices, reports)
    if cfg.gate.confidence is not None:
        _print_evidence(cfg.candidates(), names, reports)
    print(f"\nall decisions agree: {'yes' if agree_all else 'NO'}; total {time.perf_counter() - t0:.0f} s")
    # Seed-level evidence judges the recipe, so its decision should not depend on the seed set; the
    # model-level evidence judges each set's own deployable models, which differ from set to set.
    return 0 if agree_all or cfg.gate.evidence == "models" else 1


def _print_choices(
    losses: list[str], names: list[str], choices: list[dict[str, str]], reports: list[steps.GateReport]
) -> None:
    """What ``score: auto`` chose per seed set, and the deployable seed against the test-best seeds
    (information: the choice is made on validation data, and the test is not its target)."""
    print("\nOOD score per seed set (score: auto, chosen on the validation OOD sets)\n")
    print("| loss | " + " | ".join(f"seeds {n}" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for loss_id in losses:
        print(f"| {loss_id} | " + " | ".join(c[loss_id] for c in choices) + " |")
    print("\nDeployable seed (lowest calibrated validation NLL) against the test-best seed of its set\n")
    print("| loss | seed set | chosen | test-best by accuracy | test-best by mean FPR95 |")
    print("|---|---|---|---|---|")
    hits = {"acc": 0, "fpr": 0}
    total = 0
    for loss_id in losses:
        for name, r in zip(names, reports):
            seeds = [int(x) for x in name.split(",")]
            chosen = r.models[loss_id].seed
            per = dict(zip(seeds, r.per_seed[loss_id]))
            best_acc = [
                s for s in seeds if per[s]["test/accuracy"] == max(per[x]["test/accuracy"] for x in seeds)
            ]
            best_fpr = [
                s for s in seeds if per[s]["ood/mean/fpr95"] == min(per[x]["ood/mean/fpr95"] for x in seeds)
            ]
            hits["acc"] += chosen in best_acc
            hits["fpr"] += chosen in best_fpr
            total += 1
            print(
                f"| {loss_id} | {name} | {chosen} | {', '.join(map(str, best_acc))} | {', '.join(map(str, best_fpr))} |"
            )
    print(
        f"\nThe chosen seed was a test-best by accuracy in {hits['acc']} of {total}, by mean FPR95 in "
        f"{hits['fpr']} of {total} (chance with 3 seeds and no ties: 1 in 3)"
    )


def _print_evidence(candidates: list[str], names: list[str], reports: list[steps.GateReport]) -> None:
    print("\nOne-sided p-value of each improvement (gain / lower bound), per seed set\n")
    for loss_id in candidates:
        for name, r in zip(names, reports):
            ev = r.decisions[loss_id].evidence
            metrics_ = sorted({k.split("/", 1)[1].rsplit("/", 1)[0] for k in ev if k.count("/") > 2})
            cells = [
                f"{m}: p={ev[f'gate/{m}/p_value']:.3g} ({ev[f'gate/{m}/gain']:+.4f} / {ev[f'gate/{m}/lower']:+.4f})"
                for m in metrics_
            ]
            run = (
                f"; for the run, Holm-adjusted p={ev['gate/p_adjusted']:.3g}"
                if "gate/p_adjusted" in ev
                else ""
            )
            print(f"- {loss_id}, seeds {name}: " + "; ".join(cells) + run)


if __name__ == "__main__":
    sys.exit(main())
