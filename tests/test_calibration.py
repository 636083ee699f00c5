"""Tests for oodgate.measuring.calibration: temperature scaling with the nll and ece objectives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodgate.learning import scores
from oodgate.measuring import metrics
from oodgate.measuring.calibration import NotFittedError, TemperatureScaler, fit_temperature

TRUE_T = 5.0


def overconfident(n: int = 5000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z_cal), returned with logits TRUE_T * z_cal (over-confident by 5x)."""
    g = torch.Generator().manual_seed(seed)
    z_cal = 2.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(z_cal, dim=1), 1, generator=g).squeeze(1)
    return TRUE_T * z_cal, labels


@pytest.fixture(scope="module")
def val_set() -> tuple[torch.Tensor, torch.Tensor]:
    return overconfident()


@pytest.fixture(scope="module")
def fitted(val_set) -> dict[str, TemperatureScaler]:
    """One scaler per objective, fitted once on ``val_set``."""
    return {objective: TemperatureScaler(objective).fit(*val_set) for objective in ("nll", "ece")}


# --------------------------------------------------------------------------- nll objective


def test_nll_objective_recovers_the_true_temperature(val_set, fitted):
    logits, labels = val_set
    t = fitted["nll"].temperature
    assert t == pytest.approx(TRUE_T, rel=0.05)
    assert metrics.nll(logits / t, labels) < 0.5 * metrics.nll(logits, labels)
    # The NLL of the calibrated logits is that of the generating model, up to sampling noise.
    assert metrics.nll(logits / t, labels) == pytest.approx(metrics.nll(logits / TRUE_T, labels), rel=0.01)


def test_nll_objective_finds_the_minimum(val_set, fitted):
    logits, labels = val_set
    t = fitted["nll"].temperature
    best = metrics.nll(logits / t, labels)
    for factor in (0.999, 1.001, 0.99, 1.01):
        assert metrics.nll(logits / (t * factor), labels) > best


def test_nll_objective_leaves_a_calibrated_model_alone():
    logits, labels = overconfident(seed=1)
    assert fit_temperature(logits / TRUE_T, labels) == pytest.approx(1.0, abs=0.05)


def test_nll_objective_accepts_float32_numpy_logits(val_set, fitted):
    logits, labels = val_set
    t64 = fitted["nll"].temperature
    t32 = fit_temperature(logits.float().numpy(), labels.numpy())
    assert t32 == pytest.approx(t64, rel=1e-5)


# --------------------------------------------------------------------------- ece objective


def test_ece_objective_lowers_ece(val_set, fitted):
    logits, labels = val_set
    t = fitted["ece"].temperature
    before, after = metrics.ece(logits, labels), metrics.ece(logits / t, labels)
    assert before > 0.2
    assert after < 0.03
    assert 3.0 < t < 8.0


def test_ece_objective_result_is_reproduced_by_metrics_ece(val_set, fitted):
    logits, labels = val_set
    scaler = fitted["ece"]
    calibrated = scaler.transform(logits)
    assert metrics.ece(calibrated, labels) <= metrics.ece(logits, labels)
    assert metrics.classification_report(calibrated, labels)["ece"] == metrics.ece(
        logits / scaler.temperature, labels
    )


# --------------------------------------------------------------------------- bounds and invariances


@pytest.mark.parametrize("objective", ["nll", "ece"])
@pytest.mark.parametrize("all_correct", [True, False])
def test_temperature_stays_within_bounds_on_degenerate_sets(objective, all_correct):
    # All correct and separable pushes T -> 0; all wrong pushes T -> infinity.
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]] * 10)
    labels = logits.argmax(dim=1) if all_correct else (logits.argmax(dim=1) + 1) % 3
    t = fit_temperature(logits, labels, objective=objective)
    assert 0.001 <= t <= 100.0
    if not all_correct:
        assert t == 100.0


@pytest.mark.parametrize("objective", ["nll", "ece"])
def test_temperature_does_not_change_accuracy(val_set, fitted, objective):
    logits, labels = val_set
    scaler = fitted[objective]
    assert scaler.temperature != 1.0
    assert metrics.accuracy(scaler.transform(logits), labels) == metrics.accuracy(logits, labels)
    assert torch.equal(scaler.transform(logits).argmax(dim=1), logits.argmax(dim=1))


@pytest.mark.parametrize("score_name", ["mds", "max_logit"])
def test_temperature_does_not_change_ood_metrics_of_max_logit_scores(val_set, fitted, score_name):
    logits, _ = val_set
    scaler = fitted["nll"]
    g = torch.Generator().manual_seed(7)
    ood_logits = 0.5 * TRUE_T * torch.randn(3000, 10, generator=g, dtype=torch.float64)
    score = scores.get(score_name)
    raw = metrics.ood_report(score(logits), score(ood_logits))
    calibrated = metrics.ood_report(score(scaler.transform(logits)), score(scaler.transform(ood_logits)))
    assert raw["auroc"] > 0.6  # a non-trivial detector
    assert calibrated["auroc"] == pytest.approx(raw["auroc"], abs=1e-12)
    assert calibrated["fpr95"] == pytest.approx(raw["fpr95"], abs=1e-12)


# --------------------------------------------------------------------------- the fit/transform contract


def test_transform_divides_by_the_temperature(val_set):
    logits, labels = val_set
    scaler = TemperatureScaler()
    assert scaler.fit(logits, labels) is scaler
    torch.testing.assert_close(scaler.transform(logits), logits / scaler.temperature, rtol=0, atol=0)
    as_f32 = scaler.transform(logits.float().numpy())
    assert isinstance(as_f32, torch.Tensor) and as_f32.dtype == torch.float32
    assert fit_temperature(logits, labels) == scaler.temperature
    assert isinstance(scaler.temperature, float)


def test_unfitted_scaler_raises_not_fitted_error():
    scaler = TemperatureScaler()
    assert issubclass(NotFittedError, RuntimeError)
    with pytest.raises(NotFittedError, match=r"call fit\(logits, labels\) first"):
        _ = scaler.temperature
    with pytest.raises(NotFittedError, match=r"call fit\(logits, labels\) first"):
        scaler.transform(torch.zeros(2, 3))
    assert "unfitted" in repr(scaler)


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown calibration objective 'brier'; valid objectives: nll, ece"):
        TemperatureScaler("brier")


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.array([[0.0, np.nan]]), np.array([0]), "logits contain 1 non-finite"),
        (np.zeros((3, 2)), np.array([0, 1]), "mismatched lengths"),
        (np.zeros((2, 2)), np.array([0, 2]), r"labels must lie in \[0, 2\)"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), "non-empty"),
        (np.zeros(2), np.array([0, 1]), "must be 2-D"),
    ],
)
@pytest.mark.parametrize("objective", ["nll", "ece"])
def test_fit_validates_its_input(logits, labels, match, objective):
    with pytest.raises(ValueError, match=match):
        TemperatureScaler(objective).fit(logits, labels)


def test_transform_rejects_non_matrix_logits(fitted):
    scaler = fitted["nll"]
    with pytest.raises(ValueError, match="must be 2-D"):
        scaler.transform(torch.zeros(3))


def test_fit_recovers_the_temperature_on_10k_by_100():
    # Its speed is measured by benchmarks, never asserted here (shared machines are noisy).
    logits, labels = overconfident(n=10_000, k=100, seed=2)
    t = fit_temperature(logits.float(), labels)
    assert t == pytest.approx(TRUE_T, rel=0.05)
