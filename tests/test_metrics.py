"""Reference-value tests for oodgate.measuring.metrics (ID is the positive class, scores are higher-is-ID)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from oodgate.measuring import metrics

# Logits of 4 classes whose softmax is exact in float64: exp(-1000) underflows to 0.
BIG = 1000.0
CONF_QUARTER = [0.0, 0.0, 0.0, 0.0]  # p = (1/4, 1/4, 1/4, 1/4)
CONF_THIRD = [0.0, 0.0, 0.0, -BIG]  # p = (1/3, 1/3, 1/3, 0)
CONF_HALF = [0.0, 0.0, -BIG, -BIG]  # p = (1/2, 1/2, 0, 0)
CONF_ONE = [0.0, -BIG, -BIG, -BIG]  # p = (1, 0, 0, 0)


# --------------------------------------------------------------------------- accuracy / nll / brier


def test_accuracy_by_hand_ties_go_to_lowest_index():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    # predictions: 0 (tie), 0, 1 -> correct, wrong, correct
    assert metrics.accuracy(logits, labels) == pytest.approx(2 / 3)


def test_nll_and_brier_by_hand():
    # p = (1/2, 1/2) with y = 0 and p = (3/4, 1/4) with y = 1
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = np.array([0, 1])
    assert metrics.nll(logits, labels) == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-14)
    # (1/2 - 1)^2 + (1/2)^2 = 1/2; (3/4)^2 + (1/4 - 1)^2 = 9/8
    assert metrics.brier(logits, labels) == pytest.approx((0.5 + 1.125) / 2, rel=1e-14)


def test_nll_is_finite_for_a_confidently_wrong_sample():
    # log p_y = -2000 exactly; a softmax-then-log implementation would give log(0) = -inf.
    assert metrics.nll(torch.tensor([[1000.0, -1000.0]]), torch.tensor([1])) == pytest.approx(2000.0)


def test_nll_and_brier_match_torch_on_random_data():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (200,), generator=g)
    expected_nll = torch.nn.functional.cross_entropy(logits, labels).item()
    p = torch.softmax(logits, dim=1)
    expected_brier = ((p - torch.nn.functional.one_hot(labels, 7)) ** 2).sum(dim=1).mean().item()
    assert metrics.nll(logits, labels) == pytest.approx(expected_nll, rel=1e-12)
    assert metrics.brier(logits, labels) == pytest.approx(expected_brier, rel=1e-12)


def test_float32_input_is_evaluated_in_float64():
    logits = torch.tensor([[1e-8, 0.0]], dtype=torch.float32)
    expected = np.log1p(np.exp(-np.float64(np.float32(1e-8))))
    assert metrics.nll(logits, torch.tensor([0])) == pytest.approx(float(expected), rel=1e-15)


def test_metrics_return_python_floats():
    logits, labels = np.array([[1.0, 0.0]]), np.array([0])
    for fn in (metrics.accuracy, metrics.ece, metrics.nll, metrics.brier):
        assert type(fn(logits, labels)) is float
    for fn in (metrics.auroc, metrics.aupr_in, metrics.aupr_out, metrics.fpr_at_tpr):
        assert type(fn(np.array([1.0, 2.0]), np.array([0.0]))) is float


# --------------------------------------------------------------------------- ece


def test_ece_by_hand_with_bin_edges_hit_exactly():
    # 4 bins with edges 0, 1/4, 1/2, 3/4, 1 (all exact in binary).
    logits = torch.tensor([CONF_QUARTER, CONF_THIRD, CONF_HALF, CONF_ONE], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0])  # predictions are all class 0: correct, correct, wrong, correct
    # (lo, hi] bins: {1/4} -> (0, 1/4]; {1/3, 1/2} -> (1/4, 1/2]; {1} -> (3/4, 1]
    #   (1/4)|1 - 1/4| + (2/4)|1/2 - (1/3 + 1/2)/2| + (1/4)|1 - 1| = 3/16 + 1/24 = 11/48
    # whereas [lo, hi) bins would give (2/4)|1 - 7/24| + (1/4)|0 - 1/2| = 23/48.
    assert metrics.ece(logits, labels, n_bins=4) == pytest.approx(11 / 48, rel=1e-14)


def test_ece_default_bins_put_a_confidence_of_exactly_one_fifteenth_in_the_first_bin():
    # Uniform logits over 15 classes: conf = 1/15, exactly the first bin edge np.linspace(0, 1, 16)[1].
    z0 = np.zeros(15)
    z1 = np.zeros(15)
    z1[0] = 0.5  # conf = e^0.5 / (e^0.5 + 14), inside (1/15, 2/15]
    c1 = math.exp(0.5) / (math.exp(0.5) + 14)
    logits = np.stack([z0, z1])
    labels = np.array([0, 3])  # first correct, second wrong
    assert np.linspace(0, 1, 16)[1] == 1 / 15
    # (lo, hi]: two singleton bins -> (1/2)(1 - 1/15) + (1/2)c1
    assert metrics.ece(logits, labels) == pytest.approx(0.5 * (14 / 15) + 0.5 * c1, rel=1e-13)


def test_ece_of_perfectly_calibrated_bins_is_zero():
    # conf 1/2 with half the samples right, conf 1 with all right.
    logits = torch.tensor([CONF_HALF, CONF_HALF, CONF_ONE], dtype=torch.float64)
    assert metrics.ece(logits, torch.tensor([0, 1, 0])) == 0.0


def _ece_reference(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    # The usual loop (Guo et al.'s code): conf > lo and conf <= hi.
    p = torch.softmax(logits.double(), dim=1)
    conf, pred = p.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            frac = in_bin.double().mean()
            total += (frac * (correct[in_bin].mean() - conf[in_bin].mean()).abs()).item()
    return total


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_ece_matches_a_loop_implementation_on_random_data(scale):
    g = torch.Generator().manual_seed(1)
    logits = scale * torch.randn(500, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (500,), generator=g)
    assert metrics.ece(logits, labels) == pytest.approx(_ece_reference(logits, labels), abs=1e-12)


# --------------------------------------------------------------------------- classification_report


def test_classification_report_matches_the_individual_metrics():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 4, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    report = metrics.classification_report(logits, labels)
    assert report == {
        "accuracy": metrics.accuracy(logits, labels),
        "ece": metrics.ece(logits, labels),
        "nll": metrics.nll(logits, labels),
        "brier": metrics.brier(logits, labels),
    }


# --------------------------------------------------------------------------- OOD metrics by hand

# Sorted by score: 4 ID, 3 ID, 2 OOD, 1 ID, 0 OOD.
ID = np.array([4.0, 3.0, 1.0])
OOD = np.array([2.0, 0.0])


def test_auroc_by_hand():
    # ID > OOD pairs: (4,2) (4,0) (3,2) (3,0) (1,0) -> 5 of 6
    assert metrics.auroc(ID, OOD) == pytest.approx(5 / 6)


def test_aupr_in_and_out_by_hand():
    # ID positive: precision 1 at recall 1/3 and 2/3, 3/4 at recall 1 -> 1/3 + 1/3 + (1/3)(3/4)
    assert metrics.aupr_in(ID, OOD) == pytest.approx(11 / 12)
    # OOD positive on -score (0 OOD, 1 ID, 2 OOD, ...): precision 1 at recall 1/2, 2/3 at recall 1
    assert metrics.aupr_out(ID, OOD) == pytest.approx(1 / 2 + (1 / 2) * (2 / 3))


def test_fpr_at_tpr_by_hand():
    assert metrics.fpr_at_tpr(ID, OOD) == pytest.approx(1 / 2)  # all ID kept at t = 1: OOD {2} accepted
    assert metrics.fpr_at_tpr(ID, OOD, tpr=0.6) == 0.0  # 2 of 3 ID kept at t = 3

    id_scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    ood_scores = np.array([0.85, 0.65, 0.5, 0.4, 0.2, 0.05])
    # tpr 0.8 -> keep 4 of 5 ID -> t = 0.6 -> OOD 0.85, 0.65 accepted
    assert metrics.fpr_at_tpr(id_scores, ood_scores, tpr=0.8) == pytest.approx(2 / 6)
    # tpr 0.95 -> keep all 5 -> t = 0.1 -> 5 of 6 OOD accepted
    assert metrics.fpr_at_tpr(id_scores, ood_scores, tpr=0.95) == pytest.approx(5 / 6)


def test_fpr_at_tpr_with_ties_accepts_the_tied_ood_sample():
    # 3 of 4 ID are needed; t = 0.5 keeps all 4 and also the OOD sample at 0.5.
    assert metrics.fpr_at_tpr([1.0, 1.0, 0.5, 0.5], [0.5, 0.0], tpr=0.75) == pytest.approx(0.5)


def test_fpr_at_tpr_uses_id_as_the_positive_class():
    # ID positive: keep all 3 ID (t = 1.5) -> OOD {2.5} accepted -> 1/2.
    # The OOD-positive convention (OpenOOD v1.5, pytorch-ood) would instead flag all OOD (score <= 2.5)
    # and report the ID fraction flagged, {2, 1.5} -> 2/3.
    assert metrics.fpr_at_tpr([3.0, 2.0, 1.5], [2.5, 0.0]) == pytest.approx(1 / 2)


def test_detection_accuracy_by_hand():
    # t=4: (1/3 + 1)/2; t=3: (2/3 + 1)/2 = 5/6; t=2: (2/3 + 1/2)/2; t=1: (1 + 1/2)/2; t=0: 1/2
    assert metrics.detection_accuracy(ID, OOD) == pytest.approx(5 / 6)
    assert metrics.detection_accuracy([0.0], [1.0]) == 0.5  # reject-all is always available


def test_ood_report_keys_and_values():
    assert metrics.ood_report(ID, OOD) == pytest.approx(
        {"auroc": 5 / 6, "aupr_in": 11 / 12, "aupr_out": 5 / 6, "fpr95": 1 / 2, "detection_accuracy": 5 / 6}
    )


# --------------------------------------------------------------------------- OOD metrics vs independent code


def _fpr_at_tpr_reference(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float) -> float:
    # Scan thresholds from the top; the first one that accepts >= tpr of ID.
    for t in np.sort(np.unique(np.concatenate([id_scores, ood_scores])))[::-1]:
        if np.mean(id_scores >= t) >= tpr:
            return float(np.mean(ood_scores >= t))
    raise AssertionError("unreachable: the lowest threshold accepts everything")


def _auroc_pairwise(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    diff = id_scores[:, None] - ood_scores[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _detection_accuracy_reference(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    thresholds = np.concatenate([np.unique(np.concatenate([id_scores, ood_scores])), [np.inf]])
    return max(0.5 * (np.mean(id_scores >= t) + np.mean(ood_scores < t)) for t in thresholds)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounded", [False, True])
def test_ood_metrics_match_independent_implementations(seed, rounded):
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(1.0, 1.0, size=137)
    ood_scores = rng.normal(0.0, 1.0, size=91)
    if rounded:  # plenty of ties, within and across the two sets
        id_scores, ood_scores = np.round(id_scores, 1), np.round(ood_scores, 1)
    for tpr in (0.5, 0.9, 0.95, 1.0):
        assert metrics.fpr_at_tpr(id_scores, ood_scores, tpr=tpr) == pytest.approx(
            _fpr_at_tpr_reference(id_scores, ood_scores, tpr), abs=1e-15
        )
    assert metrics.auroc(id_scores, ood_scores) == pytest.approx(_auroc_pairwise(id_scores, ood_scores))
    assert metrics.detection_accuracy(id_scores, ood_scores) == pytest.approx(
        _detection_accuracy_reference(id_scores, ood_scores)
    )


def test_ood_metrics_accept_torch_tensors():
    assert metrics.auroc(torch.tensor(ID), torch.tensor(OOD, dtype=torch.float32)) == pytest.approx(5 / 6)


# --------------------------------------------------------------------------- ood_threshold


def test_ood_threshold_by_hand():
    scores = np.arange(1.0, 21.0)  # 20 scores; 19 of 20 = 0.95 must be accepted
    assert metrics.ood_threshold(scores) == 2.0
    assert metrics.ood_threshold(np.arange(1.0, 11.0)) == 1.0  # 9/10 < 0.95, so all 10 are kept
    assert metrics.ood_threshold(np.arange(1.0, 11.0), tpr=0.5) == 6.0  # 5 of 10: 10, 9, 8, 7, 6
    assert metrics.ood_threshold([3.0, 3.0, 3.0, 1.0], tpr=0.5) == 3.0  # ties: 3 of 4 accepted


@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_ood_threshold_keeps_at_least_tpr_and_matches_fpr_at_tpr(tpr):
    rng = np.random.default_rng(3)
    id_scores = np.round(rng.normal(size=333), 2)
    ood_scores = np.round(rng.normal(-1.0, size=250), 2)
    t = metrics.ood_threshold(id_scores, tpr=tpr)
    assert np.mean(id_scores >= t) >= tpr
    # the next-higher score would keep fewer than tpr: the threshold is as high as it can be
    higher = id_scores[id_scores > t]
    if higher.size:
        assert np.mean(id_scores >= higher.min()) < tpr
    assert metrics.fpr_at_tpr(id_scores, ood_scores, tpr=tpr) == np.mean(ood_scores >= t)


# --------------------------------------------------------------------------- validation


GOOD_LOGITS = np.zeros((3, 4))
GOOD_LABELS = np.array([0, 1, 3])
CLASSIFICATION = [metrics.accuracy, metrics.ece, metrics.nll, metrics.brier, metrics.classification_report]
OOD_METRICS = [
    metrics.auroc,
    metrics.aupr_in,
    metrics.aupr_out,
    metrics.fpr_at_tpr,
    metrics.detection_accuracy,
    metrics.ood_report,
]


@pytest.mark.parametrize("fn", CLASSIFICATION)
@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((0, 4)), np.zeros(0, dtype=int), "logits must be non-empty"),
        (np.zeros((3, 0)), GOOD_LABELS, "logits must be non-empty"),
        (np.array([[0.0, np.nan, 0.0, 0.0]] * 3), GOOD_LABELS, "logits contain 3 non-finite values"),
        (np.array([[0.0, np.inf, 0.0, 0.0]] + [[0.0] * 4] * 2), GOOD_LABELS, r"NaN or inf"),
        (GOOD_LOGITS, np.array([0, 1]), "mismatched lengths: 3 logits vs 2 labels"),
        (GOOD_LOGITS, np.array([0, 1, 4]), r"labels must lie in \[0, 4\) for 4 classes"),
        (GOOD_LOGITS, np.array([-1, 1, 2]), r"labels must lie in \[0, 4\)"),
        (np.zeros(4), np.array([0]), r"logits must be 2-D \(N, K\), got shape \(4,\)"),
        (GOOD_LOGITS, GOOD_LABELS[:, None], r"labels must be 1-D \(N,\), got shape \(3, 1\)"),
        (GOOD_LOGITS, np.array([0.0, 1.5, 2.0]), "labels must be integers"),
        (GOOD_LOGITS, np.array([0.0, np.nan, 2.0]), "labels contain 1 non-finite"),
    ],
)
def test_classification_metrics_reject_bad_input(fn, logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fn(logits, labels)


def test_integral_float_labels_are_accepted():
    assert metrics.accuracy(np.eye(3), np.array([0.0, 1.0, 2.0])) == 1.0


def test_ece_rejects_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins must be a positive integer, got 0"):
        metrics.ece(GOOD_LOGITS, GOOD_LABELS, n_bins=0)


@pytest.mark.parametrize("fn", OOD_METRICS)
@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "match"),
    [
        ([], [0.0, 1.0], "id_scores is empty.*one-class input"),
        ([0.0, 1.0], [], "ood_scores is empty.*one-class input"),
        ([0.0, np.nan], [1.0], "id_scores contain 1 non-finite values"),
        ([0.0], [1.0, -np.inf], "ood_scores contain 1 non-finite values"),
        (np.zeros((2, 2)), [1.0], r"id_scores must be 1-D, got shape \(2, 2\)"),
        ([1.0], np.zeros((2, 1)), r"ood_scores must be 1-D, got shape \(2, 1\)"),
    ],
)
def test_ood_metrics_reject_bad_input(fn, id_scores, ood_scores, match):
    with pytest.raises(ValueError, match=match):
        fn(np.asarray(id_scores, dtype=float), np.asarray(ood_scores, dtype=float))


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, float("nan")])
def test_rates_outside_zero_one_are_rejected(tpr):
    with pytest.raises(ValueError, match=r"tpr must be a number in \(0, 1\]"):
        metrics.fpr_at_tpr(ID, OOD, tpr=tpr)
    with pytest.raises(ValueError, match=r"tpr must be a number in \(0, 1\]"):
        metrics.ood_threshold(ID, tpr=tpr)


def test_ood_threshold_rejects_empty_and_non_finite_scores():
    with pytest.raises(ValueError, match="id_val_scores is empty"):
        metrics.ood_threshold([])
    with pytest.raises(ValueError, match="id_val_scores contain 1 non-finite"):
        metrics.ood_threshold([1.0, np.inf])
