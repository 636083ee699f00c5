"""Calibrate on validation logits, choose each loss's OOD score on the validation OOD sets, then
evaluate on the test split and every OOD set.

The upstream result (``trained``, ``calibrated``) is a parameter so that Prefect orders the tasks;
the cache key is the job's fingerprint alone, which already chains the upstream fingerprints.
"""

from __future__ import annotations

from prefect import task

from oodgate.base.config import Config
from oodgate.base.records import Calibrated, Evaluated, Selected, Trained
from oodgate.running import steps
from tasks.caching import Job, by_fingerprint


@task(
    name="calibrate",
    task_run_name="calibrate-{job.loss_id}-seed{job.seed}",
    cache_policy=by_fingerprint("calibration.json"),
    persist_result=True,
)
def calibrate_model(cfg: Config, job: Job, trained: Trained, prepared_dir: str) -> Calibrated:
    return steps.calibrate(cfg, job.loss_id, job.seed, trained.dir, prepared_dir, job.out_dir)


@task(
    name="select-score",
    task_run_name="select-score-{job.loss_id}",
    cache_policy=by_fingerprint("selection.json"),
    persist_result=True,
)
def select_score(cfg: Config, job: Job, calibrated: list[Calibrated], prepared_dir: str) -> Selected:
    """The loss's OOD score, chosen on the validation OOD sets over all its seeds' calibrated models."""
    return steps.select(cfg, job.loss_id, {c.seed: c.dir for c in calibrated}, prepared_dir, job.out_dir)


@task(
    name="evaluate",
    task_run_name="evaluate-{job.loss_id}-seed{job.seed}",
    cache_policy=by_fingerprint("evaluation.json"),
    persist_result=True,
)
def evaluate_model(
    cfg: Config, job: Job, calibrated: Calibrated, selected: Selected, prepared_dir: str
) -> Evaluated:
    return steps.evaluate(cfg, job.loss_id, job.seed, calibrated.dir, prepared_dir, job.out_dir, selected.dir)
