"""Reference-value tests for oodgate.learning.scores (higher = more in-distribution)."""

from __future__ import annotations

import math

import pytest
import torch

from oodgate.learning import scores

# Row 0: z = (2, 1, 0); row 1: uniform z = (0, 0, 0).
LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
S = math.exp(2) + math.exp(1) + 1.0  # softmax denominator of row 0
P0 = [math.exp(2) / S, math.exp(1) / S, 1.0 / S]
NEG_ENTROPY = [sum(p * math.log(p) for p in P0), -math.log(3.0)]

EXPECTED = {
    "mps": [math.exp(2) / S, 1 / 3],
    "entropic": NEG_ENTROPY,
    "mds": [2.0, 0.0],
    "max_logit": [2.0, 0.0],
    "mmles": [2.0 + 1.0 + NEG_ENTROPY[0], 0.0 + 0.0 + NEG_ENTROPY[1]],
    "energy": [math.log(S), math.log(3.0)],
}


def test_registry_holds_exactly_the_documented_scores():
    assert scores.names() == sorted(EXPECTED)
    assert set(scores.SCORES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_score_matches_hand_computed_values(name):
    out = scores.get(name)(LOGITS)
    assert out.shape == (2,)
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx(EXPECTED[name], rel=1e-12, abs=1e-12)


def test_hand_values_agree_with_an_independent_softmax():
    """The hand-computed table, checked against NumPy's softmax of the same logits (a typo in the
    table fails here, not a change of the code)."""
    import numpy as np

    z = LOGITS.numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert EXPECTED["mps"] == pytest.approx(p.max(1).tolist(), rel=1e-12)
    assert EXPECTED["entropic"] == pytest.approx((p * np.log(p)).sum(1).tolist(), rel=1e-12)
    assert EXPECTED["energy"] == pytest.approx(np.log(np.exp(z).sum(1)).tolist(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_confident_logits_score_higher_than_uniform(name):
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    uniform = torch.zeros(1, 3)
    score = scores.get(name)
    assert score(confident).item() > score(uniform).item()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scores_are_per_sample(name):
    # Scoring a batch equals scoring each row alone.
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    score = scores.get(name)
    batched = score(logits)
    single = torch.cat([score(row[None]) for row in logits])
    torch.testing.assert_close(batched, single)


def test_mmles_is_max_plus_mean_plus_negative_entropy():
    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(16, 10, generator=g, dtype=torch.float64)
    p = torch.softmax(z, dim=1)
    expected = z.max(dim=1).values + z.mean(dim=1) + (p * p.log()).sum(dim=1)
    torch.testing.assert_close(scores.mmles(z), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        scores.mmles(z), scores.max_logit(z) + z.mean(dim=1) + scores.entropic(z), rtol=0, atol=0
    )


def test_energy_is_logsumexp():
    g = torch.Generator().manual_seed(2)
    z = 50 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    m = z.max(dim=1, keepdim=True).values
    expected = m.squeeze(1) + (z - m).exp().sum(dim=1).log()
    torch.testing.assert_close(scores.energy(z), expected, rtol=1e-13, atol=0)


def test_entropic_matches_its_definition_on_random_logits():
    g = torch.Generator().manual_seed(3)
    z = 2 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    p = torch.softmax(z, dim=1)
    torch.testing.assert_close(scores.entropic(z), (p * p.log()).sum(dim=1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_are_finite_for_extreme_logits(dtype):
    # p = (1, 0) after underflow; sum p log p must be 0, not 0 * -inf = NaN.
    z = torch.tensor([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=dtype)
    for name in scores.names():
        assert torch.isfinite(scores.get(name)(z)).all(), name
    assert scores.entropic(z).tolist() == [0.0, 0.0]
    assert scores.mps(z).tolist() == [1.0, 1.0]
    assert scores.mmles(z).tolist() == [1000.0, 1000.0]  # 1000 + 0 + 0
    assert scores.energy(z).tolist() == [1000.0, 1000.0]


def test_max_logit_family_is_scale_equivariant():
    # A temperature T divides mds/max_logit by T, so their rankings (and AUROC/FPR95) are unchanged.
    z = torch.tensor([[3.0, -1.0], [0.5, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(scores.mds(z / 4.0), scores.mds(z) / 4.0)
    torch.testing.assert_close(scores.max_logit(z / 4.0), scores.max_logit(z) / 4.0)


def test_unknown_score_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown score 'nope'; valid scores: ") as err:
        scores.get("nope")
    for name in EXPECTED:
        assert name in str(err.value)


def test_entropy_scores_stay_finite_with_masked_classes():
    logits = torch.tensor([[2.0, float("-inf"), 0.0]])
    p = torch.softmax(logits, 1)
    expected = (p[0, 0] * p[0, 0].log() + p[0, 2] * p[0, 2].log()).item()
    assert scores.entropic(logits).item() == pytest.approx(expected)
    assert torch.isfinite(scores.mmles(torch.tensor([[2.0, -1e30, 0.0]]))).all()
