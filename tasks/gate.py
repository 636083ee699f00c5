"""Gate every candidate against the baseline and log the comparison to the parent run."""

from __future__ import annotations

from prefect import task

from oodgate.base.config import Config
from oodgate.running import steps
from oodgate.running.steps.gate_step import GateReport
from oodgate_mlflow.runs import LossResult


def samples_of(cfg: Config, entry: LossResult) -> list:
    """The per-seed sample arrays of a loss: from its evaluation directories, or, for a child run
    reused from an earlier flow run, from the local copies verified against the digests recorded
    when it was logged (never straight from the artifact store)."""
    if not entry.sample_dirs:
        raise RuntimeError(f"{entry.loss}: no verified per-sample arrays (run {entry.run_id})")
    return [steps.load_samples(d) for d in entry.sample_dirs]


@task(name="gate", task_run_name="gate")
def gate_losses(cfg: Config, logged: dict[str, LossResult]) -> GateReport:
    metrics = {k: v.metrics_by_seed for k, v in logged.items()}
    samples = {k: samples_of(cfg, v) for k, v in logged.items()} if cfg.gate.confidence is not None else None
    return steps.gate(
        cfg,
        metrics,
        samples,
        scores={k: v.score_choice or v.score for k, v in logged.items()},
        seconds={k: v.train_seconds for k, v in logged.items()},
    )
