"""Command line: ``python -m oodgate <step>``; each step is a thin wrapper over ``oodgate.steps``.

These are the commands of the DVC stages in ``dvc.yaml``; ``run`` chains them in one process as the
core library's own train-and-evaluate entry point (no Prefect, no MLflow).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from oodgate.config import Config, ConfigError, load_config
from oodgate.layout import Layout


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.epochs=2", "seeds=[0,1]"]`` -> ``{"train.epochs": 2, "seeds": [0, 1]}`` (YAML values)."""
    import yaml

    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.params, parse_overrides(args.set))


def cmd_materialize(args: argparse.Namespace) -> int:
    from oodgate.data import materialize_embedded

    for p in materialize_embedded(args.root):
        print(p)
    return 0


def cmd_prepare(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    from oodgate import steps

    summary = steps.prepare(cfg, lay.prepared)
    print(f"prepared {summary['sizes']} -> {lay.prepared}")
    return 0


def _losses(cfg: Config, args: argparse.Namespace) -> list[str]:
    if args.loss is None:
        return cfg.loss_ids()
    if args.loss not in cfg.losses:
        raise ConfigError(
            f"--loss {args.loss!r} is not a key of losses in params.yaml: {', '.join(cfg.losses)}"
        )
    return [args.loss]


# ---------------------------------------------------------------- curve data for `dvc plots`
def curves_dir(lay: Layout, kind: str, loss_id: str) -> Path:
    """``<workdir>/curves/<kind>/<loss>/``: files of one shape per directory, so that ``dvc.yaml`` can give
    each directory its axes (the step directories hold curves next to checkpoints and samples)."""
    return lay.workdir / "curves" / kind / loss_id


def _fresh_dir(path: Path) -> Path:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def write_training_curves(lay: Layout, loss_id: str, seeds: list[int]) -> None:
    """``curves/training/<loss>/seed<k>.json``: a copy of each seed's ``history.json``."""
    import shutil

    out = _fresh_dir(curves_dir(lay, "training", loss_id))
    for seed in seeds:
        shutil.copyfile(lay.train(loss_id, seed) / "history.json", out / f"seed{seed}.json")


def write_evaluation_curves(lay: Layout, loss_id: str, seeds: list[int]) -> None:
    """``curves/roc/<loss>/seed<k>_<set>.csv`` (copies of ``roc_<set>.csv``: fpr, tpr) and
    ``curves/reliability/<loss>/seed<k>_{calibrated,uncalibrated}.csv`` (the non-empty bins of
    ``reliability.csv``: confidence, accuracy, count)."""
    import csv
    import shutil

    roc = _fresh_dir(curves_dir(lay, "roc", loss_id))
    rel = _fresh_dir(curves_dir(lay, "reliability", loss_id))
    for seed in seeds:
        plots = lay.evaluate(loss_id, seed) / "plots"
        for src in sorted(plots.glob("roc_*.csv")):
            shutil.copyfile(src, roc / f"seed{seed}_{src.stem.removeprefix('roc_')}.csv")
        with (plots / "reliability.csv").open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["count"]) > 0]
        for flag, name in (("True", "calibrated"), ("False", "uncalibrated")):
            with (rel / f"seed{seed}_{name}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["confidence", "accuracy", "count"])
                kept = [r for r in rows if r["calibrated"] == flag]
                w.writerows((r["confidence"], r["accuracy"], r["count"]) for r in kept)


def cmd_train(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    from oodgate import steps

    for loss_id in _losses(cfg, args):
        for seed in cfg.seeds:
            out = steps.train(
                cfg, loss_id, seed, lay.prepared, lay.train(loss_id, seed), progress=not args.quiet
            )
            print(
                f"train {loss_id} seed {seed}: best epoch {out['best_epoch']}, "
                f"val acc {out['best_val_accuracy']:.4f}, {out['train_seconds']:.1f} s on {out['device']}"
            )
        write_training_curves(lay, loss_id, cfg.seeds)
    return 0


def cmd_calibrate(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    from oodgate import steps

    for loss_id in _losses(cfg, args):
        for seed in cfg.seeds:
            out = steps.calibrate(cfg, lay.train(loss_id, seed), lay.prepared, lay.calibrate(loss_id, seed))
            print(
                f"calibrate {loss_id} seed {seed}: T={out['calibration/temperature']:.4f} "
                f"val ECE {out['val/ece_uncalibrated']:.4f} -> {out['val/ece']:.4f}"
            )
    return 0


def cmd_evaluate(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    from oodgate import evaluation, steps

    for loss_id in _losses(cfg, args):
        reports = []
        for seed in cfg.seeds:
            out = steps.evaluate(cfg, lay.calibrate(loss_id, seed), lay.prepared, lay.evaluate(loss_id, seed))
            reports.append(out["metrics"])
        mean, std = evaluation.aggregate(reports)
        steps.write_json(lay.metrics(loss_id), {"mean": mean, "std": std, "seeds": list(cfg.seeds)})
        write_evaluation_curves(lay, loss_id, cfg.seeds)
        print(
            f"evaluate {loss_id}: acc {mean['test/accuracy']:.4f} ECE {mean['test/ece']:.4f} "
            f"mean FPR95 {mean.get('ood/mean/fpr95', float('nan')):.4f}"
        )
    return 0


def cmd_gate(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    from oodgate import steps

    metrics, samples = {}, {}
    for loss_id in cfg.loss_ids():
        metrics[loss_id] = [steps.read_json(lay.evaluate(loss_id, s) / "metrics.json") for s in cfg.seeds]
        if cfg.gate.bootstrap.enabled:
            samples[loss_id] = [steps.load_samples(lay.evaluate(loss_id, s)) for s in cfg.seeds]
    trained = {
        k: [steps.read_json(lay.train(k, s) / "train.json") for s in cfg.seeds] for k in cfg.loss_ids()
    }
    report = steps.gate(
        cfg,
        metrics,
        samples or None,
        scores={k: t[0]["score"] for k, t in trained.items()},
    )  # no training seconds: report.md is versioned, and a re-run must write the same bytes
    gate_json = {
        "promoted": len(report["promoted"]),
        "best": report["best"],
        "decisions": report["decisions"],
    }
    steps.write_json(lay.gate, gate_json)
    text = f"{report['table']}\n\n{steps.gate_markdown(report)}\nBest promoted: {report['best'] or 'none'}\n"
    lay.report.write_text(text)
    print(text)
    return 0


def cmd_run(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    for fn in (cmd_prepare, cmd_train, cmd_calibrate, cmd_evaluate, cmd_gate):
        fn(cfg, lay, args)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "calibrate": cmd_calibrate,
    "evaluate": cmd_evaluate,
    "gate": cmd_gate,
    "run": cmd_run,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oodgate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "materialize", help="write the embedded default data (MNIST-5k, photo patches) to data/"
    )
    m.add_argument("--root", default="data")
    for name in COMMANDS:
        s = sub.add_parser(name, help=f"the {name} step" if name != "run" else "all steps in one process")
        s.add_argument("--params", default="params.yaml")
        s.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a params key, e.g. train.epochs=2"
        )
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in ("train", "calibrate", "evaluate", "run"):
            s.add_argument("--loss", default=None, help="one loss id from params.yaml (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "materialize":
            return cmd_materialize(args)
        cfg = _config(args)
        from oodgate.runtime import configure_determinism

        configure_determinism()
        return COMMANDS[args.command](cfg, Layout(Path(cfg.workdir)), args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
