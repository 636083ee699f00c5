"""Classification and OOD-detection metrics; each formula is in its function's docstring.

Classification metrics take ``logits`` of shape ``(N, K)``, already divided by the head's
temperature, and integer ``labels`` of shape ``(N,)``; ``p = softmax(logits)`` is computed in float64
and the predicted class is ``argmax_j z_j`` (ties go to the lowest index).

OOD metrics take ``id_scores`` and ``ood_scores`` (1-D, higher = more in-distribution). ID is the
POSITIVE class, as in the IsoMax/DisMax papers; OpenOOD v1.5 and pytorch-ood make OOD the positive
class, so their "FPR@95" is a different quantity.

Every function accepts torch tensors or numpy arrays, validates its input (``ValueError`` naming the
problem) and returns plain Python floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any, cast

import numpy as np
import torch

__all__ = [
    "accuracy",
    "aupr_in",
    "aupr_out",
    "auroc",
    "brier",
    "check_logits_labels",
    "check_ood_scores",
    "classification_report",
    "detection_accuracy",
    "ece",
    "fpr_at_tpr",
    "nll",
    "ood_report",
    "ood_summaries",
    "ood_threshold",
]


# --------------------------------------------------------------------------- input handling


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16/float16 kernels worth trusting; widen before leaving torch.
        if x.is_floating_point():
            x = x.to(torch.float64)
        return cast(np.ndarray, x.numpy())
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}: {err}") from None


def _as_float64(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    return x.astype(np.float64, copy=False)


def _check_finite(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{name} contain {int(bad.sum())} non-finite values (NaN or inf)")


def check_logits_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate classification inputs; return ``(logits as float64 (N, K), labels as int64 (N,))``.

    Raises ``ValueError`` for wrong ndim, empty input, NaN/inf, non-integer labels, mismatched
    lengths, and labels outside ``[0, K)``.
    """
    z = _as_float64(_to_numpy(logits, "logits"), "logits")
    y = _to_numpy(labels, "labels")
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, K), got shape {tuple(z.shape)}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"logits must be non-empty, got an empty array of shape {tuple(z.shape)}")
    if z.shape[0] != y.shape[0]:
        raise ValueError(
            f"logits and labels have mismatched lengths: {z.shape[0]} logits vs {y.shape[0]} labels"
        )
    _check_finite(z, "logits")
    if y.dtype.kind == "f":
        _check_finite(y, "labels")
        if not np.all(y == np.round(y)):
            raise ValueError("labels must be integers, got non-integral floating-point values")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    k = z.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}) for {k} classes, got values in [{y.min()}, {y.max()}]")
    return z, y


def _check_scores(scores: Any, name: str) -> np.ndarray:
    s = _as_float64(_to_numpy(scores, name), name)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(s.shape)}")
    if s.size == 0:
        raise ValueError(
            f"{name} is empty; OOD metrics need at least one ID and one OOD sample (one-class input)"
        )
    _check_finite(s, name)
    return s


def check_ood_scores(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate OOD scores; return ``(y_true, scores)`` with ID = 1 followed by OOD = 0."""
    s_id = _check_scores(id_scores, "id_scores")
    s_ood = _check_scores(ood_scores, "ood_scores")
    y_true = np.concatenate([np.ones(s_id.size, dtype=np.int64), np.zeros(s_ood.size, dtype=np.int64)])
    return y_true, np.concatenate([s_id, s_ood])


def _check_rate(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return cast(np.ndarray, shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return cast(np.ndarray, e / e.sum(axis=1, keepdims=True))


# --------------------------------------------------------------------------- classification


def accuracy(logits: Any, labels: Any) -> float:
    """Fraction of samples with ``argmax_j z_j == y``."""
    z, y = check_logits_labels(logits, labels)
    return float(np.mean(z.argmax(axis=1) == y))


def ece(logits: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017), as a fraction.

    ``conf = max_j p_j``; ``n_bins`` equal-width bins with edges ``np.linspace(0, 1, n_bins + 1)``,
    bin ``b`` = ``(lo_b, hi_b]`` (a confidence exactly on an edge belongs to the lower bin; the first
    bin is ``(0, 1/n_bins]``). ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` over non-empty bins, with
    ``acc_b`` and ``conf_b`` the bin's accuracy and mean confidence.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    z, y = check_logits_labels(logits, labels)
    n = z.shape[0]
    # max_j p_j = 1 / sum_j exp(z_j - max z): the arg-max term is exp(0) = 1 exactly, and skipping the
    # full softmax matters because the ece calibration objective evaluates this a few hundred times.
    e = z - z.max(axis=1, keepdims=True)
    np.exp(e, out=e)
    conf = 1.0 / e.sum(axis=1)
    correct = (z.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" returns i with edges[i-1] < conf <= edges[i], i.e. the (lo, hi] convention.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n_b = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    full = n_b > 0
    acc_b = acc_sum[full] / n_b[full]
    conf_b = conf_sum[full] / n_b[full]
    return float(np.sum(n_b[full] / n * np.abs(acc_b - conf_b)))


def nll(logits: Any, labels: Any) -> float:
    """Mean negative log-likelihood ``mean_i -log p_{i, y_i}`` (via log-softmax, never ``log 0``)."""
    z, y = check_logits_labels(logits, labels)
    return float(-np.mean(_log_softmax(z)[np.arange(z.shape[0]), y]))


def brier(logits: Any, labels: Any) -> float:
    """Multi-class Brier score ``mean_i sum_j (p_ij - onehot(y_i)_j)^2`` (range [0, 2])."""
    z, y = check_logits_labels(logits, labels)
    diff = _softmax(z)
    diff[np.arange(z.shape[0]), y] -= 1.0
    return float(np.mean(np.sum(diff**2, axis=1)))


def classification_report(logits: Any, labels: Any) -> dict[str, float]:
    """``{"accuracy", "ece", "nll", "brier"}`` of the same logits."""
    z, y = check_logits_labels(logits, labels)
    return {"accuracy": accuracy(z, y), "ece": ece(z, y), "nll": nll(z, y), "brier": brier(z, y)}


# --------------------------------------------------------------------------- OOD detection


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """Area under the ROC curve with ID as the positive class (``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score  # imported on use: sklearn costs seconds at start-up

    y_true, s = check_ood_scores(id_scores, ood_scores)
    return float(roc_auc_score(y_true, s))


def aupr_in(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with ID positive, ranked by the score (``average_precision_score``)."""
    from sklearn.metrics import average_precision_score  # imported on use: sklearn costs seconds at start-up

    y_true, s = check_ood_scores(id_scores, ood_scores)
    return float(average_precision_score(y_true, s))


def aupr_out(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with OOD positive, ranked by ``-score``."""
    from sklearn.metrics import average_precision_score  # imported on use: sklearn costs seconds at start-up

    y_true, s = check_ood_scores(id_scores, ood_scores)
    return float(average_precision_score(1 - y_true, -s))


def fpr_at_tpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the operating point that keeps ``tpr`` of ID.

    The ROC curve of (ID = 1, OOD = 0) over all thresholds (``roc_curve(..., drop_intermediate=False)``);
    the first point (highest threshold) whose TPR >= ``tpr``; its FPR. A sample is accepted as ID when
    ``score >= threshold``. ``tpr=0.95`` gives ``fpr95``.
    """
    from sklearn.metrics import roc_curve  # imported on use: sklearn costs seconds at start-up

    tpr = _check_rate(tpr, "tpr")
    y_true, s = check_ood_scores(id_scores, ood_scores)
    fpr_curve, tpr_curve, _ = roc_curve(y_true, s, drop_intermediate=False)
    # tpr_curve ends at 1.0, so a point with TPR >= tpr always exists.
    return float(fpr_curve[np.argmax(tpr_curve >= tpr)])


def detection_accuracy(id_scores: Any, ood_scores: Any) -> float:
    """``max_t 0.5 * (TPR(t) + TNR(t))`` over the ROC thresholds (ID positive, accept ``score >= t``).

    The thresholds include ``+inf`` (reject everything), so the result is at least 0.5.
    """
    from sklearn.metrics import roc_curve  # imported on use: sklearn costs seconds at start-up

    y_true, s = check_ood_scores(id_scores, ood_scores)
    fpr_curve, tpr_curve, _ = roc_curve(y_true, s, drop_intermediate=False)
    return float(np.max(0.5 * (tpr_curve + (1.0 - fpr_curve))))


def ood_report(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """``{"auroc", "aupr_in", "aupr_out", "fpr95", "detection_accuracy"}`` of the same scores."""
    s_id = _check_scores(id_scores, "id_scores")
    s_ood = _check_scores(ood_scores, "ood_scores")
    return {
        "auroc": auroc(s_id, s_ood),
        "aupr_in": aupr_in(s_id, s_ood),
        "aupr_out": aupr_out(s_id, s_ood),
        "fpr95": fpr_at_tpr(s_id, s_ood, tpr=0.95),
        "detection_accuracy": detection_accuracy(s_id, s_ood),
    }


def ood_threshold(id_val_scores: Any, tpr: float = 0.95) -> float:
    """Score threshold that accepts (``score >= threshold``) at least ``tpr`` of the validation ID set.

    With the ``n`` scores sorted in decreasing order ``s_(1) >= ... >= s_(n)``, the threshold is
    ``s_(k)``, the k-th largest score, where ``k`` is the smallest integer with ``k / n >= tpr``
    (i.e. ``k = ceil(tpr * n)``, the ``(1 - tpr)`` empirical quantile rounded down to a sample).
    At least ``k`` samples are accepted (more if ``s_(k)`` is tied), so the accepted fraction is
    ``>= tpr``. This is the operating point of :func:`fpr_at_tpr`: for any OOD set,
    ``fpr_at_tpr(id_val_scores, ood, tpr) == mean(ood >= ood_threshold(id_val_scores, tpr))``.
    """
    tpr = _check_rate(tpr, "tpr")
    s = _check_scores(id_val_scores, "id_val_scores")
    n = s.size
    # Same float comparison as roc_curve's tps / tps[-1] >= tpr, so the two operating points agree.
    k = int(np.argmax(np.arange(1, n + 1) / n >= tpr)) + 1
    return float(np.sort(s)[::-1][k - 1])


OOD_GROUPS = ("near", "far")
#: the names of the summaries over OOD sets; no OOD set may be called one of these
OOD_SUMMARIES = ("mean", *OOD_GROUPS, "worst")


def ood_summaries(
    per_set: Mapping[str, Any], groups: Mapping[str, str], higher_is_better: bool = False
) -> dict[str, Any]:
    """One metric summarised over the OOD sets: ``mean`` over all sets, the mean of each group
    present (``near``, ``far``) and ``worst`` (the max for a lower-is-better metric such as FPR95,
    else the min). Values are floats, or arrays summarised elementwise."""
    if not per_set:
        return {}
    values = {k: np.asarray(v, dtype=np.float64) for k, v in per_set.items()}
    out = {"mean": np.mean(np.stack(list(values.values())), axis=0)}
    for g in OOD_GROUPS:
        members = [v for k, v in values.items() if groups[k] == g]
        if members:
            out[g] = np.mean(np.stack(members), axis=0)
    stacked = np.stack(list(values.values()))
    out["worst"] = stacked.min(axis=0) if higher_is_better else stacked.max(axis=0)
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


# ---------------------------------------------------------------- over seeds
def aggregate(reports: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (0 for one seed) of each metric over seeds."""
    if not reports:
        raise ValueError("aggregate() needs at least one report")
    keys = [k for k in reports[0] if all(k in r for r in reports)]
    mean = {k: float(np.mean([r[k] for r in reports])) for k in keys}
    ddof = 1 if len(reports) > 1 else 0
    std = {k: float(np.std([r[k] for r in reports], ddof=ddof)) for k in keys}
    return mean, std
