"""The main flow: versioned data -> baseline + candidate losses -> calibration -> evaluation ->
gate -> registration, every step tracked in MLflow.

Run it once: ``python -m flows.pipeline`` (a temporary Prefect server, SQLite MLflow at the project
root). Run it on a schedule: ``python -m flows.deploy`` (``make serve``), then ``make trigger``.

This module deliberately has no ``from __future__ import annotations``: a served deployment ships
the Flow object to a spawned run process with cloudpickle, and since the module attribute
``pipeline`` is the Flow, not the function, the function travels by value with only the globals its
body uses. String annotations would name types that never arrive there, and Prefect's validation of
the flow parameters would fail before the first task. The flow's parameters are plain JSON types.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description="Run the pipeline flow once.")
    p.add_argument(
        "--params", default="params.yaml", help="relative to --root, else to the working directory"
    )
    p.add_argument("--root", default=None, help="the project directory (default: this repository)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a params key")
    return p.parse_args(argv)


def _checked(argv: list[str] | None) -> tuple[argparse.Namespace, Path, dict[str, object], "Config"]:
    """The arguments, the params file, the overrides and the config, checked before any server
    starts: the numerics in force (before torch loads, when run as a program), the config, the
    preflight and the MLflow store; raises what a user must fix."""
    from oodgate import numerics
    from oodgate.config import load_config as _load_config
    from oodgate.config import parse_overrides
    from oodgate.project import telemetry_off as _telemetry_off

    _telemetry_off()
    args = _arguments(argv)
    root = Path(args.root).resolve() if args.root else None
    params = ((root or Path.cwd()) / args.params).resolve()  # --params is relative to --root, else to cwd
    overrides = parse_overrides(args.set)
    numerics.apply_from_params(params, overrides)  # before anything below loads NumPy or torch
    from oodgate.preflight import check_dvc_project as _check_dvc_project
    from oodgate.preflight import preflight as _preflight
    from oodgate_mlflow import tracking as _tracking

    cfg = _load_config(params, overrides)
    _preflight(cfg, project=root or _project_root())
    _check_dvc_project(root or _project_root(), cfg.data.root)  # the flow checks data/ with DVC
    _tracking.connect(root=root or _project_root())  # an unreachable or read-only MLflow store fails here
    from flows import check_prefect_api

    check_prefect_api()  # a PREFECT_API_URL that does not answer
    return args, params, overrides, cfg


def _project_root() -> Path:
    from oodgate.project import PROJECT_ROOT as root

    return root


def _refusals() -> tuple[type[BaseException], ...]:
    from flows import PrefectUnavailableError
    from oodgate.config import ConfigError
    from oodgate.numerics import NumericsError
    from oodgate_mlflow.tracking import TrackingUnavailableError

    return (ConfigError, TrackingUnavailableError, NumericsError, PrefectUnavailableError)


if __name__ == "__main__":
    # As a program: the arguments, the numerics (before torch loads), the params and the MLflow store
    # are checked first, so that --help or a refusal answers in seconds with no server started; then
    # Prefect's temporary server (without PREFECT_API_URL) boots in its own process while Prefect,
    # MLflow and the tasks import below.
    try:
        _checked(sys.argv[1:])
    except _refusals() as _e:
        print(f"error: {_e}", file=sys.stderr)
        sys.exit(2)
    from flows import start_temporary_prefect_server

    start_temporary_prefect_server()

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import prefect_api_url, start_temporary_prefect_server, wait_for_temporary_prefect_server
from oodgate import engine, numerics  # engine.STOP, by module: a served flow is pickled by value
from oodgate.config import Config, load_config
from oodgate.files import is_no_space
from oodgate.preflight import preflight
from oodgate.project import PROJECT_ROOT
from oodgate.steps import inputs
from oodgate.steps.common import exclusive
from oodgate.steps.gate_step import GateReport, gate_markdown
from oodgate_mlflow import tracking
from oodgate_mlflow.registry import Registration
from tasks.caching import Job
from tasks.data import check_data, prepare_data
from tasks.evaluate import calibrate_model, evaluate_model, select_score
from tasks.gate import gate_losses, samples_of
from tasks.track import (
    LossResult,
    evaluation_images,
    log_loss_run,
    package_model,
    register_model,
    reused_result,
)
from tasks.train import train_model


@dataclass
class Context:
    """What every step of one flow run needs: the config, where things go, and the lineage."""

    cfg: Config
    project: Path
    workdir: Path
    experiment_id: str
    parent_run_id: str
    lineage: dict[str, str]
    prepared_dir: str = ""
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def job(self, step: str, fingerprint: str, loss_id: str = "", seed: int = 0) -> Job:
        """A step's job: its output directory is named by its fingerprint, so runs with other inputs
        never overwrite each other and a rerun with the same inputs resumes or reuses."""
        out = self.workdir / "cache" / f"{step}-{fingerprint}"
        return Job(fingerprint, str(out), loss_id, seed)


@dataclass
class LossRun:
    """One loss's pending futures, all seeds in seed order, and the fingerprint of its child run."""

    loss_id: str
    fingerprint: str
    trained: list[PrefectFuture] = field(default_factory=list)
    calibrated: list[PrefectFuture] = field(default_factory=list)
    evaluated: list[PrefectFuture] = field(default_factory=list)
    selected: PrefectFuture | None = None
    packaged: PrefectFuture | None = None

    def futures(self) -> list[PrefectFuture]:
        extra = [f for f in (self.selected, self.packaged) if f is not None]
        return [*self.trained, *self.calibrated, *self.evaluated, *extra]


@dataclass
class Outcome:
    """What the flow run returns."""

    report: GateReport
    registration: Registration | None
    failed: dict[str, str]
    reused: list[str]
    parent_run_id: str
    seconds: float = 0.0


def task_runner_for(cfg: Config) -> TaskRunner:
    """The task runner ``orchestration`` names: one thread (one training at a time: a CPU training
    already keeps every core busy), or prefect-dask's runner on the scheduler at
    ``orchestration.address`` or on a local cluster of ``orchestration.workers`` processes (one
    task at a time each, bound to 127.0.0.1, no dashboard). Every task's inputs are paths, configs
    and fingerprints, so they travel to any worker that sees the work directory."""
    o = cfg.orchestration
    if o.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=1)
    import dask.config
    import torch
    from prefect_dask import DaskTaskRunner

    from flows import dask_cluster
    from oodgate import numerics

    if o.address is not None:  # its workers were started with `python -m oodgate numerics`'s variables
        return DaskTaskRunner(address=o.address)
    # Dask starts its workers with OMP_NUM_THREADS=1; a CPU result depends on the thread count and
    # the kernels, so the workers get the params' numerics (or, with numerics.threads: null, this
    # process's count), and a Dask run gives the thread runner's metrics.
    # And without MALLOC_TRIM_THRESHOLD_=65536: returning freed memory at once made each training
    # step allocate anew, and a training took 3.2x as long in a worker (2.35 s against 0.74 s).
    n = cfg.numerics
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.update(numerics.environment(n.mode, n.threads or torch.get_num_threads()))
    # Without PREFECT_API_URL each worker process started a temporary Prefect server of its own
    # (about 220 MB each), left running when the workers were killed; they report to the flow's.
    api_url = prefect_api_url()
    if api_url:
        environ["PREFECT_API_URL"] = api_url
    else:
        environ.pop("PREFECT_API_URL", None)
    if o.workers > 1:
        # Several workers with this many threads each share the cores: OpenMP threads that spin while
        # they wait took the cores from each other (4 trainings on 2 workers of 2 threads on 2 cores:
        # 19.8 s; waiting passively: 3.6 s; the same numbers either way)
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": o.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            "worker_class": dask_cluster.Nanny,  # time for the workers to exit (flows/dask_cluster.py)
        }
    )


def _on_dask() -> bool:
    """Whether this flow run's tasks go to prefect-dask's runner."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx is not None and type(ctx.task_runner).__name__ == "DaskTaskRunner"


@flow(name="oodgate-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def pipeline(
    params_path: str = "params.yaml",
    root: str | None = None,
    overrides: dict[str, object] | None = None,
) -> Outcome:
    """Train the SoftMax baseline and every candidate loss, gate them, register the winners.

    ``params_path`` is relative to ``root``, the project directory holding ``data.dvc``, the data and
    the work directory (default: this repository). ``overrides`` are dotted keys
    (``{"train.epochs": 2}``). An invalid config fails the run before any work starts.
    """
    project = Path(root).resolve() if root else PROJECT_ROOT
    cfg = load_config(project / params_path, overrides).in_project(project)
    preflight(cfg, project=project)  # a missing GPU, OOD file or image folder fails before any task
    if cfg.orchestration.task_runner == "dask" and not _on_dask():
        # However the run was started (python -m flows.pipeline, a served or work-pool deployment,
        # the UI), params choose the engine: the run goes on as a nested flow run on Dask.
        return pipeline.with_options(task_runner=task_runner_for(cfg))(params_path, root, overrides)
    t_start = time.perf_counter()
    data_version = check_data(str(project), cfg.data.root)
    tracking.connect(root=project)
    exp_id = tracking.ensure_experiment(cfg.registry.experiment, project)
    lineage = {
        "oodgate.host": socket.gethostname(),
        "oodgate.pid": str(os.getpid()),  # with the host: lets a later run close what a SIGKILL left open
        "oodgate.git_commit": tracking.git_commit(),
        "oodgate.code_version": inputs.digest(inputs.code_versions()),
        "oodgate.data_version": data_version,
        "oodgate.prefect_flow_run_id": flow_run.get_id() or "none",
        **tracking.numerics_tags(numerics.provenance(cfg.numerics.mode, cfg.numerics.threads)),
    }
    parent = tracking.start_run(
        exp_id, f"pipeline-{flow_run.get_name() or 'local'}", {**lineage, "oodgate.role": "pipeline"}
    )
    for run_id in tracking.close_orphans(exp_id, closed_by=f"pipeline run {parent}"):
        get_run_logger().warning(f"closed MLflow run {run_id}, left RUNNING by a process that died")
    tracking.log_params(parent, cfg.model_dump(mode="json"))
    ctx = Context(cfg, project, (project / cfg.workdir).resolve(), exp_id, parent, lineage)
    try:
        ctx.prepared_dir = _prepare(ctx, data_version)
        logged, failed = _train_and_log(ctx)
        outcome = _gate_and_register(ctx, logged, failed)
    except BaseException as e:
        # SIGINT, or SIGTERM (Prefect turns it into TerminationSignal; a runner cancelling a
        # deployment run sends it too): stop the training thread within a batch, mark the runs KILLED.
        signal_name = _interruption(e)
        if signal_name is not None:
            engine.STOP.set(signal_name)  # also starts the entry point's unwind deadline
            _stop_dask_training(signal_name)
        status, reason = (
            ("KILLED", f"interrupted: {signal_name} received")
            if signal_name is not None
            else ("FAILED", f"{type(e).__name__}: {e}")
        )
        tracking.close_open_children(parent, status, reason[:4000])
        tracking.set_tags(parent, {"oodgate.failure": reason[:4000]})
        tracking.end_run(parent, status)
        raise
    outcome.seconds = round(time.perf_counter() - t_start, 1)
    tracking.log_metrics(parent, {"time/pipeline_seconds": outcome.seconds})
    tracking.end_run(parent, "FINISHED")
    return outcome


def _stop_dask_training(signal_name: str) -> None:
    """On Dask, STOP in every worker too: a training there would go on to its last epoch, and the
    cluster's close would wait for it (then kill it)."""
    if not _on_dask():
        return
    from prefect.context import FlowRunContext

    from flows.dask_cluster import stop_training

    try:
        FlowRunContext.get().task_runner.client.run(stop_training, signal_name)
    except Exception as e:  # the workers or the scheduler are gone already (a signal to the group)
        get_run_logger().warning(f"could not stop the Dask workers' trainings: {type(e).__name__}: {e}")


def _interruption(e: BaseException) -> str | None:
    """The signal that interrupted the run (``SIGTERM``), or None if ``e`` is a failure. Prefect's
    TerminationSignal has no message, so the name is taken from its signal number."""
    if engine.STOP.is_set():
        return engine.STOP.reason or "SIGINT"
    if isinstance(e, TerminationSignal):
        return signal.Signals(e.signal).name
    if isinstance(e, KeyboardInterrupt):
        return "SIGINT"
    return None


def _prepare(ctx: Context, data_version: str) -> str:
    job = ctx.job("prepared", inputs.prepare_fingerprint(ctx.cfg, data_version))
    prepare_data.submit(ctx.cfg, job, str(ctx.project)).result()
    return job.out_dir


def _train_and_log(ctx: Context) -> tuple[dict[str, LossResult], dict[str, str]]:
    """Every loss: reuse its finished child run with the same fingerprint, or train, calibrate and
    evaluate all its seeds and log a new child run. A failed loss is reported, not raised.

    Every task is submitted at once (the task runner trains one at a time, in submission order),
    and each loss is logged as soon as its own tasks are done, while the next loss trains: logging
    (plots, the model, artifacts) would otherwise wait for the last training and leave a core idle.
    The flow's thread runs no torch code (the model is exported by a task): a second thread with an
    OpenMP team makes libgomp throttle the spin-waits of every team, and each later training took
    1.5x as long."""
    log = get_run_logger()
    logged: dict[str, LossResult] = {}
    pending: list[LossRun] = []
    for loss_id in ctx.cfg.losses:
        seeds = ctx.cfg.seeds_of(loss_id)  # one for a single imported checkpoint
        expected = [inputs.expected(ctx.cfg, loss_id, s, ctx.prepared_dir) for s in seeds]
        fp = inputs.digest([e.fingerprint["evaluate"] for e in expected])  # chains data, code, params
        found = _reusable(ctx, loss_id, fp, seeds)
        if found is not None:
            logged[loss_id] = found
        else:
            pending.append(_submit(ctx, loss_id, fp, expected))
    failed: dict[str, str] = {}
    for lr in pending:
        wait(lr.futures())
        result = _log(ctx, lr)
        if isinstance(result, str):
            failed[lr.loss_id] = result
            log.error(f"{lr.loss_id} failed: {result}")
        else:
            logged[lr.loss_id] = result
    return logged, failed


def _reusable(ctx: Context, loss_id: str, fp: str, seeds: list[int], after_ms: int = 0) -> LossResult | None:
    """The finished child run of a loss with the same fingerprint, reused only once everything it
    offers (per-seed metrics, samples, model) matches the digests recorded when it was logged: the
    gate reads the verified local copies. A run whose artifacts are gone, changed or unrecorded is
    computed and logged again, with one warning naming the file."""
    log = get_run_logger()
    run = tracking.find_finished_run(ctx.experiment_id, {"oodgate.loss": loss_id, "oodgate.fingerprint": fp})
    if run is None or run.info.start_time < after_ms:
        return None
    try:
        verified = tracking.verified_artifacts(
            run, seeds, ctx.workdir / "cache" / f"reused-{run.info.run_id}"
        )
    except tracking.UnverifiedArtifactError as e:
        log.warning(
            f"{loss_id}: not reusing run {run.info.run_id} (same inputs): {e}; computing and logging it again"
        )
        return None
    log.info(f"{loss_id}: reusing run {run.info.run_id} (same data, code and params; its artifacts verified)")
    return reused_result(run, verified)


def _submit(ctx: Context, loss_id: str, fp: str, expected: list[inputs.Expected]) -> LossRun:
    """Train, calibrate and evaluate every seed of one loss (Prefect caches each task by its job)."""
    cfg, prepared = ctx.cfg, ctx.prepared_dir
    lr = LossRun(loss_id, fp)
    seeds = cfg.seeds_of(loss_id)
    for seed, e in zip(seeds, expected):
        t = train_model.submit(cfg, ctx.job("train", e.fingerprint["train"], loss_id, seed), prepared)
        job = ctx.job("calibrate", e.fingerprint["calibrate"], loss_id, seed)
        lr.trained.append(t)
        lr.calibrated.append(calibrate_model.submit(cfg, job, t, prepared))
    # the loss's OOD score, chosen on validation data over every seed's model, before any evaluation
    job = ctx.job("select", expected[0].fingerprint["select"], loss_id, seeds[0])
    lr.selected = select_score.submit(cfg, job, lr.calibrated, prepared)
    for seed, e, c in zip(seeds, expected, lr.calibrated):
        job = ctx.job("evaluate", e.fingerprint["evaluate"], loss_id, seed)
        lr.evaluated.append(evaluate_model.submit(cfg, job, c, lr.selected, prepared))
    out = str(ctx.workdir / "cache" / f"package-{fp}")  # the model of the seed chosen on validation data
    lr.packaged = package_model.submit(loss_id, lr.trained, lr.calibrated, lr.evaluated, out)
    return lr


def _task_window_ms(futures: list[PrefectFuture]) -> tuple[int | None, int | None]:
    """When the first of these task runs started and the last one ended (Prefect's own records)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=[f.task_run_id for f in futures]))
        )
    starts = [r.start_time or r.expected_start_time for r in runs]
    ends = [r.end_time for r in runs]
    start = min((t for t in starts if t is not None), default=None)
    end = max((t for t in ends if t is not None), default=None)
    return (
        int(start.timestamp() * 1000) if start else None,
        int(end.timestamp() * 1000) if end else None,
    )


def _log(ctx: Context, lr: LossRun) -> LossResult | str:
    """The loss's child run: one logged by another pipeline run of this project while this one
    computed (found under the loss's lock, verified), or a new one (:func:`_log_new`). Two runs of
    the same project train each (loss, seed) once (the train step's lock) and log it once."""
    with exclusive(ctx.workdir / "cache" / f"log-{lr.fingerprint}"):
        wait(lr.futures())
        if all(f.state.is_completed() for f in lr.futures()):
            # only a run logged since this one started: an older one was already judged
            found = _reusable(ctx, lr.loss_id, lr.fingerprint, ctx.cfg.seeds_of(lr.loss_id), ctx.started_ms)
            if found is not None:
                return found
        return _log_new(ctx, lr)


def _log_new(ctx: Context, lr: LossRun) -> LossResult | str:
    """One child run for the loss, spanning exactly its own tasks; a failure is recorded and its
    reason returned, not raised."""
    cfg, loss = ctx.cfg, ctx.cfg.losses[lr.loss_id]
    role = "baseline" if lr.loss_id == cfg.gate.baseline else "candidate"
    tags = {
        **ctx.lineage,
        "oodgate.loss": lr.loss_id,
        "oodgate.method": loss.method,
        "oodgate.role": role,
        "oodgate.fingerprint": lr.fingerprint,
    }
    start_ms, end_ms = _task_window_ms(lr.futures())
    run_id = tracking.start_run(
        ctx.experiment_id, lr.loss_id, tags, parent_id=ctx.parent_run_id, start_time_ms=start_ms
    )
    first = cfg.seeds[0]
    tracking.log_params(
        run_id,
        {
            "loss_id": lr.loss_id,
            **{
                k: v
                for k, v in inputs.train_inputs(cfg, lr.loss_id, first).items()
                if k not in ("step", "seed")
            },
            "score": cfg.losses[lr.loss_id].score or "the method's default",
            "calibration": cfg.calibration.model_dump(),
            "seeds": cfg.seeds_of(lr.loss_id),
        },
    )
    try:
        # in the order the tasks depend on each other: the first failure is the one reported
        trained = [f.result() for f in lr.trained]
        calibrated = [f.result() for f in lr.calibrated]
        if lr.selected is not None:
            lr.selected.result()
        evaluated = [f.result() for f in lr.evaluated]
        packaged = lr.packaged.result()
    except Exception as e:  # NaN loss, crash after retries: this loss fails, the others go on
        reason = f"{type(e).__name__}: {e}"
        tracking.set_tags(run_id, {"oodgate.failure": reason[:4000]})
        tracking.end_run(run_id, "FAILED", end_ms)
        if is_no_space(e):  # every other loss would fail the same way: stop, and say why in one line
            raise
        return reason
    images = evaluation_images(ctx.prepared_dir)
    result = log_loss_run(run_id, cfg, lr.loss_id, trained, calibrated, evaluated, packaged, images)
    tracking.end_run(run_id, "FINISHED", end_ms)  # the run's duration is its tasks', not the logging's
    return result


def _gate_and_register(ctx: Context, logged: dict[str, LossResult], failed: dict[str, str]) -> Outcome:
    cfg = ctx.cfg
    base_id = cfg.gate.baseline
    if base_id not in logged:
        raise RuntimeError(f"the baseline {base_id!r} failed ({failed.get(base_id)}); nothing can be gated")
    reused_ids = {k: v.run_id for k, v in logged.items() if v.reused}
    tracking.set_tags(
        ctx.parent_run_id,
        {"oodgate.reused_runs": ",".join(f"{k}={v}" for k, v in reused_ids.items()) or "none"},
    )
    report = gate_losses(cfg, logged)
    lock = str(ctx.workdir / ".registry.lock")
    registration = None
    best = report.challenger
    if best is not None:  # the run's best candidate: the challenger, and champion if it wins
        seeds = cfg.seeds_of(best)
        deployable = samples_of(cfg, logged[best])[seeds.index(logged[best].seed)]
        registration = register_model(
            cfg, best, logged[best], report.decisions[best], deployable, ctx.prepared_dir, lock, report.rule
        )
    _record(ctx, report, registration, failed, logged)
    return Outcome(report, registration, failed, sorted(reused_ids), ctx.parent_run_id)


def _record(
    ctx: Context,
    report: GateReport,
    registration: Registration | None,
    failed: dict[str, str],
    logged: dict[str, LossResult],
) -> None:
    """The decisions into MLflow (parent and fresh child runs) and a Prefect markdown artifact."""
    parent = ctx.parent_run_id
    for loss_id, d in report.decisions.items():
        decision = {
            "oodgate.gate": "promote" if d.promote else "reject",
            "oodgate.gate_reasons": "; ".join(d.reasons),
            "oodgate.gate_tests": json.dumps(d.tests, sort_keys=True),  # each criterion's test and bound
            "oodgate.gate_compared": d.compared or "the means over seeds",
            "oodgate.gate_seed_level": "; ".join(d.seed_level)[:5000] or "none",
        }
        if not logged[loss_id].reused:
            tracking.set_tags(logged[loss_id].run_id, decision)
            tracking.log_metrics(logged[loss_id].run_id, d.evidence)
        tracking.set_tags(parent, {f"oodgate.gate.{loss_id}": decision["oodgate.gate"]})
        # gate/<loss>/<metric>/{gain,lower,p_value}: the evidence side by side in the runs table
        tracking.log_metrics(
            parent, {f"gate/{loss_id}/{k.removeprefix('gate/')}": v for k, v in d.evidence.items()}
        )
    text = report_markdown(report, registration, failed)
    tracking.log_text(parent, text, "comparison.md")
    tracking.log_text(parent, report.table, "comparison_table.md")
    tracking.set_tags(
        parent,
        {
            "oodgate.promoted": ",".join(report.promoted) or "none",
            "oodgate.challenger": report.challenger or "none",
            "oodgate.champion": (
                registration.loss if registration is not None and registration.promoted_now else "unchanged"
            ),
            "oodgate.registry": registration.line() if registration is not None else "nothing registered",
        },
    )
    create_markdown_artifact(
        text, key="gate-decision", description="loss x metrics table and the gate decision"
    )
    print(text)


def report_markdown(report: GateReport, registration: Registration | None, failed: dict[str, str]) -> str:
    lines = ["# oodgate pipeline", "", report.table, "", gate_markdown(report), "## Registry", ""]
    if registration is None:
        lines.append("Nothing registered: no candidate was evaluated.")
    else:
        lines.append(f"- {registration.line()}")
        lines += [f"    - {x}" for x in registration.reasons]
        if not registration.champion:
            lines.append(
                "- No champion from this run: use the challenger anyway with `make serve-model "
                "ARGS='--alias challenger'` or `load_champion(alias='challenger')`"
            )
    for loss_id, reason in failed.items():
        lines.append(f"- {loss_id}: FAILED, not gated ({reason})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from oodgate import numerics

    try:
        args, params, overrides, cfg = _checked(argv)  # a bad config fails here, before Prefect starts
    except _refusals() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = Path(args.root).resolve() if args.root else None
    print(numerics.banner(cfg.numerics.mode, cfg.numerics.threads), flush=True)
    start_temporary_prefect_server()  # started already when run as a program: then this returns at once
    _stop_on_signals()
    _exit_if_stuck()
    try:
        wait_for_temporary_prefect_server()
        outcome = pipeline(
            params_path=str(params), root=str(root) if root else None, overrides=overrides or None
        )
    except BaseException as e:
        if isinstance(e, TerminationSignal):  # raised outside the flow's body, which sets STOP
            engine.STOP.set(signal.Signals(e.signal).name)
        if engine.STOP.is_set():  # whatever the unwinding raised after (a temporary server already gone)
            print(f"error: {engine.STOP.reason}: stopped; the MLflow runs are marked KILLED", file=sys.stderr)
            return 130
        if not isinstance(e, Exception):
            raise
        from oodgate.files import no_space_error

        if is_no_space(e):  # where, which file, and that a re-run after freeing space reuses the rest
            print(f"error: {no_space_error(e, (root or PROJECT_ROOT) / cfg.workdir)}", file=sys.stderr)
            return 1
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    # The table and the decision on stdout, after the flow: inside it they are Prefect log lines on
    # stderr, and `make run > out.txt` captured none of them.
    print(report_markdown(outcome.report, outcome.registration, outcome.failed), end="", flush=True)
    return 0


UNWIND_SECONDS = 15


def _exit_if_stuck() -> None:
    """A signal to the process group (Ctrl-C, ``kill -- -PGID``, ``timeout``, systemd) reaches the
    temporary Prefect server too; the flow then marks its MLflow runs KILLED at once, but Prefect
    retried reporting the crash to the dead server for minutes (SIGTERM: 217 s). From the moment
    STOP is set (by :func:`_stop_on_signals`' handler, or by the flow when Prefect's own SIGTERM
    handler, installed for the flow run, raised instead), the unwinding has UNWIND_SECONDS; past
    them, stop any temporary server and exit with status 130 (SIGINT and SIGTERM alike: the run was
    interrupted, and a caller tells it from a failure, 1, by one number)."""

    def watchdog() -> None:
        engine.STOP.wait()
        time.sleep(UNWIND_SECONDS)
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(getattr(SubprocessASGIServer, "_instances", {}).values()):
            server.stop()
        print(
            f"error: {engine.STOP.reason}: stopped; the MLflow runs are marked KILLED (the Prefect server was "
            "gone, so the flow run's last state could not be reported)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(130)

    threading.Thread(target=watchdog, name="oodgate-unwind-watchdog", daemon=True).start()


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM stop the run within a training batch: every training loop checks STOP, and
    the main thread unwinds through the flow (MLflow runs marked KILLED, the temporary Prefect server
    stopped) instead of dying with runs left RUNNING and the server orphaned. Inside a flow run
    Prefect's engine has its own SIGTERM handler (it raises TerminationSignal, which the flow turns
    into STOP) and hands the signal back to this one once the flow run has ended."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if engine.STOP.is_set():
            return  # one interrupt is enough; the unwinding is under way
        engine.STOP.set(name)
        raise KeyboardInterrupt(f"{name} received")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
