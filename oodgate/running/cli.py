"""Command line: ``python -m oodgate <step>``; each step is a thin wrapper over ``oodgate.running.steps``.

These are the commands of the DVC stages in ``dvc.yaml``; ``run`` chains them in one process as the
core library's own train-and-evaluate entry point (no Prefect, no MLflow).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as td
import yaml

from oodgate.base import numerics
from oodgate.base.config import Config, ConfigError, load_config, parse_overrides
from oodgate.base.files import is_no_space, no_space_error, read_json, write_text
from oodgate.base.numerics import NumericsError
from oodgate.base.records import CorruptResultError, StaleResultError
from oodgate.data.embedded import materialize_embedded, write_digit_folder
from oodgate.learning.training import engine
from oodgate.running import steps
from oodgate.running.layout import Layout
from oodgate.running.preflight import preflight
from oodgate.running.steps.gate_step import GateReport
from oodgate.running.steps.inputs import prepare_inputs, write_inputs
from oodgate.running.steps.reuse import STEPS, differences, explain


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.params, parse_overrides(args.set))


def cmd_materialize(args: argparse.Namespace) -> int:
    if args.folder:
        n = write_digit_folder(args.folder)
        print(f"{n} PNG images in {args.folder}/<digit>/")
        return 0
    for p in materialize_embedded(args.root):
        print(p)
    return 0


def cmd_prepare(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
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


def _seeds(cfg: Config, args: argparse.Namespace) -> list[int]:
    if args.seed is None:
        return list(cfg.seeds)
    if args.seed not in cfg.seeds:
        raise ConfigError(f"--seed {args.seed} is not in seeds in params.yaml: {list(cfg.seeds)}")
    return [args.seed]


def _runs(cfg: Config, args: argparse.Namespace) -> list[tuple[str, int]]:
    return [(loss_id, seed) for loss_id in _losses(cfg, args) for seed in _seeds(cfg, args)]


# ---------------------------------------------------------------- curve data for `dvc plots`
def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def write_training_curve(lay: Layout, loss_id: str, seed: int) -> None:
    """``curves/training/<loss>/seed<k>.json``: a copy of the run's ``history.json``."""
    out = lay.curves("training", loss_id, seed).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lay.train(loss_id, seed) / "history.json", out)


def write_evaluation_curves(lay: Layout, loss_id: str, seed: int) -> None:
    """``curves/roc/<loss>/seed<k>/<set>.csv`` (copies of ``roc_<set>.csv``: fpr, tpr) and
    ``curves/reliability/<loss>/seed<k>/{calibrated,uncalibrated}.csv`` (the non-empty bins of
    ``reliability.csv``: confidence, accuracy, count)."""
    roc = _fresh_dir(lay.curves("roc", loss_id, seed))
    rel = _fresh_dir(lay.curves("reliability", loss_id, seed))
    plots = lay.evaluate(loss_id, seed) / "plots"
    for src in sorted(plots.glob("roc_*.csv")):
        shutil.copyfile(src, roc / f"{src.stem.removeprefix('roc_')}.csv")
    with (plots / "reliability.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["count"]) > 0]
    for flag, name in (("True", "calibrated"), ("False", "uncalibrated")):
        with (rel / f"{name}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["confidence", "accuracy", "count"])
            kept = [r for r in rows if r["calibrated"] == flag]
            w.writerows((r["confidence"], r["accuracy"], r["count"]) for r in kept)


def cmd_inputs(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    written = write_inputs(cfg, lay.inputs)
    print(f"inputs: {len(written)} records -> {lay.inputs}")
    return 0


def cmd_train(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    for loss_id, seed in _runs(cfg, args):
        hooks = () if args.quiet else (engine.ProgressBar(),)
        t = steps.train(cfg, loss_id, seed, lay.prepared, lay.train(loss_id, seed), hooks)
        print(
            f"train {loss_id} seed {seed}: best epoch {t.best_epoch}, "
            f"val acc {t.best_val_accuracy:.4f}, {t.train_seconds:.1f} s on {t.device}"
        )
        write_training_curve(lay, loss_id, seed)
    return 0


def cmd_calibrate(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    for loss_id, seed in _runs(cfg, args):
        c = steps.calibrate(
            cfg, loss_id, seed, lay.train(loss_id, seed), lay.prepared, lay.calibrate(loss_id, seed)
        )
        print(
            f"calibrate {loss_id} seed {seed}: T={c.temperature:.4f} "
            f"val ECE {c.metrics['val/ece_uncalibrated']:.4f} -> {c.metrics['val/ece']:.4f}"
        )
    return 0


def cmd_select(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    """Each loss's OOD score, chosen on validation data over all its seeds' calibrated models."""
    for loss_id in _losses(cfg, args):
        calibrated = {s: lay.calibrate(loss_id, s) for s in cfg.seeds_of(loss_id)}
        chosen = steps.select(cfg, loss_id, calibrated, lay.prepared, lay.select(loss_id))
        print(f"select {loss_id}: {chosen.choice['text']}")
    return 0


def cmd_evaluate(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    for loss_id, seed in _runs(cfg, args):
        e = steps.evaluate(
            cfg,
            loss_id,
            seed,
            lay.calibrate(loss_id, seed),
            lay.prepared,
            lay.evaluate(loss_id, seed),
            lay.select(loss_id),
        )
        steps.write_json(lay.metrics(loss_id, seed), e.metrics)
        write_evaluation_curves(lay, loss_id, seed)
        m = e.metrics
        print(
            f"evaluate {loss_id} seed {seed}: acc {m['test/accuracy']:.4f} ECE {m['test/ece']:.4f} "
            f"mean FPR95 {m.get('ood/mean/fpr95', float('nan')):.4f}"
        )
    return 0


def _gate_report(cfg: Config, lay: Layout) -> GateReport:
    evaluated = steps.collect(cfg, lay.evaluate, lay.prepared)  # refuses a stale evaluation
    metrics: dict[str, list[dict[str, float]]] = {k: [] for k in cfg.loss_ids()}
    for e in evaluated:
        metrics[e.loss].append(e.metrics)
    samples = None
    if cfg.gate.confidence is not None:
        samples = {k: [steps.load_samples(lay.evaluate(k, s)) for s in cfg.seeds] for k in cfg.loss_ids()}
    scores = {e.loss: e.score_choice for e in evaluated}
    return steps.gate(cfg, metrics, samples, scores=scores)


def _gate_text(report: GateReport) -> str:
    return (
        f"{steps.gate_markdown(report)}\nBest promoted: {report.best or 'none'}\n"
        f"The run's best candidate (the challenger): {report.challenger or 'none'}\n"
    )


def cmd_gate(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    report = _gate_report(cfg, lay)
    # no training seconds: report.md is versioned, and a re-run must write the same bytes
    steps.write_json(lay.gate, report.record())
    text = f"{report.table}\n\n{_gate_text(report)}"
    write_text(lay.report, text)
    print(text)
    return 0


def _selection(cfg: Config, args: argparse.Namespace) -> tuple[Config, str | None]:
    """The config restricted to ``--loss``/``--seed``, and why those results cannot be gated (None:
    they can). The gate compares candidates with the baseline over the seeds, so a selection without
    the baseline, without a candidate, or with too few seeds for ``gate.confidence`` is not gated."""
    losses, seeds = _losses(cfg, args), _seeds(cfg, args)
    sub = cfg.model_copy(update={"losses": {k: cfg.losses[k] for k in losses}, "seeds": seeds})
    if cfg.gate.baseline not in losses:
        return sub, f"the baseline {cfg.gate.baseline!r} is not among --loss {args.loss}"
    if len(losses) < 2:
        return sub, f"only the baseline {cfg.gate.baseline!r} was run: there is no candidate to compare"
    if cfg.gate.evidence == "seeds" and cfg.gate.confidence is not None and len(seeds) < 2:
        return sub, (
            f"the seed-level evidence at gate.confidence {cfg.gate.confidence} needs at least 2 seeds, "
            f"--seed {args.seed} gives 1 (--set gate.evidence=models compares the models on the same "
            "images, --set gate.confidence=null the means)"
        )
    return sub, None


def cmd_run(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    """Every step for the selected losses and seeds; the gate over what was run (the whole config:
    ``gate.json`` and ``report.md``; a selection: printed only, or why it cannot be gated)."""
    t0 = time.perf_counter()
    # a --loss/--seed selection runs every step on it: the score is chosen over the seeds run
    sub, why_not = _selection(cfg, args)
    run_cfg = cfg if args.loss is None and args.seed is None else sub
    for fn in (cmd_prepare, cmd_train, cmd_calibrate, cmd_select, cmd_evaluate):
        fn(run_cfg, lay, args)
    if args.loss is None and args.seed is None:
        cmd_gate(cfg, lay, args)
    else:
        if why_not is not None:
            print(f"gate: not run: {why_not}; run every loss and seed of params.yaml to gate them")
        else:
            report = _gate_report(sub, lay)
            print(
                f"{report.table}\n\n{_gate_text(report)}(--loss/--seed selection: not written to {lay.gate})"
            )
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _prepared_for(cfg: Config, lay: Layout, args: argparse.Namespace) -> None:
    """``lay.prepared`` holds the data the current config prepares: prepared now when it is missing
    (the Prefect flow keeps its own under ``<workdir>/cache/``); refused, naming what changed, when
    it was prepared from other inputs (another class selection, split, ... or prepare code), so
    that nothing is ever imported on stale data."""
    summary = lay.prepared / "data.json"
    if not summary.is_file():
        cmd_prepare(cfg, lay, args)
        return
    fix = "prepare it again with `python -m oodgate prepare` (or `dvc repro prepare`)"
    if args.params != "params.yaml":  # dvc repro reads params.yaml only
        fix = f"prepare it again with `python -m oodgate prepare --params {args.params}`"
    try:
        recorded = read_json(summary)
    except (OSError, ValueError) as e:
        raise StaleResultError(f"prepared data: {str(summary)!r} cannot be read ({e}); {fix}") from None
    recorded = recorded.get("inputs") if isinstance(recorded, dict) else None
    if recorded is None:
        raise StaleResultError(
            f"prepared data: {str(summary)!r} does not record the inputs it was prepared from (an older "
            f"oodgate wrote it), so it may not match {args.params}; {fix}"
        )
    changed = differences(recorded, prepare_inputs(cfg))
    if changed:
        raise StaleResultError(
            f"prepared data: {str(summary)!r} does not match {args.params}: it was prepared from other "
            f"inputs ({'; '.join(changed)}); {fix}"
        )


def cmd_import(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    """The train step of the losses that import a checkpoint (``losses.<id>.checkpoint``), on the
    prepared data of the current config (prepared here if there is none)."""
    imported = [k for k in _losses(cfg, args) if cfg.losses[k].checkpoint is not None]
    if not imported:
        raise ConfigError(
            "no loss imports a checkpoint: add e.g. checkpoint: {path: data/models/mine_{seed}.pt, format: torchvision} "
            "to a loss in params.yaml (see the README, Bring your own model)"
        )
    _prepared_for(cfg, lay, args)
    for loss_id in imported:
        for seed in _seeds(cfg, args):
            if seed not in cfg.seeds_of(loss_id):
                continue
            t = steps.train(cfg, loss_id, seed, lay.prepared, lay.train(loss_id, seed))
            ignored = ", ".join(t.imported.get("ignored", [])) or "nothing"
            print(
                f"import {loss_id} seed {seed}: {t.imported.get('path')} ({t.imported.get('format')}), "
                f"val acc {t.best_val_accuracy:.4f}; left out: {ignored}"
            )
            write_training_curve(lay, loss_id, seed)
    return 0


def cmd_why(cfg: Config, lay: Layout, args: argparse.Namespace) -> int:
    """Why a step of one (loss, seed) is or is not computed again, wherever its result may be."""
    dvc_file = Path(f"{cfg.data.root}.dvc")
    try:
        data_version = str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        data_version = None
    loss_id = _losses(cfg, args)[0] if args.step != "prepare" else ""
    seed = _seeds(cfg, args)[0]
    print("\n".join(explain(cfg, args.step, loss_id, seed, lay.workdir, data_version)))
    return 0


COMMANDS = {
    "inputs": cmd_inputs,
    "prepare": cmd_prepare,
    "import": cmd_import,
    "train": cmd_train,
    "calibrate": cmd_calibrate,
    "select": cmd_select,
    "evaluate": cmd_evaluate,
    "gate": cmd_gate,
    "run": cmd_run,
    "why": cmd_why,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oodgate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "materialize", help="write the embedded default data (MNIST-5k, photo patches) to data/"
    )
    m.add_argument("--root", default="data")
    m.add_argument(
        "--folder",
        default=None,
        help="instead: MNIST-5k as PNGs in FOLDER/<digit>/ (to try data.dataset: folder)",
    )
    for name in (*COMMANDS, "numerics"):
        helps = {
            "run": "all steps in one process",
            "inputs": "what each step depends on (for dvc.yaml)",
            "numerics": "the variables that pin the numerics of params.yaml (export them to start a worker by hand)",
            "import": "import the losses' checkpoints (losses.<id>.checkpoint) instead of training them",
            "select": "choose each loss's OOD score on the validation OOD sets (data.ood_val)",
            "why": "why a step of one loss and seed is reused or computed again (docs/reuse.md)",
        }
        s = sub.add_parser(name, help=helps.get(name, f"the {name} step"))
        s.add_argument("--params", default="params.yaml")
        s.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a params key, e.g. train.epochs=2"
        )
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "select":
            s.add_argument("--loss", default=None, help="one loss id from params.yaml (default: all)")
        if name == "why":
            s.add_argument("step", choices=STEPS, help="the step")
        if name in ("train", "import", "calibrate", "evaluate", "run", "why"):
            s.add_argument("--loss", default=None, help="one loss id from params.yaml (default: all)")
            s.add_argument("--seed", type=int, default=None, help="one seed from params.yaml (default: all)")
    return p


def cmd_numerics(args: argparse.Namespace) -> int:
    """The numerics the params ask for: the variables to export before starting a computing process
    by hand (a Dask worker, torchrun on another machine), then what this process found."""
    cfg = _config(args)
    mode, threads = cfg.numerics.mode, cfg.numerics.threads
    print(numerics.shell_exports(mode, threads))
    if not args.quiet:
        numerics.activate(mode, threads)
        print("# " + numerics.banner(mode, threads))
        print("# in this process: " + json.dumps(numerics.provenance(mode, threads)))
    return 0


class Interrupted(Exception):
    """SIGINT or SIGTERM reached a step: it stops, and says so in one line."""


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, ``timeout``, a scheduler's stop) end a step with one
    line and exit status 130, never a traceback: what it finished is kept (every result file is
    written atomically, its record last), and a re-run reuses or resumes it."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(".")  # where results go, once the config says
    _stop_on_signals()
    try:
        return _main(args, workdir)
    except Interrupted as e:
        print(
            f"error: {e} received: stopped; finished results are kept, and running the step again "
            "(or `dvc repro`) reuses them and resumes a training from its last epoch",
            file=sys.stderr,
        )
        return 130


def _main(args: argparse.Namespace, workdir: Path) -> int:
    try:
        if args.command == "materialize":
            return cmd_materialize(args)
        # pinned by `python -m oodgate` before torch loaded (oodgate/__main__.py); here, the params
        # must ask for the numerics in force (NumericsError otherwise)
        numerics.apply_from_params(args.params, parse_overrides(args.set))
        if args.command == "numerics":
            return cmd_numerics(args)
        cfg = _config(args)
        workdir = Path(cfg.workdir)
        preflight(cfg, training=args.command in ("train", "import", "calibrate", "evaluate", "run"))
        if args.command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
            td.init_process_group(
                backend="nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
            )
        return COMMANDS[args.command](cfg, Layout(Path(cfg.workdir)), args)
    except (
        ConfigError,
        FileNotFoundError,
        ValueError,
        StaleResultError,
        CorruptResultError,
        NumericsError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_no_space(e):
            raise
        # not the input's fault: exit 1; the message says where and that finished results are kept
        print(f"error: {no_space_error(e, workdir)}", file=sys.stderr)
        return 1
