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
expected rate (``oodgate.watching.monitoring.rate_test``). An alert is: the tag ``oodgate.monitor.alert``
(``high`` or ``low``) on the batch's MLflow run, a Prefect markdown artifact ``monitor-report``
with the evidence, and the Prefect event ``oodgate.monitor.alert`` (resource
``oodgate.model.<name>``) that an automation can act on; the run itself ends Completed, since the
monitoring worked. Every scored batch also emits ``oodgate.monitor.scored``.

No ``from __future__ import annotations`` here, for the reason given in ``flows/pipeline.py``.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow

from flows import entry
from flows.server import check_prefect_api, start_temporary_prefect_server, temporary_api
from oodgate.base import numerics
from oodgate.base.config import Config, load_config
from oodgate.base.project import PROJECT_ROOT
from oodgate.data.bundle import DataNotFoundError
from oodgate.watching import monitoring
from oodgate.watching.monitoring import MonitorError, write_demo_batches
from oodgate_mlflow import monitor_runs, tracking
from oodgate_mlflow.champion import ChampionNotFoundError, resolve, verified_copy
from oodgate_mlflow.integrity import ModelIntegrityError
from tasks.monitor import announce, load_champion_task, log_batch, read_batch, score_batch

# what a user must fix, besides entry.REFUSALS: one line, exit status 2
REFUSALS = (
    *entry.REFUSALS,
    MonitorError,
    monitoring.BatchError,
    ChampionNotFoundError,
    monitor_runs.NotAnOODGateModelError,
    DataNotFoundError,
    ModelIntegrityError,
)


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
    p = entry.parser("python -m flows.monitor", __doc__.splitlines()[0], "relative to --root")
    p.add_argument("--batch", default=None, help="folder of images or .npz (default: monitor.batch)")
    p.add_argument(
        "--demo", action="store_true", help="write two demo batches from the embedded data and score both"
    )
    p.add_argument(
        "--alias", default=None, help="the model's alias (default monitor.alias: champion; or challenger)"
    )
    p.add_argument("--version", type=int, default=None, help="a version number instead of an alias")
    args = p.parse_args(argv)
    try:
        params = entry.load(args, PROJECT_ROOT, **({"monitor.alias": args.alias} if args.alias else {}))
        cfg, root = params.cfg, params.project
        batches = [str(Path(args.batch).resolve()) if args.batch else None]  # --batch is relative to here
        if args.demo:
            demo = root / cfg.workdir / "monitor" / "demo"
            batches = [str(b) for b in write_demo_batches(params.path, demo)]
        else:
            monitoring.batch_path(args.batch, cfg.monitor.batch, root)  # none named and none configured
        tracking.connect(root=root)
        check_prefect_api()
        start_temporary_prefect_server()  # started already when run as a program: then this returns at once
        for b in batches:
            # before the flow starts: a model whose files fail verification, or a batch it cannot
            # score, is refused in one line, not in Prefect's tracebacks of a failed flow run
            check_inputs(cfg, monitoring.batch_path(b, cfg.monitor.batch, root), args.version)
            t0 = time.perf_counter()
            with temporary_api():
                summary = monitor(b, str(params.path), str(root), params.overrides or None, args.version)
            print(
                f"{summary['batch']}: alert {summary['test']['alert']}, OOD rate {summary['ood_rate']:.1%}, "
                f"{summary['model_name']} v{summary['champion_version']} ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    except REFUSALS as e:
        return entry.refuse(e)
    except KeyboardInterrupt:
        print(
            "error: interrupted: stopped; a batch is logged only once it is scored, so run it again",
            file=sys.stderr,
        )
        return 130
    return 0


def check_inputs(cfg: Config, batch: Path, version: int | None) -> None:
    """What the flow would refuse, checked first: the model version (its files verified against the
    registry's record) and the batch (read as the model takes it: shape, dtype, range, NaN, size)."""
    name, uri = cfg.registry.model_name, tracking.default_tracking_uri()
    found = resolve(name, cfg.monitor.alias, uri, version)
    with tempfile.TemporaryDirectory(prefix="oodgate-check-") as tmp:
        local = verified_copy(name, found, Path(tmp) / "model")
        meta = json.loads(next(local.rglob("meta.json")).read_text())
    fit = meta.get("preprocessing", "exact") == "fit"
    monitoring.load_batch(str(batch), tuple(meta["input_shape"]), fit, cfg.monitor.max_images)


if __name__ == "__main__":
    entry.end(main())
