"""The gate's metrics under bootstrap resamples of the test samples, all resamples at once.

A resample is a vector of counts (how often each test image was drawn, summing to the set's size);
``B`` resamples are a ``(B, N)`` count matrix. Every metric here is the one of :mod:`oodgate.measuring.metrics`
computed on the resampled set, so with all counts equal to 1 it equals that function exactly:
accuracy, ECE (15 equal-width bins, ``(lo, hi]``) and FPR at 95% TPR (the threshold is the score of
the first ID image, in decreasing score order, at which the cumulative count reaches 95% of ``N``;
FPR is the count-weighted fraction of OOD scores at or above it). Drawing the counts once and
applying them to every model makes the comparison paired: all models see the same resampled images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np

from oodgate.measuring import metrics


def draw_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """``(resamples, n)`` int32 counts: each row is one bootstrap resample of ``n`` items."""
    idx = rng.integers(0, n, (resamples, n))
    flat = (idx + (np.arange(resamples) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.int32)


@dataclass(frozen=True)
class Counts:
    """One set of resamples, shared by every model: ``test`` for the ID test images and one matrix
    per OOD set."""

    test: np.ndarray
    ood: Mapping[str, np.ndarray]

    @classmethod
    def draw(cls, seed: int, resamples: int, n_test: int, ood_sizes: Mapping[str, int]) -> Counts:
        rng = np.random.default_rng(seed)
        test = draw_counts(rng, n_test, resamples)
        return cls(test, {k: draw_counts(rng, m, resamples) for k, m in ood_sizes.items()})


def accuracy(logits: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    correct = (logits.argmax(axis=1) == labels).astype(np.int64)
    # integer counts: exact, and no BLAS kernel chosen by the CPU
    return cast(np.ndarray, (w @ correct) / w.shape[1])


def ece(logits: np.ndarray, labels: np.ndarray, w: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """Per resample: ``sum_b |sum_{i in b} w_i (correct_i - conf_i)| / N`` -- the same as
    ``sum_b (n_b / N) |acc_b - conf_b|`` of :func:`oodgate.measuring.metrics.ece`."""
    z = logits - logits.max(axis=1, keepdims=True)
    conf = 1.0 / np.exp(z).sum(axis=1)
    correct = (logits.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = correct - conf
    # Per bin, the count-weighted sum of its gaps, as NumPy's own sums (a float product through BLAS
    # would use the kernel of the CPU it finds, and so differ in the last digit between CPUs).
    sums = np.zeros((w.shape[0], n_bins))
    for b in np.unique(idx):
        members = idx == b
        sums[:, b] = (w[:, members] * gap[members]).sum(axis=1)
    return cast(np.ndarray, np.abs(sums).sum(axis=1) / w.shape[1])


def id_threshold(id_scores: np.ndarray, w_id: np.ndarray, tpr: float = 0.95) -> np.ndarray:
    """Per resample: the score of the first ID image, in decreasing score order, at which the
    cumulative count reaches ``tpr`` of ``N`` (the same comparison as ``roc_curve``'s).

    A resample's counts sum to ``N``, so the cumulative count at position ``k`` is ``N`` less the
    counts after it: only the lowest-scored images, where the threshold falls, are summed (from
    the end), and a resample whose threshold lies above them (rare: its low scores drawn far less
    often than expected) is summed whole. The same integers either way, so the same threshold."""
    order = np.argsort(-id_scores, kind="stable")
    n = w_id.shape[1]
    tail = min(n, max(64, int(np.ceil(3 * (1.0 - tpr) * n))))  # three times the expected tail
    w_tail = w_id[:, order[n - tail :]]
    after = np.cumsum(w_tail[:, ::-1], axis=1)[:, ::-1]  # after[:, j]: counts from tail position j on
    cum_tail = (n - after) + w_tail  # the cumulative count at each tail position
    reached = cum_tail / n >= tpr
    first = np.argmax(reached, axis=1) + (n - tail)
    # a resample whose threshold lies above the tail: the tail's first image already reaches tpr
    # with the images before it (or never does); those rows are summed whole
    above = (n - after[:, 0]) / n >= tpr if tail < n else np.zeros(len(w_id), bool)
    if above.any():
        cum = np.cumsum(w_id[above][:, order], axis=1)
        first[above] = np.argmax(cum / n >= tpr, axis=1)
    return cast(np.ndarray, id_scores[order][first])


def accepted_fraction(ood_scores: np.ndarray, w_ood: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """Per resample: the count-weighted fraction of OOD scores at or above its threshold (an integer
    sum of the counts of the accepted scores, so exact)."""
    accepted = (w_ood * (ood_scores[None, :] >= threshold[:, None])).sum(axis=1, dtype=np.int64)
    return cast(np.ndarray, accepted / w_ood.shape[1])


def fpr_at_tpr(
    id_scores: np.ndarray, ood_scores: np.ndarray, w_id: np.ndarray, w_ood: np.ndarray, tpr: float = 0.95
) -> np.ndarray:
    return accepted_fraction(ood_scores, w_ood, id_threshold(id_scores, w_id, tpr))


def gate_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    id_scores: np.ndarray,
    ood_scores: Mapping[str, np.ndarray],
    groups: Mapping[str, str],
    counts: Counts,
) -> dict[str, np.ndarray]:
    """Every metric a gate criterion can use, one value per resample: ``test/accuracy``,
    ``test/ece``, ``ood/<set>/fpr95``, ``ood/mean/fpr95``, ``ood/<group>/fpr95`` and
    ``ood/worst/fpr95`` (the names of :func:`oodgate.measuring.evaluation.evaluate`)."""
    out = {
        "test/accuracy": accuracy(logits, labels, counts.test),
        "test/ece": ece(logits, labels, counts.test),
    }
    threshold = id_threshold(id_scores, counts.test)  # one per model, for every OOD set
    per_set = {name: accepted_fraction(s, counts.ood[name], threshold) for name, s in ood_scores.items()}
    out.update({f"ood/{k}/fpr95": v for k, v in per_set.items()})
    out.update({f"ood/{k}/fpr95": v for k, v in metrics.ood_summaries(per_set, groups).items()})
    return out
