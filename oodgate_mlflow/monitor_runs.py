"""The monitoring flow's MLflow side: the champion it scores with, one run per batch, and a history.

Experiment ``monitor.experiment`` (default ``oodgate-monitor``) holds, per registered model name,
one ``history-<model>`` run whose metrics ``ood_rate``, ``mean_confidence``, ``p_value`` and
``champion_version`` get one step per scored batch (the MLflow UI draws them as line charts over
steps and over time), and under it one nested run per batch with its parameters, figures, tags
(``oodgate.monitor.alert``: ``high``, ``low`` or ``none``) and artifacts (the per-image predictions,
the score plot, the report). A batch already scored by the same champion version is not logged again.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from oodgate_mlflow import tracking

if TYPE_CHECKING:  # mlflow, pandas and the pyfunc load on first use
    import numpy as np
    import pandas as pd
    from mlflow.entities import Run
    from mlflow.pyfunc import PyFuncModel

    from oodgate_mlflow.pyfunc_model import OODGateModel

HISTORY = "monitor-history"
BATCH = "monitor-batch"
CHUNK = 1024  # images per predict call: bounded memory for any batch size


class NotAnOODGateModelError(TypeError):
    """The version under the alias is not a model this project logged (no input shape, classes, score)."""


def describe(model: PyFuncModel, label: str) -> OODGateModel:
    """The project's pyfunc inside ``model`` (its ``shape``, ``class_names`` and ``reference``: the
    threshold's score, TPR and validation ID scores, None if it was logged without them)."""
    from mlflow.exceptions import MlflowException

    try:
        inner = model.unwrap_python_model()
    except MlflowException:
        inner = None
    if inner is None or not hasattr(inner, "shape") or not hasattr(inner, "class_names"):
        raise NotAnOODGateModelError(
            f"{label} is not a model the oodgate pipeline logs (a pyfunc with the input shape, the class "
            "names and the OOD threshold); point the alias at a version the pipeline registered"
        )
    if not hasattr(inner, "reference"):
        inner.reference = None
    return inner


def predict(model: PyFuncModel, x: np.ndarray) -> pd.DataFrame:
    import pandas as pd

    return pd.concat([model.predict(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)], ignore_index=True)


def history_run(experiment_id: str, model_name: str) -> str:
    """The history run of ``model_name`` in the monitoring experiment, created on first use."""
    runs = tracking.client().search_runs(
        [experiment_id],
        filter_string=f"tags.`oodgate.role` = '{HISTORY}' and tags.`oodgate.model_name` = '{model_name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    run_id = tracking.start_run(
        experiment_id, f"history-{model_name}", {"oodgate.role": HISTORY, "oodgate.model_name": model_name}
    )
    tracking.end_run(run_id)  # metrics are logged to it by id, batch after batch
    return run_id


def already_scored(experiment_id: str, model_name: str, digest: str, version: int) -> Run | None:
    return tracking.find_finished_run(
        experiment_id,
        {
            "oodgate.role": BATCH,
            "oodgate.model_name": model_name,
            "oodgate.batch_digest": digest,
            "oodgate.champion_version": str(version),
        },
    )


def log_batch(
    experiment_id: str,
    history_id: str,
    name: str,
    tags: dict[str, str],
    params: dict[str, str | int | float],
    figures: dict[str, float],
    files: list[Path],
) -> tuple[str, int]:
    """One nested run for the batch and one more step of the history; returns ``(run_id, step)``."""
    history = tracking.client().get_metric_history(history_id, "ood_rate")
    step = max((m.step for m in history), default=-1) + 1
    run_id = tracking.start_run(
        experiment_id,
        name,
        {**tags, "oodgate.role": BATCH, "oodgate.host": socket.gethostname(), "oodgate.step": str(step)},
        parent_id=history_id,
    )
    try:
        tracking.log_params(run_id, params)
        tracking.log_metrics(run_id, figures)
        for f in files:
            tracking.log_artifacts(run_id, f)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    keys = ("ood_rate", "mean_confidence", "p_value", "champion_version")
    tracking.log_metrics(history_id, {k: figures[k] for k in keys}, step=step)
    return run_id, step


def previous_summary(run: Run) -> dict[str, object]:
    return tracking.download_json(run.info.run_id, "summary.json")
