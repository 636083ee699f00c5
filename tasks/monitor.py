"""The monitoring flow's Prefect tasks and its Prefect and MLflow side: the champion, the batch,
its predictions, the batch's MLflow run, and the artifact and events an automation acts on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.runtime import flow_run

from oodgate.base.config import MAX_BATCH_IMAGES
from oodgate.watching import monitoring
from oodgate_mlflow import monitor_runs
from oodgate_mlflow.champion import load_champion
from tasks.data import data_version

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.pyfunc import PyFuncModel


@task(name="load-champion", cache_policy=NONE)
def load_champion_task(
    name: str, alias: str, uri: str, version: int | None = None
) -> tuple[PyFuncModel, int]:
    """The version holding ``alias`` now (or ``version``), loaded by its number (a concurrent
    promotion cannot swap it)."""
    return load_champion(name, alias, uri, version)


@task(name="read-batch", cache_policy=NONE)
def read_batch(
    path: str, shape: tuple[int, int, int], fit: bool = False, max_images: int = MAX_BATCH_IMAGES
) -> monitoring.Batch:
    return monitoring.load_batch(path, shape, fit, max_images)


@task(name="score-batch", cache_policy=NONE)
def score_batch(model: PyFuncModel, batch: monitoring.Batch, class_names: list[str]) -> pd.DataFrame:
    table = monitor_runs.predict(model, batch.x)
    table.insert(0, "image", batch.names)
    table.insert(2, "confidence", table[[f"p_{c}" for c in class_names]].max(axis=1))
    return table


def log_batch(experiment_id: str, summary: monitoring.MonitorSummary, files: list[Path]) -> tuple[str, int]:
    """The batch's MLflow run under its model's history run; returns ``(run_id, step)``."""
    path = Path(summary.batch)
    dvc = monitoring.dvc_file(path)
    dvc_md5 = data_version(dvc) if dvc.is_file() else None
    name, v = summary.model_name, summary.champion_version
    return monitor_runs.log_batch(
        experiment_id,
        monitor_runs.history_run(experiment_id, name),
        f"batch-{path.stem}-v{v}",
        tags={
            "oodgate.model_name": name,
            "oodgate.champion_version": str(v),
            "oodgate.batch_digest": summary.batch_digest,
            "oodgate.monitor.alert": summary.test.alert,
            "oodgate.prefect_flow_run_id": flow_run.get_id() or "none",
            **({"oodgate.batch_dvc_md5": dvc_md5} if dvc_md5 else {}),
        },
        params=summary.params(),
        figures=summary.metrics(),
        files=files,
    )


def announce(summary: monitoring.MonitorSummary, run_id: str, report: str) -> None:
    """The Prefect side: the report as a markdown artifact, and the events an automation can act on."""
    test, name = summary.test, summary.model_name
    create_markdown_artifact(
        key="monitor-report", markdown=report, description=f"{Path(summary.batch).name}: {test.alert}"
    )
    resource = {"prefect.resource.id": f"oodgate.model.{name}", "prefect.resource.name": name}
    payload = {
        "batch": summary.batch,
        "champion_version": summary.champion_version,
        "mlflow_run_id": run_id,
        **test.as_dict(),
    }
    emit_event("oodgate.monitor.scored", resource=resource, payload=payload)
    if test.alert != "none":
        emit_event("oodgate.monitor.alert", resource=resource, payload=payload)
        get_run_logger().warning(test.sentence())
