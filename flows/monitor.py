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
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # before NumPy and torch load: the numerics of the params (oodgate.numerics)
    from oodgate import numerics as _numerics
    from oodgate.project import PROJECT_ROOT as _ROOT

    _numerics.apply_from_argv(sys.argv[1:], default_root=_ROOT)

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.runtime import flow_run

from oodgate import monitoring
from oodgate.config import ConfigError, load_config
from oodgate.evaluation import THRESHOLD_TPR
from oodgate.project import PROJECT_ROOT, telemetry_off
from oodgate_mlflow import monitor_runs, tracking
from oodgate_mlflow.champion import load_champion
from tasks.data import data_version

FAR_OOD = ("photo_patches", "gaussian_noise")  # what the demo's shifted batch mixes in


class MonitorError(ValueError):
    """The monitoring run cannot start: no batch named, or none configured."""


@task(name="load-champion", cache_policy=NONE)
def load_champion_task(name: str, alias: str, uri: str, version: int | None = None) -> tuple[Any, int]:
    """The version holding ``alias`` now (or ``version``), loaded by its number (a concurrent
    promotion cannot swap it)."""
    return load_champion(name, alias, uri, version)


@task(name="read-batch", cache_policy=NONE)
def read_batch(path: str, shape: tuple[int, int, int], fit: bool = False) -> monitoring.Batch:
    return monitoring.load_batch(path, shape, fit)


@task(name="score-batch", cache_policy=NONE)
def score_batch(model: Any, batch: monitoring.Batch, class_names: list[str]) -> Any:
    table = monitor_runs.predict(model, batch.x)
    table.insert(0, "image", batch.names)
    table.insert(2, "confidence", table[[f"p_{c}" for c in class_names]].max(axis=1))
    return table


def _batch_path(batch: str | None, configured: str | None, project: Path) -> Path:
    chosen = batch or configured
    if not chosen:
        raise MonitorError(
            "no batch to score: pass --batch PATH (a folder of images or an .npz), set monitor.batch "
            "in params.yaml, or run `make monitor` for the demo batches"
        )
    p = Path(chosen)
    return p if p.is_absolute() else project / p


def report_markdown(
    model_name: str, version: int, source: str, summary: dict, test: monitoring.RateTest
) -> str:
    counts = ", ".join(f"{c}: {n}" for c, n in summary["class_counts"].items())
    head = {"high": "ALERT (more OOD than expected)", "low": "ALERT (less OOD than expected)"}
    return "\n".join(
        [
            f"## Monitoring: {head.get(test.alert, 'no alert')}",
            "",
            f"- batch: `{source}` ({summary['n']} images)",
            f"- model: {model_name} version {version}",
            f"- {test.sentence()}",
            f"- mean calibrated confidence {summary['mean_confidence']:.4f}; mean OOD score "
            f"{summary['mean_score']:.4g}",
            f"- predicted classes: {counts}",
        ]
    )


@flow(name="oodgate-monitor", log_prints=True)
def monitor(
    batch: str | None = None,
    params_path: str = "params.yaml",
    root: str | None = None,
    overrides: dict[str, Any] | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    """Score one batch with the champion, test its OOD rate, log it; returns the batch's summary.

    ``batch`` (default ``monitor.batch``) and ``params_path`` are relative to ``root``, the project
    directory (default: this repository). The model is the version holding ``monitor.alias``
    (``champion``; ``challenger`` for the last run's best candidate), or ``version``.
    """
    project = Path(root).resolve() if root else PROJECT_ROOT
    cfg = load_config(project / params_path, overrides)
    mon = cfg.monitor
    path = _batch_path(batch, mon.batch, project)
    uri = tracking.connect(root=project)
    name = cfg.registry.model_name
    from oodgate import numerics

    numerics.activate(cfg.numerics.mode, cfg.numerics.threads)  # the champion scores under them
    model, v = load_champion_task(name, mon.alias, uri, version)
    used = f"version {version}" if version is not None else mon.alias
    info = monitor_runs.describe(model, f"{name} v{v} ({used})")
    data = read_batch(str(path), info.shape, getattr(info, "preprocessing", "exact") == "fit")
    exp_id = tracking.ensure_experiment(mon.experiment, project)
    out_dir = (project / cfg.workdir / "monitor").resolve()
    final = out_dir / f"{path.stem}-{data.digest[:12]}-v{v}.parquet"
    previous = monitor_runs.already_scored(exp_id, name, data.digest, v)
    if previous is not None and final.is_file():
        print(f"batch {path} (digest {data.digest[:12]}) was already scored by {name} v{v}: nothing logged")
        summary = monitor_runs.previous_summary(previous)
        return {**summary, "predictions": str(final), "mlflow_run_id": previous.info.run_id, "reused": True}

    table = score_batch(model, data, info.class_names)
    summary = monitoring.summarise(table, info.class_names)
    test = _rate_test(mon, summary, info.reference, f"{name} v{v}")
    summary.update(
        test=test.as_dict(),
        model_name=name,
        champion_version=v,
        alias=used,
        batch=str(path),
        batch_digest=data.digest,
    )
    report = report_markdown(name, v, str(path), summary, test)
    print(report)

    staging = out_dir / f".{final.stem}.staging"
    files = _write_outputs(staging, table, report, summary, info.reference, f"{path.name} vs {name} v{v}")
    dvc_md5 = data_version(monitoring.dvc_file(path)) if monitoring.dvc_file(path).is_file() else None
    run_id, step = monitor_runs.log_batch(
        exp_id,
        monitor_runs.history_run(exp_id, name),
        f"batch-{path.stem}-v{v}",
        tags={
            "oodgate.model_name": name,
            "oodgate.champion_version": str(v),
            "oodgate.batch_digest": data.digest,
            "oodgate.monitor.alert": test.alert,
            "oodgate.prefect_flow_run_id": flow_run.get_id() or "none",
            **({"oodgate.batch_dvc_md5": dvc_md5} if dvc_md5 else {}),
        },
        params={
            "batch": str(path),
            "images": summary["n"],
            "alias": used,
            "test": mon.test,
            "alpha": mon.alpha,
        },
        figures={
            "ood_rate": summary["ood_rate"],
            "mean_confidence": summary["mean_confidence"],
            "mean_score": summary["mean_score"],
            "p_value": test.p_value,
            "expected_ood_rate": test.expected,
            "champion_version": v,
            **{f"class_count/{c}": n for c, n in summary["class_counts"].items()},
        },
        files=files,
    )
    (staging / "predictions.parquet").replace(
        final
    )  # last: only a scored and logged batch leaves predictions
    shutil.rmtree(staging)
    summary.update(predictions=str(final), mlflow_run_id=run_id, step=step, reused=False)
    _announce(name, v, str(path), run_id, test, report)
    return summary


def _rate_test(mon: Any, summary: dict, ref: dict | None, label: str) -> monitoring.RateTest:
    validation = (
        None if ref is None else monitoring.validation_counts(ref["validation_scores"], ref["threshold"])
    )
    if mon.test == "beta_binomial" and validation is None:
        raise MonitorError(
            f"{label} carries no validation scores, which the beta_binomial test needs; "
            "set monitor.test: binomial, or register a model logged with its reference"
        )
    return monitoring.rate_test(
        summary["flagged"],
        summary["n"],
        mon.alpha,
        method=mon.test,
        expected=mon.expected_ood_rate,
        tpr=ref["tpr"] if ref else THRESHOLD_TPR,
        validation=validation,
    )


def _write_outputs(
    staging: Path, table: Any, report: str, summary: dict, ref: dict | None, title: str
) -> list[Path]:
    """The batch's files, in a staging directory next to where the predictions will go."""
    staging.mkdir(parents=True, exist_ok=True)
    table.to_parquet(staging / "predictions.parquet", index=False)
    if ref is not None:  # a model logged without its reference gets no plot
        scores, val = table["score"].to_numpy(), np.asarray(ref["validation_scores"])
        monitoring.score_plot(scores, float(ref["threshold"]), staging / "scores.png", val, title)
    (staging / "report.md").write_text(report + "\n")
    (staging / "summary.json").write_text(json.dumps(summary, indent=1))
    return sorted(staging.iterdir())


def _announce(
    name: str, version: int, batch: str, run_id: str, test: monitoring.RateTest, report: str
) -> None:
    """The Prefect side: the report as a markdown artifact, and the events an automation can act on."""
    create_markdown_artifact(
        key="monitor-report", markdown=report, description=f"{Path(batch).name}: {test.alert}"
    )
    resource = {"prefect.resource.id": f"oodgate.model.{name}", "prefect.resource.name": name}
    payload = {"batch": batch, "champion_version": version, "mlflow_run_id": run_id, **test.as_dict()}
    emit_event("oodgate.monitor.scored", resource=resource, payload=payload)
    if test.alert != "none":
        emit_event("oodgate.monitor.alert", resource=resource, payload=payload)
        get_run_logger().warning(test.sentence())


def write_demo_batches(params_path: Path, out_dir: Path) -> list[Path]:
    """Two batches from the configured data: the in-distribution test split, and the same with a
    quarter of its images replaced by far-OOD ones (photo patches and Gaussian noise, half each)."""
    from oodgate.config import OODSource
    from oodgate.data.load import load_data
    from oodgate.data.ood import load_ood

    cfg = load_config(params_path)
    data_root = params_path.parent / cfg.data.root
    bundle = load_data(cfg.data, data_root)
    x_id = bundle.test.x.numpy()
    n_ood = len(x_id) // 4
    shape = (bundle.in_channels, bundle.image_size)
    far = [load_ood(OODSource(name=n), cfg.data, data_root, *shape).x.numpy() for n in FAR_OOD]
    ood = np.concatenate([a[: -(-n_ood // len(far))] for a in far])[:n_ood]
    rng = np.random.default_rng(0)
    keep = rng.permutation(len(x_id))[: len(x_id) - len(ood)]
    shifted = np.concatenate([x_id[keep], ood])[rng.permutation(len(keep) + len(ood))]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "in_distribution.npz", out_dir / "shifted.npz"]
    np.savez_compressed(paths[0], x=x_id)
    np.savez_compressed(paths[1], x=shifted)
    return paths


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
    from oodgate.config import parse_overrides
    from oodgate.data import DataNotFoundError
    from oodgate_mlflow.champion import ChampionNotFoundError

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
            _batch_path(args.batch, cfg.monitor.batch, root)  # none named and none configured: fails here
        tracking.connect(root=root)
        for b in batches:
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
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
