"""Every method against hand-computed values, the invariants in its docstring, and the shared contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodgate.learning import methods, scores
from oodgate.learning.methods.dismax import fractional_targets, mosaic


def _ce(logits: np.ndarray, y: np.ndarray) -> float:
    """Independent float64 cross-entropy."""
    m = logits.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(logz - logits[np.arange(len(y)), y]))


# ------------------------------------------------------------------ reference values
def test_softmax_is_linear_and_cross_entropy():
    head = methods.create("softmax", 2, 3)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.linear.bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
    z = head(torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(z, torch.tensor([[2.0, 3.5, 4.0]]))
    assert head.loss(z, torch.tensor([0])).item() == pytest.approx(
        _ce(np.array([[2.0, 3.5, 4.0]]), np.array([0]))
    )


def test_isomax_logits_are_negative_distances_and_prototypes_start_at_zero():
    head = methods.create("isomax", 2, 2)
    assert torch.count_nonzero(head.prototypes) == 0
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    z = head(torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(z, torch.tensor([[0.0, -5.0]]))
    # loss = CE(10 z): for y=1, -log softmax([0, -50])[1] = 50 + log(1 + e^-50)
    assert head.loss(z, torch.tensor([1])).item() == pytest.approx(50.0 + math.log1p(math.exp(-50)), rel=1e-6)


def test_isomax_plus_uses_normalised_vectors_and_abs_scale():
    head = methods.create("isomax_plus", 2, 2)
    assert head.distance_scale.item() == 1.0
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[2.0, 0.0], [0.0, -7.0]]))
        head.distance_scale.fill_(-2.0)  # used as |s|
    z = head(torch.tensor([[3.0, 4.0]]))  # f^ = (0.6, 0.8)
    expected = [-2 * math.sqrt(0.4**2 + 0.8**2), -2 * math.sqrt(0.6**2 + 1.8**2)]
    torch.testing.assert_close(z, torch.tensor([expected]))


def test_dismax_logits_add_the_mean_distance():
    head = methods.create("dismax", 2, 3)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        head.distance_scale.fill_(1.5)
    z = head(torch.tensor([[5.0, 0.0]]))
    d = 1.5 * np.array([0.0, math.sqrt(2), 2.0]) / math.sqrt(2)
    torch.testing.assert_close(z, torch.from_numpy(-(d + d.mean())[None]).float())
    y = torch.tensor([2])
    assert head.loss(z, y).item() == pytest.approx(_ce(10 * -(d + d.mean())[None], np.array([2])), rel=1e-5)


def test_logitnorm_loss_normalises_each_logit_vector():
    head = methods.create("logitnorm", 2, 2, tau=0.04)
    z = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    y = torch.tensor([0, 1])
    zn = np.array([[3.0, 4.0], [0.0, -2.0]]) / (0.04 * (np.array([[5.0], [2.0]]) + 1e-7))
    assert head.loss(z, y).item() == pytest.approx(_ce(zn, np.array([0, 1])), rel=1e-6)
    # no normalisation at inference: the head's output is the plain linear layer
    f = torch.randn(4, 2)
    torch.testing.assert_close(head(f), head.linear(f))


# ------------------------------------------------------------------ invariants
def test_dismax_mean_term_leaves_softmax_unchanged():
    torch.manual_seed(0)
    head = methods.create("dismax", 16, 10)
    f = torch.randn(32, 16)
    d = head.isometric_distances(f) / math.sqrt(2)
    torch.testing.assert_close(F.softmax(head(f), 1), F.softmax(-d, 1))


@pytest.mark.parametrize("name", ["isomax", "isomax_plus", "dismax"])
def test_entropic_scale_only_inside_the_loss(name):
    torch.manual_seed(1)
    head = methods.create(name, 8, 5)
    f, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    z = head(f)
    # the head returns raw logits (no x10) ...
    torch.testing.assert_close(z, head.logits(f))
    # ... the loss applies E_s = 10 ...
    torch.testing.assert_close(head.loss(z, y), F.cross_entropy(10 * z, y))
    # ... and scores use softmax(z) without it
    torch.testing.assert_close(head.score(z), scores.get(head.default_score)(z))
    assert methods.ENTROPIC_SCALE == 10.0


def test_mosaic_quadrants_come_from_the_right_images():
    x = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 1, 4, 4).clone()
    m = mosaic(x)
    for i in range(4):
        assert m[i, 0, 0, 0] == i  # top-left: image i
        assert m[i, 0, 3, 0] == (i - 1) % 4  # bottom-left: image i-1
        assert m[i, 0, 0, 3] == (i - 2) % 4  # top-right: image i-2
        assert m[i, 0, 3, 3] == (i - 3) % 4  # bottom-right: image i-3


def test_fractional_targets_sum_to_one_and_count_repeats():
    q = fractional_targets(torch.tensor([[0, 1, 2, 3], [1, 1, 2, 1], [4, 4, 4, 4]]), 5)
    torch.testing.assert_close(q.sum(1), torch.ones(3))
    torch.testing.assert_close(q[0], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    torch.testing.assert_close(q[1], torch.tensor([0.0, 0.75, 0.25, 0.0, 0.0]))
    torch.testing.assert_close(q[2], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))


def test_fpr_transform_shuffles_keeps_half_and_mosaics_the_rest():
    b = 8
    head = methods.create("dismax", 4, b, fpr=True)
    # image k is constant k and has label k, so every quadrant tells which image it came from
    x = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 1, 6, 6).clone()
    y = torch.arange(b)
    xt, yt = head.transform_batch(x, y, generator=torch.Generator().manual_seed(3))
    assert yt.shape == (b, 4)
    assert sorted(yt[:, 0].tolist()) == list(range(b))  # a permutation of the batch
    assert not torch.equal(yt[:, 0], y)  # ... and shuffled
    for i in range(b // 2):  # unmixed half: the image itself, its own label four times
        assert torch.all(xt[i] == yt[i, 0]) and torch.all(yt[i] == yt[i, 0])
    second = yt[b // 2 :, 0]
    for j, i in enumerate(range(b // 2, b)):
        h = b // 2
        assert yt[i].tolist() == [second[(j - r) % h].item() for r in range(4)]
        assert xt[i, 0, 0, 0] == yt[i, 0] and xt[i, 0, 5, 0] == yt[i, 1]
        assert xt[i, 0, 0, 5] == yt[i, 2] and xt[i, 0, 5, 5] == yt[i, 3]


def test_fpr_loss_matches_the_formula():
    torch.manual_seed(2)
    head = methods.create("dismax", 4, 3, fpr=True, alpha=0.7)
    z = torch.randn(6, 3)
    y = torch.tensor([[0, 0, 0, 0], [2, 2, 2, 2], [1, 1, 1, 1], [0, 1, 2, 0], [1, 0, 1, 2], [2, 1, 0, 1]])
    zz = z.double().numpy()
    ce = _ce(10 * zz[:3], np.array([0, 2, 1]))
    q = np.zeros((3, 3))
    for i, row in enumerate(y[3:].tolist()):
        for c in row:
            q[i, c] += 0.25
    logits = 10 * zz[3:]
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    with np.errstate(divide="ignore"):
        kl = np.where(q > 0, q * (np.log(q) - logp), 0.0).sum() / 3
    assert head.loss(z, y).item() == pytest.approx((ce + 0.7 * kl) / 2, rel=1e-5)


def test_dismax_without_fpr_is_identity_transform():
    head = methods.create("dismax", 4, 3)
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    xt, yt = head.transform_batch(x, y)
    assert xt is x and yt is y


# ------------------------------------------------------------------ contract over the registry
@pytest.mark.parametrize("name", methods.names())
def test_method_contract(name):
    torch.manual_seed(0)
    head = methods.create(name, 12, 4)
    assert head.temperature.shape == (1,) and head.temperature.item() == 1.0
    assert "temperature" not in dict(head.named_parameters())  # never trained or decayed
    assert head.default_score in scores.names()
    # score: auto chooses among these: the default first, each registered, no function twice
    assert head.scores[0] == head.default_score and set(head.scores) <= set(scores.names())
    assert len(set(head.scores)) == len(head.scores) and not {"mds", "max_logit"} <= set(head.scores)
    # the state dict is the whole head: a fresh head of the same kind loaded with it computes the same
    other = methods.create(name, 12, 4)
    other.load_state_dict(head.state_dict())
    probe = torch.randn(5, 12)
    torch.testing.assert_close(other(probe), head(probe))
    f, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    x = torch.randn(8, 1, 8, 8)
    xt, yt = head.transform_batch(x, y, generator=torch.Generator().manual_seed(0))
    assert xt.shape == x.shape and head.hard_targets(yt).shape == (8,)
    z = head(f)
    assert z.shape == (8, 4)
    loss = head.loss(z, yt if yt.shape[0] == 8 else y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    s = head.score(z.detach())
    assert s.shape == (8,)
    # the temperature divides the logits
    head.set_temperature(2.0)
    torch.testing.assert_close(head(f), z.detach() / 2)


def test_unknown_method_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown method 'softmaxx'.*dismax, isomax, isomax_plus, logitnorm, softmax"
    ):
        methods.create("softmaxx", 4, 2)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("dismax", {"fp": True}, r"unknown option 'fp'; valid options: alpha, fpr"),
        ("logitnorm", {"tau": 0}, r"option tau=0.*greater than 0"),
        ("softmax", {"tau": 0.1}, r"unknown option 'tau'; valid options: \(none\)"),
        ("dismax", {"alpha": -1}, r"option alpha=-1"),
    ],
)
def test_bad_options_are_named(name, options, match):
    with pytest.raises(ValueError, match=match):
        methods.create(name, 4, 2, **options)


def test_bad_temperature_and_sizes():
    head = methods.create("softmax", 4, 2)
    with pytest.raises(ValueError, match="positive finite"):
        head.set_temperature(0.0)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        methods.create("isomax", 4, 1)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        methods.METHODS.register("softmax")(object)
