"""One pipeline run's per-loss bookkeeping: what every step needs, one loss's pending tasks, and the
loss's MLflow child run, logged once those tasks are done (or one that another run of the same
project logged meanwhile, reused). ``flows/pipeline.py`` composes the tasks; this is what it carries
between them."""

from dataclasses import dataclass, field
from pathlib import Path

from prefect.futures import PrefectFuture, wait

from flows import server
from oodgate.base.config import Config
from oodgate.base.files import is_no_space
from oodgate.data.prepared import evaluation_images
from oodgate.running.layout import Layout
from oodgate.running.steps.reuse import exclusive
from oodgate_mlflow.runs import LossResult, PipelineRun
from tasks.caching import Job
from tasks.track import log_loss_run


@dataclass
class Context:
    """What every step of one flow run needs: the config, its parent MLflow run, where things go."""

    cfg: Config
    run: PipelineRun
    workdir: Path
    prepared_dir: str = ""

    def job(self, step: str, fingerprint: str, loss_id: str = "", seed: int = 0) -> Job:
        """A step's job: its output directory is named by its fingerprint, so runs with other inputs
        never overwrite each other and a rerun with the same inputs resumes or reuses."""
        return Job(fingerprint, str(Layout(self.workdir).cached(step, fingerprint)), loss_id, seed)


@dataclass
class LossRun:
    """One loss's pending futures, all seeds in seed order, and the fingerprint of its child run."""

    loss_id: str
    fingerprint: str
    trained: list[PrefectFuture] = field(default_factory=list)
    calibrated: list[PrefectFuture] = field(default_factory=list)
    evaluated: list[PrefectFuture] = field(default_factory=list)
    selected: list[PrefectFuture] = field(default_factory=list)  # one: the loss's score
    packaged: list[PrefectFuture] = field(default_factory=list)  # one: the chosen seed's model

    def futures(self) -> list[PrefectFuture]:
        """In the order the tasks depend on each other."""
        return [*self.trained, *self.calibrated, *self.selected, *self.evaluated, *self.packaged]


def log_when_done(ctx: Context, lr: LossRun) -> LossResult | str:
    """The loss's child run: one logged by another pipeline run of this project while this one
    computed (found under the loss's lock, verified), or a new one spanning exactly its own tasks.
    A failure is recorded and its reason returned, not raised."""
    with exclusive(ctx.workdir / "cache" / f"log-{lr.fingerprint}"):
        wait(lr.futures())
        if all(f.state.is_completed() for f in lr.futures()):  # logged meanwhile by another run?
            # any verified run: another run's child starts when its first task did, often before
            # this run started (filtering on that start logged the first loss twice)
            found = ctx.run.reusable(lr.loss_id, lr.fingerprint, ctx.cfg.seeds_of(lr.loss_id))
            if found.result is not None:
                return found.result
        start_ms, end_ms = server.task_window_ms([f.task_run_id for f in lr.futures()])
        run_id = ctx.run.start_loss(ctx.cfg, lr.loss_id, lr.fingerprint, start_ms)
        try:
            for f in lr.futures():  # in dependency order: the first failure is the one reported
                f.result()
        except Exception as e:  # NaN loss, crash after retries: this loss fails, the others go on
            ctx.run.fail_loss(run_id, f"{type(e).__name__}: {e}", end_ms)
            if is_no_space(e):  # every other loss would fail the same way: stop, and say why in one line
                raise
            return f"{type(e).__name__}: {e}"
        trained, calibrated, evaluated = (
            [f.result() for f in fs] for fs in (lr.trained, lr.calibrated, lr.evaluated)
        )
        packaged, images = lr.packaged[0].result(), evaluation_images(ctx.prepared_dir)
        return log_loss_run(
            ctx.run, run_id, lr.loss_id, trained, calibrated, evaluated, packaged, images, end_ms
        )
