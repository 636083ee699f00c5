"""Prefect tasks that write one loss's child run and the registry entries.

Metric names in a child run follow one scheme, ``<section>/<name>``:

- ``test/accuracy``, ``ood/<set>/fpr95``, ...: the mean over seeds (what the gate compares);
- ``std/test/accuracy``, ...: the sample standard deviation over seeds (with two seeds or more);
- ``seed<k>/test/accuracy``, ``seed<k>/val/ece``, ``seed<k>/calibration/temperature``: one seed's
  final values;
- ``history/seed<k>/train_loss``, ``history/seed<k>/val_accuracy``, ...: per-epoch curves (step = epoch);
- ``time/train_seconds``: wall time spent training in this run (0 when every training was reused), and
  ``time/seed<k>/epoch_seconds`` per epoch: every wall-clock time is under ``time/``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from prefect import task

from oodgate import gate, metrics, steps
from oodgate.classifier import load_classifier, with_score
from oodgate.config import Config
from oodgate.evaluation import THRESHOLD_TPR
from oodgate.gate import SampleSet, choose_seed
from oodgate.serving import ServingModel, fingerprint
from oodgate.steps.common import PROVENANCE
from oodgate.steps.gate_step import LossDecision
from oodgate.steps.results import Calibrated, Evaluated, Trained
from oodgate_mlflow import registry, tracking
from oodgate_mlflow.integrity import ModelIntegrityError
from oodgate_mlflow.scoring import NotComparableError, score_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


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
    sample_dirs: list[str] | None = None  # None: the samples are the run's artifacts (a reused run)
    train_seconds: float = 0.0
    reused: bool = False
    seed: int = 0  # the seed whose model is logged (chosen on validation data)
    seed_choice: str = ""
    evaluation_data: str = ""  # digest of the test and OOD images (registry.EVALUATION_DATA_TAG)
    score_choice: str = ""  # the score and why (oodgate.evaluation.ScoreChoice.text)
    model_digest: str = ""  # the logged model's files, as recorded (tracking.MODEL_DIGEST)


@dataclass(frozen=True)
class Packaged:
    """One loss's serving model exported to files by :func:`package_model`: the model of the seed
    chosen on validation data."""

    dir: str  # what tracking.export_model writes
    fingerprint: str  # oodgate.serving.fingerprint of the serving model
    seed: int = 0
    seed_choice: str = ""


@task(name="package-model", task_run_name="package-{loss_id}")
def package_model(
    loss_id: str,
    trained: list[Trained],
    calibrated: list[Calibrated],
    evaluated: list[Evaluated],
    out_dir: str,
) -> Packaged:
    """Export the calibrated model of the seed chosen on validation data
    (:func:`oodgate.gate.choose_seed`), with its OOD threshold and reference, into ``out_dir``.

    A task of its own so that it runs on the task runner's thread like training: the flow logs each
    loss while the next one trains, and torch code run in the flow's thread as well would give that
    thread an OpenMP team of its own, which makes libgomp throttle every team's spin-waits."""
    seed, why = astuple(choose_seed({e.seed: e.metrics for e in evaluated}))
    calibrated_seed = next(c for c in calibrated if c.seed == seed)
    evaluated = next(e for e in evaluated if e.seed == seed)
    model = with_score(load_classifier(Path(calibrated_seed.dir) / "calibrated.pt"), evaluated.score)
    serving = ServingModel(model, evaluated.threshold)
    size = (2, model.spec.in_channels, model.spec.image_size, model.spec.image_size)
    example = torch.rand(size, generator=torch.Generator().manual_seed(0))  # not the global RNG
    samples = torch.load(Path(evaluated.dir) / "samples.pt", weights_only=True)
    reference = {
        "score": evaluated.score,
        "threshold": evaluated.threshold,
        "tpr": THRESHOLD_TPR,
        "validation_scores": samples["val_scores"].tolist(),
    }
    tracking.export_model(
        Path(out_dir), serving, example, list(model.spec.class_names), reference, model.spec.preprocessing
    )
    return Packaged(out_dir, fingerprint(serving), seed, why)


def _history(trained: Trained) -> tuple[list[dict], list[dict]]:
    """The per-epoch curves, and the per-epoch wall times of the epochs trained in this run."""
    history = json.loads((Path(trained.dir) / "history.json").read_text())
    seconds = list(trained.epoch_seconds)
    first = len(history) - len(seconds) + 1  # a resumed run times only the epochs it trained
    return history, [{"epoch": first + i, "epoch_seconds": s} for i, s in enumerate(seconds)]


@task(name="log-loss-run", task_run_name="log-{loss_id}", retries=2, retry_delay_seconds=2)
def log_loss_run(
    run_id: str,
    cfg: Config,
    loss_id: str,
    trained: list[Trained],
    calibrated: list[Calibrated],
    evaluated: list[Evaluated],
    packaged: Packaged | None = None,
    evaluation_data: str = "",
) -> LossResult:
    """History, metrics, plots and the calibrated model of one loss (all seeds) into its child run.

    ``packaged``: the model :func:`package_model` exported (the flow runs it on the task runner's
    thread); without it, the model is exported here. No torch code runs here otherwise.
    ``evaluation_data``: the digest of the test and OOD images (:func:`evaluation_images`)."""
    if packaged is None:
        with tempfile.TemporaryDirectory() as tmp:
            packaged = package_model.fn(loss_id, trained, calibrated, evaluated, str(Path(tmp) / "model"))
            return log_loss_run.fn(
                run_id, cfg, loss_id, trained, calibrated, evaluated, packaged, evaluation_data
            )
    for t in trained:
        history, times = _history(t)
        tracking.log_history(run_id, history, prefix=f"history/seed{t.seed}/")
        tracking.log_history(run_id, times, prefix=f"time/seed{t.seed}/")
    reports = [e.metrics for e in evaluated]
    mean, std = metrics.aggregate(reports)
    tracking.log_metrics(run_id, mean)
    if len(reports) > 1:
        tracking.log_metrics(run_id, {f"std/{k}": v for k, v in std.items()})
    train_seconds = sum(t.train_seconds for t in trained)
    tracking.log_metrics(run_id, {"time/train_seconds": train_seconds})
    for c, e in zip(calibrated, evaluated):
        # Both hold calibration/temperature: evaluate's is the float32 the model applies (the value
        # DVC's metrics file holds), calibrate's the float64 fit; log one value per key.
        tracking.log_metrics(run_id, {f"seed{e.seed}/{k}": v for k, v in e.metrics.items()})
        tracking.log_metrics(
            run_id, {f"seed{c.seed}/{k}": v for k, v in c.metrics.items() if k not in e.metrics}
        )
        tracking.log_artifacts(run_id, Path(e.dir) / "plots", f"plots/seed{e.seed}")
        tracking.log_artifacts(run_id, Path(e.dir) / "samples.pt", f"samples/seed{e.seed}")
    by_seed_text = json.dumps(reports, indent=1)
    tracking.log_text(run_id, by_seed_text, "metrics_by_seed.json")
    for t, c, e in zip(trained, calibrated, evaluated):  # what computed each result, on which machine
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
            registry.EVALUATION_DATA_TAG: evaluation_data,
        },
    )
    model_uri = tracking.log_exported_model(run_id, Path(packaged.dir))
    tracking.set_tags(run_id, {"oodgate.model_uri": model_uri})
    # what a later run may reuse from this one, digested into the tracking store
    with tempfile.TemporaryDirectory() as tmp:
        model_digest = tracking.model_files_digest(tracking.download_model(model_uri, Path(tmp) / "m"))
    digests = {
        "metrics_by_seed.json": tracking.text_digest(by_seed_text),
        **{
            f"samples/seed{e.seed}/samples.pt": tracking.file_sha256(Path(e.dir) / "samples.pt")
            for e in evaluated
        },
        tracking.MODEL_DIGEST: model_digest,
    }
    tracking.record_artifact_digests(run_id, digests)
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


def evaluation_images(prepared_dir: str | Path) -> str:
    """Which test and OOD images a run's metrics come from: the digest of the prepared ``id.pt`` and
    ``ood.pt``. Two runs with the same digest were evaluated on the same images, so their per-sample
    results can be resampled together (the registry's champion comparison)."""
    from oodgate.steps.common import digest, file_digest

    return digest([file_digest(Path(prepared_dir) / "id.pt"), file_digest(Path(prepared_dir) / "ood.pt")])


def reused_result(run, verified: tracking.VerifiedArtifacts) -> LossResult:
    """The LossResult of a finished child run found by its fingerprint (nothing is recomputed), its
    per-seed metrics and samples the ``verified`` local copies (:func:`tracking.verified_artifacts`)."""
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


def champion_judge(
    cfg: Config, loss_id: str, seed: int, candidate: SampleSet, prepared_dir: str
) -> registry.Judge:
    """The gate's rule and evidence, the promoted candidate against the current champion, both
    scored now on this run's test and OOD images (the champion from a copy of its files verified
    against the registry's record). A champion that cannot be scored on them (other classes, another
    input shape) stays, and one line says why; one whose files fail verification cannot be served,
    and is replaced."""

    def judge(champion: ModelVersion) -> tuple[bool, tuple[str, ...]]:
        tags = champion.tags or {}
        who = f"the champion v{champion.version} ({tags.get('oodgate.loss', '?')} seed {tags.get('oodgate.registered_seed', '?')})"
        bundle = steps.load_prepared(prepared_dir)
        images = {"": bundle.test.x.numpy(), **{k: v.x.numpy() for k, v in bundle.ood.items()}}
        try:
            scored = score_version(
                cfg.registry.model_name, champion, images, list(bundle.class_names), cfg.train.eval_batch_size
            )
        except NotComparableError as e:
            return False, (
                f"{who} stays: it cannot be scored on this run's images ({e}); a champion is replaced only by "
                "a model compared with it on the same images",
            )
        except ModelIntegrityError as e:
            return True, (f"{who} is replaced: its files fail verification, so it cannot be served ({e})",)
        probabilities, id_scores = scored.pop("")
        incumbent = gate.samples_from_probabilities(
            probabilities,
            bundle.test.y.numpy(),
            id_scores,
            {k: v for k, (_, v) in scored.items()},
            bundle.ood_groups,
        )
        d = gate.challenge(
            candidate,
            incumbent,
            cfg.gate,
            f"champion v{champion.version}",
            f"{loss_id} seed {seed} against {who}",
        )
        return d.promote, (d.compared, *d.reasons)

    return judge


@task(name="register", task_run_name="register-{loss_id}")
def register_model(
    cfg: Config,
    loss_id: str,
    logged: LossResult,
    decision: LossDecision,
    samples: SampleSet | None,
    prepared_dir: str,
    lock_path: str,
    rule: str,
) -> registry.Registration:
    """Register the run's best candidate ``loss_id`` as the challenger; the champion alias moves to
    it only if the gate promoted it (``decision``) and it beats the current champion on this run's
    images (:func:`champion_judge`; ``samples``: its deployable model's per-image arrays)."""
    candidate = registry.Candidate(
        loss=loss_id,
        model_uri=logged.model_uri,
        run_id=logged.run_id,
        fingerprint=logged.model_fingerprint,
        promote=decision.promote,
        reasons=decision.reasons,
        tests=decision.tests,
        by_metric=decision.by_metric,
        seed=logged.seed,
        seed_choice=logged.seed_choice,
        compared=decision.compared,
        model_digest=logged.model_digest or None,
    )
    judge = champion_judge(cfg, loss_id, logged.seed, samples, prepared_dir) if samples is not None else None
    return registry.register(cfg.registry.model_name, candidate, Path(lock_path), judge, rule)
