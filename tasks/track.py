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
from pathlib import Path

import torch
from prefect import task

from oodgate import evaluation
from oodgate.classifier import load_classifier
from oodgate.config import Config
from oodgate.serving import ServingModel, fingerprint
from tasks import registry, tracking


def _history(trained: dict) -> tuple[list[dict], list[dict]]:
    """The per-epoch curves, and the per-epoch wall times of the epochs trained in this run."""
    history = json.loads((Path(trained["dir"]) / "history.json").read_text())
    seconds = trained.get("epoch_seconds") or []
    first = len(history) - len(seconds) + 1  # a resumed run times only the epochs it trained
    return history, [{"epoch": first + i, "epoch_seconds": s} for i, s in enumerate(seconds)]


@task(name="log-loss-run", task_run_name="log-{loss_id}", retries=2, retry_delay_seconds=2)
def log_loss_run(
    run_id: str, cfg: Config, loss_id: str, trained: list[dict], calibrated: list[dict], evaluated: list[dict]
) -> dict:
    """History, metrics, plots and the calibrated model of one loss (all seeds) into its child run."""
    for t in trained:
        history, times = _history(t)
        tracking.log_history(run_id, history, prefix=f"history/seed{t['seed']}/")
        tracking.log_history(run_id, times, prefix=f"time/seed{t['seed']}/")
    reports = [e["metrics"] for e in evaluated]
    mean, std = evaluation.aggregate(reports)
    tracking.log_metrics(run_id, mean)
    if len(reports) > 1:
        tracking.log_metrics(run_id, {f"std/{k}": v for k, v in std.items()})
    tracking.log_metrics(run_id, {"time/train_seconds": sum(t.get("train_seconds", 0.0) for t in trained)})
    for t, c, e in zip(trained, calibrated, evaluated):
        seed = t["seed"]
        tracking.log_metrics(run_id, {f"seed{seed}/{k}": v for k, v in e["metrics"].items()})
        tracking.log_metrics(
            run_id,
            {f"seed{seed}/{k}": v for k, v in c.items() if k.startswith(("val/", "calibration/"))},
        )
        tracking.log_artifacts(run_id, Path(e["dir"]) / "plots", f"plots/seed{seed}")
        tracking.log_artifacts(run_id, Path(e["dir"]) / "samples.pt", f"samples/seed{seed}")
    tracking.log_text(run_id, json.dumps(reports, indent=1), "metrics_by_seed.json")
    first = evaluated[0]
    model = load_classifier(Path(calibrated[0]["dir"]) / "calibrated.pt")
    serving = ServingModel(model, first["threshold"])
    model_fp = fingerprint(serving)
    tracking.set_tags(
        run_id,
        {
            "oodgate.score": first["score"],
            "oodgate.device": trained[0]["device"],
            "oodgate.threshold": f"{first['threshold']:.6g}",
            "oodgate.temperature": f"{calibrated[0]['calibration/temperature']:.6g}",
            "oodgate.model_fingerprint": model_fp,
        },
    )
    size = (2, model.spec.in_channels, model.spec.image_size, model.spec.image_size)
    example = torch.rand(size, generator=torch.Generator().manual_seed(0))  # not the global RNG
    model_uri = tracking.log_model(run_id, serving, example, list(model.spec.class_names))
    tracking.set_tags(run_id, {"oodgate.model_uri": model_uri})
    return {
        "loss": loss_id,
        "run_id": run_id,
        "model_uri": model_uri,
        "model_fingerprint": model_fp,
        "mean": mean,
        "std": std,
    }


@task(name="register", task_run_name="register-{loss_id}")
def register_model(cfg: Config, loss_id: str, logged: dict, reasons: list[str], lock_path: str) -> dict:
    return registry.register(
        cfg.registry.model_name,
        logged["model_uri"],
        logged["run_id"],
        loss_id,
        logged["mean"],
        reasons,
        cfg.gate,
        Path(lock_path),
        model_fingerprint=logged["model_fingerprint"],
    )
