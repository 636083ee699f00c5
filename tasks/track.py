"""The tasks that package and log one loss: the serving model exported from the seed chosen on
validation data, and the loss's child run written through :class:`oodgate_mlflow.runs.PipelineRun`."""

from __future__ import annotations

from dataclasses import asdict, astuple
from pathlib import Path

import torch
from prefect import task

from oodgate.base.files import read_json, write_json
from oodgate.base.records import Calibrated, Evaluated, Trained
from oodgate.deciding.gate import choose_seed
from oodgate.learning.classifier import load_classifier, with_score
from oodgate.learning.serving import ServingModel, fingerprint
from oodgate.measuring.evaluation import THRESHOLD_TPR
from oodgate.running.steps.reuse import exclusive
from oodgate_mlflow import tracking
from oodgate_mlflow.runs import LossResult, Packaged, PipelineRun


@task(name="package-model", task_run_name="package-{loss_id}")
def package_model(
    loss_id: str,
    trained: list[Trained],
    calibrated: list[Calibrated],
    evaluated: list[Evaluated],
    out_dir: str,
) -> Packaged:
    """Export the calibrated model of the seed chosen on validation data
    (:func:`oodgate.deciding.gate.choose_seed`), with its OOD threshold and reference, into ``out_dir``.

    A task of its own so that it runs on the task runner's thread like training: the flow logs each
    loss while the next one trains, and torch code run in the flow's thread as well would give that
    thread an OpenMP team of its own, which makes libgomp throttle every team's spin-waits."""
    out = Path(out_dir)
    done = out.with_name(out.name + ".json")  # written last, beside what the child run logs
    with exclusive(out):  # two runs of one project package the same model once; the second reuses it
        if done.is_file() and (out / "torch_model").is_dir():
            record = read_json(done)
            return Packaged(out_dir, record["fingerprint"], record["seed"], record["seed_choice"])
        done.unlink(missing_ok=True)
        packaged = _package(trained, calibrated, evaluated, out)
        write_json(done, {k: v for k, v in asdict(packaged).items() if k != "dir"})
        return packaged


def _package(
    trained: list[Trained], calibrated: list[Calibrated], evaluated: list[Evaluated], out: Path
) -> Packaged:
    seed, why = astuple(choose_seed({e.seed: e.metrics for e in evaluated}))
    calibrated_seed = next(c for c in calibrated if c.seed == seed)
    chosen = next(e for e in evaluated if e.seed == seed)
    model = with_score(load_classifier(Path(calibrated_seed.dir) / "calibrated.pt"), chosen.score)
    serving = ServingModel(model, chosen.threshold)
    size = (2, model.spec.in_channels, model.spec.image_size, model.spec.image_size)
    example = torch.rand(size, generator=torch.Generator().manual_seed(0))  # not the global RNG
    samples = torch.load(Path(chosen.dir) / "samples.pt", weights_only=True)
    reference = {
        "score": chosen.score,
        "threshold": chosen.threshold,
        "tpr": THRESHOLD_TPR,
        "validation_scores": samples["val_scores"].tolist(),
    }
    tracking.export_model(
        out, serving, example, list(model.spec.class_names), reference, model.spec.preprocessing
    )
    return Packaged(str(out), fingerprint(serving), seed, why)


@task(name="log-loss-run", task_run_name="log-{loss_id}", retries=2, retry_delay_seconds=2)
def log_loss_run(
    run: PipelineRun,
    run_id: str,
    loss_id: str,
    trained: list[Trained],
    calibrated: list[Calibrated],
    evaluated: list[Evaluated],
    packaged: Packaged,
    evaluation_data: str,
    end_ms: int | None = None,
) -> LossResult:
    """One loss's child run written (:meth:`PipelineRun.log_loss`); retried on a store's hiccup."""
    return run.log_loss(run_id, loss_id, trained, calibrated, evaluated, packaged, evaluation_data, end_ms)
