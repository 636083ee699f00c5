"""Every loss under every one of its method's scores: test FPR95 (near, far, mean over the seeds),
the score ``auto`` chose on the validation OOD sets, and what the prototype heads learned.

Reads the evaluations of ``python -m oodgate run`` or ``dvc repro`` (the fixed layout under the
work directory: ``make repro`` first), or of a seed set of ``bench_stability.py`` (``--sets-dir``):
every evaluation reports each candidate score's test figures under ``scores/<score>/...`` beside
the chosen one's. For the prototype heads it also prints, from the trained checkpoints, the last
epoch's prototype norm and cosine with their start, and the mean cosine between each test image's
feature and its own class's prototype.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_scores.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_scores.py --workdir artifacts/stability --sets-dir artifacts/stability/sets/3-4-5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oodgate.base import numerics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--workdir", default=None, help="where the trained models are (default: params.yaml's)")
    p.add_argument("--sets-dir", default=None, help="a seed set's select/ and evaluate/ (bench_stability)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: params.yaml's)")
    args = p.parse_args(argv)
    numerics.apply_from_params(args.params)  # before torch loads
    import numpy as np
    import torch

    from oodgate.base.config import load_config
    from oodgate.learning import methods
    from oodgate.learning.classifier import load_classifier
    from oodgate.running import steps
    from oodgate.running.layout import Layout

    cfg = load_config(args.params)
    lay = Layout(Path(args.workdir or cfg.workdir))
    runs = Path(args.sets_dir) if args.sets_dir else lay.workdir
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(cfg.seeds)
    print(
        f"Test FPR95 (mean ± sd over seeds {','.join(map(str, seeds))}): near / far / mean; ** = chosen by auto\n"
    )
    print("| loss | score | near FPR95 | far FPR95 | mean FPR95 | validation FPR95 |")
    print("|---|---|---|---|---|---|")
    for loss_id, loss in cfg.losses.items():
        choice = json.loads((runs / "select" / loss_id / "choice.json").read_text())
        by_seed = [
            json.loads((runs / "evaluate" / loss_id / f"seed{s}" / "metrics.json").read_text()) for s in seeds
        ]
        head = methods.METHODS.get(loss.method)
        for score in head.scores:
            cells = []
            for group in ("near", "far", "mean"):
                v = [m[f"scores/{score}/ood/{group}/fpr95"] for m in by_seed]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}")
            val = choice["validation"].get(score, [float("nan")])[0]
            mark = "**" if score == choice["score"] else ""
            default = " (default)" if score == head.default_score else ""
            print(f"| {loss_id} | {mark}{score}{mark}{default} | " + " | ".join(cells) + f" | {val:.3f} |")

    print(
        "\nPrototype heads: the last epoch's prototypes, and the test features against them (mean over seeds)\n"
    )
    print("| loss | prototype norm | cosine with the start (min) | test feature · own prototype (cosine) |")
    print("|---|---|---|---|")
    bundle = steps.load_prepared(lay.prepared, with_ood=False)
    for loss_id, loss in cfg.losses.items():
        if loss.method not in ("isomax", "isomax_plus", "dismax"):
            continue
        norms, starts, own = [], [], []
        for s in seeds:
            record = json.loads((lay.train(loss_id, s) / "train.json").read_text())["prototypes"]
            norms.append(record["norm"])
            starts.append(record.get("cosine_min", float("nan")))
            model = load_classifier(lay.train(loss_id, s) / "best.pt").eval()
            with torch.no_grad():
                x = bundle.test.x.float() / 255.0
                f = model.features(x)
                proto = model.head.prototypes[bundle.test.y]
                own.append(float(torch.nn.functional.cosine_similarity(f, proto, dim=1).mean()))
        # IsoMax's prototypes start at 0, which has no direction: no cosine with the start
        start = f"{np.nanmin(starts):.3f}" if not np.isnan(starts).all() else "- (starts at 0)"
        print(f"| {loss_id} | {np.mean(norms):.2f} | {start} | {np.mean(own):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
