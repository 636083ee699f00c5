"""Calibration and final evaluation of a trained classifier, returning one flat report.

Metric names are the ones logged everywhere (MLflow, DVC metrics files, the comparison table):
``test/accuracy``, ``test/ece``, ``test/ece_uncalibrated``, ``test/nll``, ``test/brier``, ...,
``ood/<set>/fpr95``, ``ood/<set>/auroc``, ..., and their summaries over the OOD sets:
``ood/mean/<k>`` (all sets), ``ood/near/<k>`` and ``ood/far/<k>`` (each group's mean) and
``ood/worst/<k>`` (the worst set). ``test/*`` without a suffix are after calibration;
``*_uncalibrated`` before. The validation split is used for the temperature and the OOD threshold;
the test split and the OOD sets (whole: nothing is tuned on them) only for the numbers reported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from oodgate import metrics, scores
from oodgate.calibration import TemperatureScaler
from oodgate.classifier import Classifier
from oodgate.data.bundle import DataBundle
from oodgate.engine import predict_logits

OOD_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95", "detection_accuracy")


@dataclass
class Calibration:
    temperature: float
    objective: str
    before: dict[str, float]
    after: dict[str, float]

    def metrics(self) -> dict[str, float]:
        out = {"calibration/temperature": self.temperature}
        out.update({f"val/{k}_uncalibrated": v for k, v in self.before.items()})
        out.update({f"val/{k}": v for k, v in self.after.items()})
        return out


THRESHOLD_TPR = 0.95  # the OOD threshold keeps this fraction of the validation ID samples


@dataclass
class Evaluation:
    """Everything the reports and plots need: the flat metrics plus the raw arrays behind them."""

    metrics: dict[str, float]
    score: str
    threshold: float
    temperature: float
    labels: np.ndarray
    logits: np.ndarray  # calibrated test logits
    logits_uncalibrated: np.ndarray
    id_scores: np.ndarray
    ood_scores: dict[str, np.ndarray] = field(default_factory=dict)
    val_scores: np.ndarray | None = None  # the validation ID scores the threshold was set on


def _raw_logits(
    model: Classifier, x: torch.Tensor, batch_size: int, device: str, amp: bool = False
) -> torch.Tensor:
    """Logits at temperature 1, whatever the head's current temperature."""
    saved = model.head.temperature.clone()
    model.head.temperature.fill_(1.0)
    try:
        return predict_logits(model, x, batch_size, device, amp)
    finally:
        model.head.temperature.copy_(saved)


def calibrate(
    model: Classifier,
    data: DataBundle,
    objective: str = "nll",
    batch_size: int = 1024,
    device: str = "cpu",
    amp: bool = False,
) -> Calibration:
    """Fit one temperature on the validation logits and store it in ``model.head.temperature``.
    Inference runs on ``device`` (bf16 autocast there if ``amp`` and CUDA); the fit in float64."""
    z = _raw_logits(model, data.val.x, batch_size, device, amp)
    scaler = TemperatureScaler(objective).fit(z, data.val.y)
    t = scaler.temperature
    model.head.set_temperature(t)
    before = metrics.classification_report(z, data.val.y)
    after = metrics.classification_report(z / model.head.temperature.cpu(), data.val.y)
    return Calibration(temperature=t, objective=objective, before=before, after=after)


def evaluate(
    model: Classifier,
    data: DataBundle,
    score: str | None = None,
    batch_size: int = 1024,
    device: str = "cpu",
    amp: bool = False,
) -> Evaluation:
    """Test-split classification metrics (before/after calibration) and per-OOD-set detection metrics.

    ``score`` defaults to the model's configured score. The OOD threshold is the score that keeps 95%
    of the *validation* in-distribution samples.
    """
    score = score or model.spec.score
    score_fn = scores.get(score)
    temp = model.head.temperature.detach().cpu()

    def calibrated(x: torch.Tensor) -> torch.Tensor:
        return _raw_logits(model, x, batch_size, device, amp) / temp

    z = _raw_logits(model, data.test.x, batch_size, device, amp)
    logits = z / temp
    out: dict[str, float] = {}
    for k, v in metrics.classification_report(logits, data.test.y).items():
        out[f"test/{k}"] = v
    for k, v in metrics.classification_report(z, data.test.y).items():
        if k != "accuracy":
            out[f"test/{k}_uncalibrated"] = v
    out["calibration/temperature"] = float(temp.item())

    id_scores = score_fn(logits).numpy()
    val_scores = score_fn(calibrated(data.val.x)).numpy()
    threshold = metrics.ood_threshold(val_scores, tpr=THRESHOLD_TPR)
    out["ood/threshold"] = threshold
    ood_scores: dict[str, np.ndarray] = {}
    for name, ood in data.ood.items():
        s = score_fn(calibrated(ood.x)).numpy()
        ood_scores[name] = s
        for k, v in metrics.ood_report(id_scores, s).items():
            out[f"ood/{name}/{k}"] = v
    for k in OOD_KEYS:
        per_set = {n: out[f"ood/{n}/{k}"] for n in ood_scores}
        for summary, v in metrics.ood_summaries(per_set, data.ood_groups, k != "fpr95").items():
            out[f"ood/{summary}/{k}"] = v
    return Evaluation(
        metrics=out,
        score=score,
        threshold=threshold,
        temperature=float(temp.item()),
        labels=data.test.y.numpy(),
        logits=logits.numpy(),
        logits_uncalibrated=z.numpy(),
        id_scores=id_scores,
        ood_scores=ood_scores,
        val_scores=val_scores,
    )
