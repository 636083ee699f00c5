"""The main flow: versioned data -> baseline + candidate losses -> calibration -> score selection ->
evaluation -> gate -> registration, every step tracked in MLflow.

Run it once: ``python -m flows.pipeline``; on a schedule: ``make serve``, then ``make trigger``.
No ``from __future__ import annotations``: a served deployment ships the flow's function by value
with cloudpickle, with only the globals its body uses, so string annotations would name types that
never arrive there. The flow's parameters are plain JSON types.
"""

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import entry, losses, server
from flows.losses import Context, LossRun
from oodgate.base import numerics
from oodgate.base.config import load_config
from oodgate.base.project import PROJECT_ROOT
from oodgate.running.preflight import check_dvc_project
from oodgate.running.steps import inputs
from oodgate_mlflow import tracking
from oodgate_mlflow.runs import LossResult, Outcome, PipelineRun, report_markdown
from tasks.data import check_data, prepare_data
from tasks.evaluate import calibrate_model, evaluate_model, select_score
from tasks.gate import gate_losses, samples_of
from tasks.registry import register_model
from tasks.track import package_model
from tasks.train import train_model


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
    entry.preflight_once(cfg, project)  # a missing GPU, OOD file or image folder fails before any task
    if cfg.orchestration.task_runner == "dask" and not entry.on_dask():
        # However the run was started, params choose the engine: it goes on as a nested flow run.
        from flows.dask_cluster import task_runner_for  # 1.0 s of imports that a threads run never needs

        entry.checked(cfg, project)
        return pipeline.with_options(task_runner=task_runner_for(cfg))(params_path, root, overrides)
    started = time.perf_counter()
    data_version = check_data(str(project), cfg.data.root)
    run = PipelineRun.start(cfg, project, data_version, flow_run.get_name(), flow_run.get_id())
    for run_id in run.closed_orphans:
        get_run_logger().warning(f"closed MLflow run {run_id}, left RUNNING by a process that died")
    ctx = Context(cfg, run, (project / cfg.workdir).resolve())
    try:
        job = ctx.job("prepared", inputs.prepare_fingerprint(cfg, data_version))
        prepare_data.submit(cfg, job, str(project)).result()
        ctx.prepared_dir = job.out_dir
        outcome = _gate_and_register(ctx, *_train_and_log(ctx))
    except BaseException as e:
        # SIGINT, or SIGTERM (Prefect turns it into TerminationSignal; a runner cancelling a
        # deployment run sends it too): the trainings stop within a batch, the runs are marked KILLED
        signal_name = entry.interrupted(e)
        run.fail(
            f"interrupted: {signal_name} received" if signal_name else f"{type(e).__name__}: {e}",
            bool(signal_name),
        )
        bare = entry.bare_signal(e, signal_name)
        if bare is not None:
            raise bare from None
        raise
    outcome.seconds = round(time.perf_counter() - started, 1)
    run.finish(outcome.seconds)
    return outcome


def _train_and_log(ctx: Context) -> tuple[dict[str, LossResult], dict[str, str]]:
    """Every loss: reuse its verified child run with the same fingerprint, or train, calibrate, select
    and evaluate all its seeds and log a new child run. A failed loss is reported, not raised.

    Every task is submitted at once (the task runner trains one at a time, in submission order), and
    each loss is logged as soon as its own tasks are done, while the next loss trains."""
    log = get_run_logger()
    logged: dict[str, LossResult] = {}
    pending: list[LossRun] = []
    for loss_id in ctx.cfg.losses:
        expected = [inputs.expected(ctx.cfg, loss_id, s, ctx.prepared_dir) for s in ctx.cfg.seeds_of(loss_id)]
        fp = inputs.digest([e.fingerprint["evaluate"] for e in expected])  # chains data, code, params
        found = ctx.run.reusable(loss_id, fp, ctx.cfg.seeds_of(loss_id))
        if found.note:
            (log.info if found.result else log.warning)(found.note)
        if found.result is not None:
            logged[loss_id] = found.result
        else:
            pending.append(_submit(ctx, loss_id, fp, expected))
    failed: dict[str, str] = {}
    for lr in pending:
        result = losses.log_when_done(ctx, lr)
        if isinstance(result, str):
            failed[lr.loss_id] = result
            log.error(f"{lr.loss_id} failed: {result}")
        else:
            logged[lr.loss_id] = result
    return logged, failed


def _submit(ctx: Context, loss_id: str, fp: str, expected: list[inputs.Expected]) -> LossRun:
    """Train, calibrate, select and evaluate every seed of one loss; package the chosen seed's model."""
    cfg, prepared, lr = ctx.cfg, ctx.prepared_dir, LossRun(loss_id, fp)
    seeds = cfg.seeds_of(loss_id)
    for seed, e in zip(seeds, expected, strict=True):
        lr.trained.append(
            train_model.submit(cfg, ctx.job("train", e.fingerprint["train"], loss_id, seed), prepared)
        )
        job = ctx.job("calibrate", e.fingerprint["calibrate"], loss_id, seed)
        lr.calibrated.append(calibrate_model.submit(cfg, job, lr.trained[-1], prepared))
    # the loss's OOD score, chosen on validation data over every seed's model, before any evaluation
    job = ctx.job("select", expected[0].fingerprint["select"], loss_id, seeds[0])
    lr.selected.append(select_score.submit(cfg, job, lr.calibrated, prepared))
    for seed, e, c in zip(seeds, expected, lr.calibrated, strict=True):
        job = ctx.job("evaluate", e.fingerprint["evaluate"], loss_id, seed)
        lr.evaluated.append(evaluate_model.submit(cfg, job, c, lr.selected[0], prepared))
    out = str(ctx.workdir / "cache" / f"package-{fp}")  # the model of the seed chosen on validation data
    lr.packaged.append(package_model.submit(loss_id, lr.trained, lr.calibrated, lr.evaluated, out))
    return lr


def _gate_and_register(ctx: Context, logged: dict[str, LossResult], failed: dict[str, str]) -> Outcome:
    """The gate over every loss logged; the run's best candidate registered; the outcome recorded."""
    cfg, base_id = ctx.cfg, ctx.cfg.gate.baseline
    if base_id not in logged:
        raise RuntimeError(f"the baseline {base_id!r} failed ({failed.get(base_id)}); nothing can be gated")
    report = gate_losses(cfg, logged)
    registration, best = None, report.challenger
    if best is not None:  # the run's best candidate: the challenger, and champion if it wins
        deployable = samples_of(cfg, logged[best])[cfg.seeds_of(best).index(logged[best].seed)]
        decision, workdir = report.decisions[best], str(ctx.workdir)
        registration = register_model(
            cfg, best, logged[best], decision, deployable, ctx.prepared_dir, workdir, report.rule
        )
    text = ctx.run.record_gate(report, registration, failed, logged)
    create_markdown_artifact(
        text, key="gate-decision", description="loss x metrics table and the gate decision"
    )
    print(text)
    reused = sorted(k for k, v in logged.items() if v.reused)
    return Outcome(report, registration, failed, reused, ctx.run.run_id)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.pipeline``: the checks first (config, preflight, data project, MLflow store,
    Prefect API), then the flow on a temporary Prefect server; the report on stdout."""
    where = "relative to --root, else to the working directory"
    args = entry.parser("python -m flows.pipeline", "Run the pipeline flow once.", where).parse_args(argv)
    try:
        p = entry.load(args)
        entry.vouch(p.cfg, p.project)
        check_dvc_project(p.project, p.cfg.data.root)  # the flow checks data/ with DVC
        tracking.connect(root=p.project)  # an unreachable or read-only MLflow store fails here
        server.check_prefect_api()  # a PREFECT_API_URL that does not answer
    except entry.REFUSALS as e:
        return entry.refuse(e)
    print(numerics.banner(p.cfg.numerics.mode, p.cfg.numerics.threads), flush=True)
    server.start_temporary_prefect_server()  # started already when run as a program: then this returns at once
    entry.stop_on_signals()
    try:
        with server.temporary_api():
            outcome = pipeline(params_path=str(p.path), root=p.root, overrides=p.overrides or None)
    except BaseException as e:
        return entry.exit_status(e, p.project / p.cfg.workdir)
    # The table and the decision on stdout, after the flow: inside it they are Prefect log lines on
    # stderr, and `make run > out.txt` captured none of them.
    print(report_markdown(outcome.report, outcome.registration, outcome.failed), end="", flush=True)
    return 0


if __name__ == "__main__":
    entry.end(main())
