"""The pipeline's MLflow runs: one parent run per flow run, one child run per loss. Every metric name
and tag the pipeline writes is made here, behind one typed interface (:class:`PipelineRun`); the
flow calls it and never :mod:`oodgate_mlflow.tracking` itself.

Metric names in a child run follow one scheme, ``<section>/<name>``:

- ``test/accuracy``, ``ood/<set>/fpr95``, ...: the mean over seeds;
- ``std/test/accuracy``, ...: the sample standard deviation over seeds (with two seeds or more);
- ``seed<k>/test/accuracy``, ``seed<k>/val/ece``, ``seed<k>/calibration/temperature``: one seed's
  final values;
- ``history/seed<k>/train_loss``, ``history/seed<k>/val_accuracy``, ...: per-epoch curves (step = epoch);
- ``time/train_seconds``: wall time spent training in this run (0 when every training was reused), and
  ``time/seed<k>/epoch_seconds`` per epoch: every wall-clock time is under ``time/``;
- ``gate/<metric>/{gain,lower,p_value}``: the gate's evidence for the loss.

The parent run holds the params, the lineage tags (``oodgate.git_commit``, ``oodgate.code_version``,
``oodgate.data_version``, the numerics), ``gate/<loss>/<metric>/...`` side by side, the tags
``oodgate.gate.<loss>``, ``oodgate.promoted``, ``oodgate.challenger``, ``oodgate.champion`` and
``oodgate.registry``, and ``comparison.md``.

A child run is found again by its fingerprint (``oodgate.fingerprint``: data, code and params of every
seed) and reused only once its per-seed metrics, samples and model match the digests recorded when it
was logged (:func:`oodgate_mlflow.tracking.verified_artifacts`).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodgate.base.config import Config
from oodgate.base.files import digest
from oodgate.base.numerics import PROVENANCE, provenance
from oodgate.base.records import Calibrated, Evaluated, Trained
from oodgate.measuring import metrics
from oodgate.running.steps.gate_step import GateReport, gate_markdown
from oodgate.running.steps.inputs import code_versions, train_inputs
from oodgate_mlflow import registry, tracking
from oodgate_mlflow.registry import Registration

MAX_TAG = 4000  # a failure's text in a tag


@dataclass(frozen=True)
class Packaged:
    """One loss's serving model exported to files (``tasks.track.package_model``): the model of the
    seed chosen on validation data."""

    dir: str  # what tracking.export_model writes
    fingerprint: str  # oodgate.learning.serving.fingerprint of the serving model
    seed: int = 0
    seed_choice: str = ""


@dataclass(frozen=True)
class LossResult:
    """One loss, all seeds, as logged in its child run: what the gate and the registry read."""

    loss: str
    run_id: str
    model_uri: str
    model_fingerprint: str | None
    mean: dict[str, float]
    score: str
    metrics_by_seed: list[dict[str, float]]
    std: dict[str, float] = field(default_factory=dict)
    sample_dirs: list[str] | None = None  # the evaluation directories, or a reused run's verified copies
    train_seconds: float = 0.0
    reused: bool = False
    seed: int = 0  # the seed whose model is logged (chosen on validation data)
    seed_choice: str = ""
    evaluation_data: str = ""  # digest of the test and OOD images (registry.EVALUATION_DATA_TAG)
    score_choice: str = ""  # the score and why (oodgate.measuring.evaluation.ScoreChoice.text)
    model_digest: str = ""  # the logged model's files, as recorded (tracking.MODEL_DIGEST)


@dataclass
class Outcome:
    """What a pipeline run returns: the gate's report, what it did to the registry, the losses that
    failed (with why), the losses whose child runs were reused, the parent run, the wall time."""

    report: GateReport
    registration: Registration | None
    failed: dict[str, str]
    reused: list[str]
    parent_run_id: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Reuse:
    """What :meth:`PipelineRun.reusable` found: a verified earlier child run, or why there is none
    (``note``: a line for the flow's log; empty when no run has these inputs)."""

    result: LossResult | None
    note: str = ""


@dataclass(frozen=True)
class PipelineRun:
    """One flow run's parent MLflow run: its experiment, id and lineage tags (copied onto every child)."""

    experiment_id: str
    run_id: str
    lineage: dict[str, str]
    cache_dir: str  # where verified copies of a reused run's artifacts go
    closed_orphans: tuple[str, ...] = ()  # runs left RUNNING by a process that died, now KILLED

    @classmethod
    def start(
        cls, cfg: Config, project: Path, data_version: str, flow_run_name: str | None, flow_run_id: str | None
    ) -> PipelineRun:
        """Connect to the store, open the parent run (``pipeline-<flow run's name>``) with its
        lineage (host and pid, git commit, code and data versions, the Prefect flow run, the
        numerics) and the params, and close the runs a dead process left RUNNING on this machine."""
        tracking.connect(root=project)
        experiment_id = tracking.ensure_experiment(cfg.registry.experiment, project)
        lineage = {
            "oodgate.host": socket.gethostname(),
            "oodgate.pid": str(os.getpid()),  # with the host: lets a later run close what a SIGKILL left open
            "oodgate.git_commit": tracking.git_commit(),
            "oodgate.code_version": digest(code_versions()),
            "oodgate.data_version": data_version,
            "oodgate.prefect_flow_run_id": flow_run_id or "none",
            **tracking.numerics_tags(provenance(cfg.numerics.mode, cfg.numerics.threads)),
        }
        name = f"pipeline-{flow_run_name or 'local'}"
        run_id = tracking.start_run(experiment_id, name, {**lineage, "oodgate.role": "pipeline"})
        closed = tracking.close_orphans(experiment_id, closed_by=f"pipeline run {run_id}")
        tracking.log_params(run_id, cfg.model_dump(mode="json"))
        cache = str((project / cfg.workdir / "cache").resolve())
        return cls(experiment_id, run_id, lineage, cache, tuple(closed))

    # ------------------------------------------------------------ the losses' child runs
    def reusable(self, loss_id: str, fingerprint: str, seeds: list[int]) -> Reuse:
        """The newest finished child run of ``loss_id`` with this fingerprint, once its artifacts
        match the digests recorded when it was logged; a run whose artifacts are gone, changed or
        unrecorded is not reused, and the note says which file."""
        run = tracking.find_finished_run(
            self.experiment_id, {"oodgate.loss": loss_id, "oodgate.fingerprint": fingerprint}
        )
        if run is None:
            return Reuse(None)
        try:
            verified = tracking.verified_artifacts(
                run, seeds, Path(self.cache_dir) / f"reused-{run.info.run_id}"
            )
        except tracking.UnverifiedArtifactError as e:
            return Reuse(
                None,
                f"{loss_id}: not reusing run {run.info.run_id} (same inputs): {e}; computing and logging it again",
            )
        note = (
            f"{loss_id}: reusing run {run.info.run_id} (same data, code and params; its artifacts verified)"
        )
        return Reuse(_reused_result(run, verified), note)

    def start_loss(self, cfg: Config, loss_id: str, fingerprint: str, start_ms: int | None) -> str:
        """A child run for the loss, its start the first of its tasks' (``start_ms``); returns its id."""
        loss = cfg.losses[loss_id]
        tags = {
            **self.lineage,
            "oodgate.loss": loss_id,
            "oodgate.method": loss.method,
            "oodgate.role": "baseline" if loss_id == cfg.gate.baseline else "candidate",
            "oodgate.fingerprint": fingerprint,
        }
        run_id = tracking.start_run(
            self.experiment_id, loss_id, tags, parent_id=self.run_id, start_time_ms=start_ms
        )
        inputs = train_inputs(cfg, loss_id, cfg.seeds[0])
        tracking.log_params(
            run_id,
            {
                "loss_id": loss_id,
                **{k: v for k, v in inputs.items() if k not in ("step", "seed")},
                "score": loss.score or "the method's default",
                "calibration": cfg.calibration.model_dump(),
                "seeds": cfg.seeds_of(loss_id),
            },
        )
        return run_id

    def fail_loss(self, run_id: str, reason: str, end_ms: int | None) -> None:
        tracking.set_tags(run_id, {"oodgate.failure": reason[:MAX_TAG]})
        tracking.end_run(run_id, "FAILED", end_ms)

    def log_loss(
        self,
        run_id: str,
        loss_id: str,
        trained: list[Trained],
        calibrated: list[Calibrated],
        evaluated: list[Evaluated],
        packaged: Packaged,
        evaluation_data: str,
        end_ms: int | None = None,
    ) -> LossResult:
        """The packaged model, history, metrics, plots and provenance of one loss (all seeds) into its
        child run, the digests of what a later run may reuse recorded, and the run ended at
        ``end_ms`` (its duration is its tasks', not the logging's). No torch code runs here. The
        model goes first: MLflow reads every metric's history when it logs a model after them
        (:func:`oodgate_mlflow.tracking.log_exported_model`)."""
        model_uri = tracking.log_exported_model(run_id, Path(packaged.dir), finish=False)
        with tempfile.TemporaryDirectory() as tmp:  # the files as a later run will download them
            model_digest = tracking.model_files_digest(tracking.download_model(model_uri, Path(tmp) / "m"))
        for t in trained:
            history, times = _history(t)
            tracking.log_history(run_id, history, prefix=f"history/seed{t.seed}/")
            tracking.log_history(run_id, times, prefix=f"time/seed{t.seed}/")
        reports = [e.metrics for e in evaluated]
        mean, std = metrics.aggregate(reports)
        train_seconds = sum(t.train_seconds for t in trained)
        final = {**mean, **({f"std/{k}": v for k, v in std.items()} if len(reports) > 1 else {})}
        final["time/train_seconds"] = train_seconds
        for c, e in zip(calibrated, evaluated, strict=True):
            # Both hold calibration/temperature: evaluate's is the float32 the model applies (the value
            # DVC's metrics file holds), calibrate's the float64 fit; log one value per key.
            final.update({f"seed{e.seed}/{k}": v for k, v in e.metrics.items()})
            final.update({f"seed{c.seed}/{k}": v for k, v in c.metrics.items() if k not in e.metrics})
            tracking.log_artifacts(run_id, Path(e.dir) / "plots", f"plots/seed{e.seed}")
            tracking.log_artifacts(run_id, Path(e.dir) / "samples.pt", f"samples/seed{e.seed}")
        tracking.log_metrics(run_id, final)
        # the model's own figures (its seed's) on its page; linking all the run's (every seed's, the
        # means) cost 0.6 s per loss, 1.2 ms a metric in MLflow's SQL store
        own = f"seed{packaged.seed}/"
        tracking.link_metrics(run_id, model_uri, {k: v for k, v in final.items() if k.startswith(own)})
        by_seed_text = json.dumps(reports, indent=1)
        tracking.log_text(run_id, by_seed_text, "metrics_by_seed.json")
        for t, c, e in zip(trained, calibrated, evaluated, strict=True):  # what computed each result, where
            for step, d in (("train", t.dir), ("calibrate", c.dir), ("evaluate", e.dir)):
                tracking.log_artifacts(run_id, Path(d) / PROVENANCE, f"provenance/seed{t.seed}/{step}")
        provenance = Path(trained[0].dir) / PROVENANCE
        if provenance.is_file():
            tracking.set_tags(run_id, tracking.numerics_tags(json.loads(provenance.read_text())))
        chosen = next(e for e in evaluated if e.seed == packaged.seed)  # the logged model's seed
        temperature = next(c for c in calibrated if c.seed == packaged.seed).temperature
        tracking.set_tags(
            run_id,
            {
                "oodgate.score": chosen.score,
                "oodgate.score_choice": chosen.score_choice,  # why (the validation evidence of auto)
                "oodgate.device": trained[0].device,
                "oodgate.threshold": f"{chosen.threshold:.6g}",
                "oodgate.temperature": f"{temperature:.6g}",
                "oodgate.model_fingerprint": packaged.fingerprint,
                "oodgate.model_seed": str(packaged.seed),
                "oodgate.seed_choice": packaged.seed_choice,
                "oodgate.model_uri": model_uri,
                registry.EVALUATION_DATA_TAG: evaluation_data,
            },
        )
        digests = {
            "metrics_by_seed.json": tracking.text_digest(by_seed_text),
            **{
                f"samples/seed{e.seed}/samples.pt": tracking.file_sha256(Path(e.dir) / "samples.pt")
                for e in evaluated
            },
            tracking.MODEL_DIGEST: model_digest,
        }
        tracking.record_artifact_digests(run_id, digests)  # last: a run without it is never reused
        tracking.end_run(run_id, "FINISHED", end_ms)
        return LossResult(
            loss=loss_id,
            run_id=run_id,
            model_uri=model_uri,
            model_fingerprint=packaged.fingerprint,
            mean=mean,
            std=std,
            score=chosen.score,
            metrics_by_seed=reports,
            sample_dirs=[e.dir for e in evaluated],
            train_seconds=train_seconds,
            seed=packaged.seed,
            seed_choice=packaged.seed_choice,
            evaluation_data=evaluation_data,
            score_choice=chosen.score_choice,
            model_digest=model_digest,
        )

    # ------------------------------------------------------------ the decision and the end
    def record_gate(
        self,
        report: GateReport,
        registration: Registration | None,
        failed: dict[str, str],
        logged: dict[str, LossResult],
    ) -> str:
        """The gate's decisions and the registry's outcome on the parent run and on the child runs
        logged by this flow run (a reused run keeps the tags of the run that logged it); returns the
        markdown report, also logged as ``comparison.md``."""
        reused = {k: v.run_id for k, v in logged.items() if v.reused}
        tracking.set_tags(
            self.run_id, {"oodgate.reused_runs": ",".join(f"{k}={v}" for k, v in reused.items()) or "none"}
        )
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
            tracking.set_tags(self.run_id, {f"oodgate.gate.{loss_id}": decision["oodgate.gate"]})
            # gate/<loss>/<metric>/{gain,lower,p_value}: the evidence side by side in the runs table
            tracking.log_metrics(
                self.run_id, {f"gate/{loss_id}/{k.removeprefix('gate/')}": v for k, v in d.evidence.items()}
            )
        text = report_markdown(report, registration, failed)
        tracking.log_text(self.run_id, text, "comparison.md")
        tracking.log_text(self.run_id, report.table, "comparison_table.md")
        promoted_now = registration is not None and registration.promoted_now
        tracking.set_tags(
            self.run_id,
            {
                "oodgate.promoted": ",".join(report.promoted) or "none",
                "oodgate.challenger": report.challenger or "none",
                "oodgate.champion": registration.loss if promoted_now and registration else "unchanged",
                "oodgate.registry": registration.line() if registration is not None else "nothing registered",
            },
        )
        return text

    def finish(self, seconds: float) -> None:
        tracking.log_metrics(self.run_id, {"time/pipeline_seconds": seconds})
        tracking.end_run(self.run_id, "FINISHED")

    def fail(self, reason: str, interrupted: bool) -> None:
        """End the parent run and every child still open: KILLED when ``interrupted`` (a signal),
        else FAILED, with the reason as the tag ``oodgate.failure``."""
        status = "KILLED" if interrupted else "FAILED"
        tracking.close_open_children(self.run_id, status, reason[:MAX_TAG])
        tracking.set_tags(self.run_id, {"oodgate.failure": reason[:MAX_TAG]})
        tracking.end_run(self.run_id, status)


def report_markdown(report: GateReport, registration: Registration | None, failed: dict[str, str]) -> str:
    """The flow run's outcome as markdown: the table, the gate, the registry, the failed losses."""
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


def _history(trained: Trained) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The per-epoch curves, and the per-epoch wall times of the epochs trained in this run."""
    history: list[dict[str, float]] = json.loads((Path(trained.dir) / "history.json").read_text())
    seconds = list(trained.epoch_seconds)
    first = len(history) - len(seconds) + 1  # a resumed run times only the epochs it trained
    return history, [{"epoch": first + i, "epoch_seconds": s} for i, s in enumerate(seconds)]


def _reused_result(run: Any, verified: tracking.VerifiedArtifacts) -> LossResult:
    """The LossResult of a finished child run found by its fingerprint (nothing is recomputed), its
    per-seed metrics and samples the ``verified`` local copies."""
    tags = run.data.tags
    return LossResult(
        loss=tags["oodgate.loss"],
        run_id=run.info.run_id,
        model_uri=tags.get("oodgate.model_uri", ""),
        model_fingerprint=tags.get("oodgate.model_fingerprint"),
        mean={k: v for k, v in run.data.metrics.items() if k.startswith(("test/", "ood/"))},
        score=tags.get("oodgate.score", ""),
        metrics_by_seed=verified.metrics_by_seed,
        sample_dirs=verified.sample_dirs,
        reused=True,
        seed=int(tags.get("oodgate.model_seed", "0")),
        seed_choice=tags.get("oodgate.seed_choice", ""),
        evaluation_data=tags.get(registry.EVALUATION_DATA_TAG, ""),
        score_choice=tags.get("oodgate.score_choice", ""),
        model_digest=json.loads(tags.get(tracking.ARTIFACT_DIGESTS, "{}")).get(tracking.MODEL_DIGEST, ""),
    )
