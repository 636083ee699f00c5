"""Calibrate on validation logits, then evaluate on the test split and every OOD test half."""

from __future__ import annotations

from prefect import task

from oodgate import steps
from oodgate.config import Config
from tasks.caching import by_inputs

# ``key`` digests everything the result depends on; upstream results and the config object are
# left out of the cache key (they are either encoded in ``key`` or carry timings); the output files
# are in it, so a deleted work directory is recomputed, never returned.
_EXCLUDE = ("cfg", "upstream")


@task(
    name="calibrate",
    task_run_name="calibrate-{loss_id}-seed{seed}",
    cache_policy=by_inputs("calibration.json", "calibrated.pt", exclude=_EXCLUDE),
    persist_result=True,
)
def calibrate_model(
    cfg: Config, loss_id: str, seed: int, upstream: dict, prepared_dir: str, out_dir: str, key: str
) -> dict:
    """``upstream`` is the train task's result (its ``dir`` holds best.pt)."""
    return {**steps.calibrate(cfg, upstream["dir"], prepared_dir, out_dir), "dir": out_dir}


@task(
    name="evaluate",
    task_run_name="evaluate-{loss_id}-seed{seed}",
    cache_policy=by_inputs("metrics.json", "samples.pt", exclude=_EXCLUDE),
    persist_result=True,
)
def evaluate_model(
    cfg: Config, loss_id: str, seed: int, upstream: dict, prepared_dir: str, out_dir: str, key: str
) -> dict:
    """``upstream`` is the calibrate task's result (its ``dir`` holds calibrated.pt)."""
    return {**steps.evaluate(cfg, upstream["dir"], prepared_dir, out_dir), "dir": out_dir}
