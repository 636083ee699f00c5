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
from typing import Any

import numpy as np
import torch

from oodgate.base.config import AUTO_SCORE
from oodgate.data.bundle import DataBundle
from oodgate.learning import scores
from oodgate.learning.classifier import Classifier
from oodgate.learning.training.engine import predict_logits
from oodgate.measuring import metrics
from oodgate.measuring.calibration import TemperatureScaler

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
AUTO = AUTO_SCORE  # losses.<id>.score: chosen on the validation OOD sets (choose_score)


@dataclass(frozen=True)
class ScoreChoice:
    """Which OOD score a loss's models use and why: ``auto`` (the lowest validation FPR95 among the
    method's scores), ``fixed`` (named in the config), ``default`` (the method's: ``score: null``)
    or ``unvalidated`` (the method's: ``auto`` with no validation OOD sets to choose on). ``validation``: every candidate score's
    FPR95 and AUROC on the validation OOD sets (means over the sets and the seeds), in the method's
    order; ``per_seed``: the same for each seed's model."""

    score: str
    mode: str
    default: str
    validation: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_seed: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    sets: tuple[str, ...] = ()

    def metrics(self, seed: int) -> dict[str, float]:
        """``selection/<score>/fpr95`` and ``selection/<score>/auroc`` of ``seed``'s model: validation
        figures only (their means over the seeds are what the choice compared)."""
        out = {}
        for name, (fpr, auc) in self.per_seed.get(seed, {}).items():
            out[f"selection/{name}/fpr95"] = fpr
            out[f"selection/{name}/auroc"] = auc
        return out

    def text(self) -> str:
        """``mps (auto: 0.21 vs mmles 0.58 on glyphs, portrait_patches)``: the chosen score's
        validation FPR95 against the method's default's (or, when the default won, the next best's)."""
        if self.mode == "fixed":
            return f"{self.score} (named)"
        if self.mode == "default":
            return f"{self.score} (the method's default)"
        if self.mode == "unvalidated":
            return f"{self.score} (the method's default: auto, but no data.ood_val to choose on)"
        on = ", ".join(self.sets)
        fpr = self.validation[self.score][0]
        if self.score != self.default:
            return f"{self.score} (auto: {fpr:.2f} vs {self.default} {self.validation[self.default][0]:.2f} on {on})"
        others = sorted((v[0], k) for k, v in self.validation.items() if k != self.score)
        if not others:
            return f"{self.score} (auto: {fpr:.2f} on {on})"
        return f"{self.score} (auto: {fpr:.2f}, the default, vs {others[0][1]} {others[0][0]:.2f} on {on})"

    def record(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "mode": self.mode,
            "default": self.default,
            "sets": list(self.sets),
            "validation": {k: list(v) for k, v in self.validation.items()},
            "per_seed": {str(s): {k: list(v) for k, v in f.items()} for s, f in self.per_seed.items()},
            "text": self.text(),
        }

    @classmethod
    def of(cls, record: dict[str, Any]) -> ScoreChoice:
        return cls(
            score=record["score"],
            mode=record["mode"],
            default=record["default"],
            validation={k: (v[0], v[1]) for k, v in record["validation"].items()},
            per_seed={int(s): {k: (v[0], v[1]) for k, v in f.items()} for s, f in record["per_seed"].items()},
            sets=tuple(record["sets"]),
        )


def validation_figures(
    val_logits: torch.Tensor,
    ood_val_logits: dict[str, torch.Tensor],
    candidates: tuple[str, ...],
    tpr: float = THRESHOLD_TPR,
) -> dict[str, tuple[float, float]]:
    """Per candidate score, one model's FPR95 and AUROC on the validation OOD sets (means over the
    sets), each at the threshold that keeps ``tpr`` of the validation ID images. Validation data
    only: the calibrated validation logits and the validation OOD sets' logits."""
    figures = {}
    for name in candidates:
        fn = scores.get(name)
        s_id = fn(val_logits).numpy()
        per_set = [
            (metrics.fpr_at_tpr(s_id, fn(z).numpy(), tpr), metrics.auroc(s_id, fn(z).numpy()))
            for z in ood_val_logits.values()
        ]
        figures[name] = (float(np.mean([f for f, _ in per_set])), float(np.mean([a for _, a in per_set])))
    return figures


def choose_score(
    setting: str | None,
    candidates: tuple[str, ...],
    per_seed: dict[int, dict[str, tuple[float, float]]],
    sets: tuple[str, ...],
) -> ScoreChoice:
    """The score of a loss's models. ``setting`` ``auto``: among ``candidates`` (the method's scores,
    its default first), the one with the lowest FPR95 on the validation OOD sets, averaged over the
    seeds' models (:func:`validation_figures`); ties go to the higher AUROC, then to the earlier
    candidate. A name fixes it; None is the method's default. Nothing of the test enters."""
    default = candidates[0]
    if setting is not None and setting != AUTO:
        return ScoreChoice(setting, "fixed", default, sets=sets)
    if setting is None:
        return ScoreChoice(default, "default", default)
    if not sets or not per_seed:
        return ScoreChoice(default, "unvalidated", default)
    mean = {
        k: (
            float(np.mean([f[k][0] for f in per_seed.values()])),
            float(np.mean([f[k][1] for f in per_seed.values()])),
        )
        for k in candidates
    }
    order = {name: i for i, name in enumerate(candidates)}
    best = min(candidates, key=lambda k: (mean[k][0], -mean[k][1], order[k]))
    return ScoreChoice(best, AUTO, default, mean, dict(per_seed), sets)


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


def raw_logits(
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
    z = raw_logits(model, data.val.x, batch_size, device, amp)
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
    candidates: tuple[str, ...] = (),
) -> Evaluation:
    """Test-split classification metrics (before/after calibration) and per-OOD-set detection metrics.

    ``score`` defaults to the model's configured score (the selection step chose it on validation
    data: :func:`choose_score`). The OOD threshold is the score that keeps 95% of the *validation*
    in-distribution samples. Beside the score's figures, every one of ``candidates`` (the method's
    scores) has its test FPR95 and mean AUROC reported under ``scores/<score>/...``: figures for the
    reports, never a choice.
    """
    score = score or model.spec.score
    score_fn = scores.get(score)
    temp = model.head.temperature.detach().cpu()

    def calibrated(x: torch.Tensor) -> torch.Tensor:
        return raw_logits(model, x, batch_size, device, amp) / temp

    val_logits = calibrated(data.val.x)

    z = raw_logits(model, data.test.x, batch_size, device, amp)
    logits = z / temp
    out: dict[str, float] = {}
    for k, v in metrics.classification_report(logits, data.test.y).items():
        out[f"test/{k}"] = v
    for k, v in metrics.classification_report(z, data.test.y).items():
        if k != "accuracy":
            out[f"test/{k}_uncalibrated"] = v
    out["calibration/temperature"] = float(temp.item())

    id_scores = score_fn(logits).numpy()
    val_scores = score_fn(val_logits).numpy()
    threshold = metrics.ood_threshold(val_scores, tpr=THRESHOLD_TPR)
    out["ood/threshold"] = threshold
    ood_logits = {name: calibrated(ood.x) for name, ood in data.ood.items()}
    ood_scores: dict[str, np.ndarray] = {}
    for name, zo in ood_logits.items():
        s = score_fn(zo).numpy()
        ood_scores[name] = s
        for k, v in metrics.ood_report(id_scores, s).items():
            out[f"ood/{name}/{k}"] = v
    for k in OOD_KEYS:
        per_set = {n: out[f"ood/{n}/{k}"] for n in ood_scores}
        for summary, v in metrics.ood_summaries(per_set, data.ood_groups, k != "fpr95").items():
            out[f"ood/{summary}/{k}"] = v
    for name in candidates or (score,):
        out.update(_score_figures(name, logits, ood_logits, data.ood_groups))
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


def _score_figures(
    name: str, logits: torch.Tensor, ood_logits: dict[str, torch.Tensor], groups: dict[str, str]
) -> dict[str, float]:
    """One score's test FPR95 per OOD set and summarised, and its mean AUROC, under
    ``scores/<name>/``: what the table shows beside the chosen score."""
    fn = scores.get(name)
    s_id = fn(logits).numpy()
    fpr = {k: metrics.fpr_at_tpr(s_id, fn(z).numpy()) for k, z in ood_logits.items()}
    auc = {k: metrics.auroc(s_id, fn(z).numpy()) for k, z in ood_logits.items()}
    out = {f"scores/{name}/ood/{k}/fpr95": v for k, v in fpr.items()}
    out.update({f"scores/{name}/ood/{k}/fpr95": v for k, v in metrics.ood_summaries(fpr, groups).items()})
    out[f"scores/{name}/ood/mean/auroc"] = float(np.mean(list(auc.values()))) if auc else float("nan")
    return out
