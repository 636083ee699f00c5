"""Train one (loss, seed). A retry resumes from the run's last checkpoint; every epoch is logged."""

from __future__ import annotations

from prefect import get_run_logger, task

from oodgate.base.config import Config
from oodgate.base.records import Trained
from oodgate.learning.training.engine import EpochStats, Hook, NonFiniteLossError, Run, TrainingInterrupted
from oodgate.running import steps
from tasks.caching import Job, by_fingerprint


def _retry_helps(task, task_run, state) -> bool:
    # A NaN loss or a bad value repeats identically, an interrupt is meant; an I/O error or a killed
    # worker may not repeat.
    try:
        state.result()
    except (NonFiniteLossError, ValueError, TrainingInterrupted):
        return False
    except Exception:
        return True
    return False


@task(
    name="train",
    task_run_name="train-{job.loss_id}-seed{job.seed}",
    retries=1,
    retry_condition_fn=_retry_helps,
    cache_policy=by_fingerprint("train.json"),
    persist_result=True,
)
def train_model(cfg: Config, job: Job, prepared_dir: str) -> Trained:
    log = get_run_logger()
    trained = steps.train(
        cfg, job.loss_id, job.seed, prepared_dir, job.out_dir, (_LogEpochs(log),), fingerprint=job.fingerprint
    )
    if trained.prototypes.get("warning"):
        log.warning(f"{job.loss_id} seed {job.seed}: {trained.prototypes['warning']}")
    return trained


class _LogEpochs(Hook):
    """One line in the task's log per epoch."""

    def __init__(self, log) -> None:
        self.log = log

    def after_epoch(self, run: Run, s: EpochStats) -> None:
        h = run.history[-1]
        prototypes = (
            f", prototypes: norm {h['prototype_norm']:.2f}"
            + (
                f", cosine with their start >= {h['prototype_cosine_min']:.3f}"
                if "prototype_cosine_min" in h
                else ""
            )
            if "prototype_norm" in h
            else ""
        )
        self.log.info(
            f"epoch {s.epoch}/{run.cfg.epochs}: train loss {s.train_loss:.4f}, train accuracy "
            f"{s.train_accuracy:.4f}, val accuracy {s.val_accuracy:.4f}{prototypes} ({s.seconds:.1f} s)"
        )
