"""The monitoring flow: score a batch of incoming images with the champion and alert on drift.

``python -m flows.monitor --batch PATH`` (``make monitor BATCH=PATH``) runs it once; ``make
monitor`` alone writes two demo batches from the embedded data (test-split digits, and the same
with a quarter of noise and photo patches) and scores both. ``make serve`` also serves it as the
deployment ``oodgate-monitor/scheduled`` on ``monitor.schedule`` when ``monitor.batch`` is set.

Per batch: the champion is looked up by alias and loaded by version (the version is recorded);
every image gets its class, calibrated confidence, OOD score and in-distribution decision at the
threshold stored with the model; the predictions go to
``<workdir>/monitor/<batch>-<digest>-v<version>.parquet``, written only once everything succeeded
(a failed batch leaves earlier predictions as they were). The OOD rate is tested against the
expected rate (``oodgate.monitoring.rate_test``). An alert is: the tag ``oodgate.monitor.alert``
(``high`` or ``low``) on the batch's MLflow run, a Prefect markdown artifact ``monitor-report``
with the evidence, and the Prefect event ``oodgate.monitor.alert`` (resource
``oodgate.model.<name>``) that an automation can act on; the run itself ends Completed, since the
monitoring worked. Every scored batch also emits ``oodgate.monitor.scored``.

No ``from __future__ import annotations`` here, for the reason given in ``flows/pipeline.py``.
"""

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before NumPy and torch load: the numerics of the params (oodgate.numerics)
    from oodgate import numerics as _numerics
    from oodgate.project import PROJECT_ROOT as _ROOT

    _numerics.apply_from_argv(sys.argv[1:], default_root=_ROOT)

from prefect import flow

from oodgate import monitoring
from oodgate.config import ConfigError, load_config
from oodgate.monitoring import MonitorError, write_demo_batches
from oodgate.project import PROJECT_ROOT, telemetry_off
from oodgate_mlflow import monitor_runs, tracking
from tasks.monitor import announce, load_champion_task, log_batch, read_batch, score_batch


@flow(name="oodgate-monitor", log_prints=True)
def monitor(
    batch: str | None = None,
    params_path: str = "params.yaml",
    root: str | None = None,
    overrides: dict[str, object] | None = None,
    version: int | None = None,
) -> dict[str, object]:
    """Score one batch with the champion, test its OOD rate, log it; returns the batch's summary.

    ``batch`` (default ``monitor.batch``) and ``params_path`` are relative to ``root``, the project
    directory (default: this repository). The model is the version holding ``monitor.alias``
    (``champion``; ``challenger`` for the last run's best candidate), or ``version``.
    """
    project = Path(root).resolve() if root else PROJECT_ROOT
    cfg = load_config(project / params_path, overrides)
    mon, name = cfg.monitor, cfg.registry.model_name
    path = monitoring.batch_path(batch, mon.batch, project)
    uri = tracking.connect(root=project)
    from oodgate import numerics

    numerics.activate(cfg.numerics.mode, cfg.numerics.threads)  # the champion scores under them
    model, v = load_champion_task(name, mon.alias, uri, version)
    used = f"version {version}" if version is not None else mon.alias
    info = monitor_runs.describe(model, f"{name} v{v} ({used})")
    data = read_batch(str(path), info.shape, getattr(info, "preprocessing", "exact") == "fit", mon.max_images)
    exp_id = tracking.ensure_experiment(mon.experiment, project)
    final = monitoring.predictions_path((project / cfg.workdir / "monitor").resolve(), path, data.digest, v)
    previous = monitor_runs.already_scored(exp_id, name, data.digest, v)
    if previous is not None and final.is_file():
        print(f"batch {path} (digest {data.digest[:12]}) was already scored by {name} v{v}: nothing logged")
        summary = monitoring.MonitorSummary.from_record(monitor_runs.previous_summary(previous))
        return monitoring.MonitorResult(summary, str(final), previous.info.run_id, reused=True).record()

    table = score_batch(model, data, info.class_names)
    figures = monitoring.summarise(table, info.class_names)
    test = monitoring.batch_rate_test(mon, figures, info.reference, f"{name} v{v}")
    summary = monitoring.MonitorSummary(figures, test, name, v, used, str(path), data.digest)
    report = summary.report()
    print(report)
    staging = final.parent / f".{final.stem}.staging"
    files = monitoring.write_outputs(staging, table, summary, info.reference, f"{path.name} vs {name} v{v}")
    run_id, step = log_batch(exp_id, summary, files)
    monitoring.publish(staging, final)  # last: only a scored and logged batch leaves predictions
    announce(summary, run_id, report)
    return monitoring.MonitorResult(summary, str(final), run_id, reused=False, step=step).record()


def main(argv: list[str] | None = None) -> int:
    telemetry_off()
    p = argparse.ArgumentParser(prog="python -m flows.monitor", description=__doc__.splitlines()[0])
    p.add_argument("--batch", default=None, help="folder of images or .npz (default: monitor.batch)")
    p.add_argument(
        "--demo", action="store_true", help="write two demo batches from the embedded data and score both"
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--root", default=None, help="the project directory (default: this repository)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a params key")
    p.add_argument(
        "--alias", default=None, help="the model's alias (default monitor.alias: champion; or challenger)"
    )
    p.add_argument("--version", type=int, default=None, help="a version number instead of an alias")
    args = p.parse_args(argv)
    from flows import PrefectUnavailableError, check_prefect_api
    from oodgate.config import parse_overrides
    from oodgate.data import DataNotFoundError
    from oodgate_mlflow.champion import ChampionNotFoundError
    from oodgate_mlflow.integrity import ModelIntegrityError

    root = Path(args.root).resolve() if args.root else PROJECT_ROOT
    try:
        overrides = parse_overrides(args.set)
        if args.alias:
            overrides["monitor.alias"] = args.alias
        cfg = load_config(root / args.params, overrides)
        batches = [str(Path(args.batch).resolve()) if args.batch else None]  # --batch is relative to here
        if args.demo:
            batches = [
                str(b)
                for b in write_demo_batches(root / args.params, root / cfg.workdir / "monitor" / "demo")
            ]
        else:
            # none named and none configured: fails here
            monitoring.batch_path(args.batch, cfg.monitor.batch, root)
        tracking.connect(root=root)
        check_prefect_api()
        for b in batches:
            # before the flow starts: a model whose files fail verification, or a batch it cannot
            # score, is refused in one line, not in Prefect's tracebacks of a failed flow run
            check_inputs(cfg, monitoring.batch_path(b, cfg.monitor.batch, root), args.version)
            t0 = time.perf_counter()
            summary = monitor(
                batch=b,
                params_path=args.params,
                root=str(root),
                overrides=overrides or None,
                version=args.version,
            )
            print(
                f"{summary['batch']}: alert {summary['test']['alert']}, OOD rate {summary['ood_rate']:.1%}, "
                f"{summary['model_name']} v{summary['champion_version']} ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    except (
        ConfigError,
        MonitorError,
        monitoring.BatchError,
        ChampionNotFoundError,
        monitor_runs.NotAnOODGateModelError,
        DataNotFoundError,
        tracking.TrackingUnavailableError,
        ModelIntegrityError,
        PrefectUnavailableError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted: stopped; a batch is logged only once it is scored, so run it again",
            file=sys.stderr,
        )
        return 130
    return 0


def check_inputs(cfg, batch: Path, version: int | None) -> None:
    """What the flow would refuse, checked first: the model version (its files verified against the
    registry's record) and the batch (read as the model takes it: shape, dtype, range, NaN, size)."""
    import json
    import tempfile

    from oodgate_mlflow.champion import resolve, verified_copy

    name, uri = cfg.registry.model_name, tracking.default_tracking_uri()
    found = resolve(name, cfg.monitor.alias, uri, version)
    with tempfile.TemporaryDirectory(prefix="oodgate-check-") as tmp:
        local = verified_copy(name, found, Path(tmp) / "model")
        meta = json.loads(next(local.rglob("meta.json")).read_text())
    fit = meta.get("preprocessing", "exact") == "fit"
    monitoring.load_batch(str(batch), tuple(meta["input_shape"]), fit, cfg.monitor.max_images)


if __name__ == "__main__":
    sys.exit(main())
