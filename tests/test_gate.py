"""The gate: the means-only rule, the evidence test (reference values), the resampled metrics, and
simulated candidates whose truth is known (a clearly better one; one identical in distribution)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from oodgate import metrics, resampling
from oodgate.config import GateConfig
from oodgate.gate import (
    ACCURACY,
    SampleSet,
    compare_means,
    criteria,
    decide,
    decide_all,
    rank_key,
    welch_evidence,
)

BASE = {"test/accuracy": 0.90, "test/ece": 0.050, "ood/mean/fpr95": 0.60}
MEANS_ONLY = GateConfig(confidence=None)


def _cand(**kw):
    m = {"test/accuracy": 0.92, "test/ece": 0.030, "ood/mean/fpr95": 0.30}
    m.update({k.replace("__", "/"): v for k, v in kw.items()})
    return m


# ---------------------------------------------------------------- means only (gate.confidence: null)
@pytest.mark.parametrize(
    ("candidate", "promote", "failing"),
    [
        (_cand(), True, None),
        (_cand(test__accuracy=0.90), False, "test/accuracy"),  # equal is not better
        (_cand(test__accuracy=0.85), False, "test/accuracy"),
        (_cand(test__ece=0.050), False, "test/ece"),
        (_cand(test__ece=0.07), False, "test/ece"),
        (_cand(ood__mean__fpr95=0.60), False, "ood/mean/fpr95"),
        (_cand(ood__mean__fpr95=0.9), False, "ood/mean/fpr95"),
        (_cand(test__accuracy=math.nan), False, "test/accuracy"),
        (_cand(ood__mean__fpr95=math.inf), False, "ood/mean/fpr95"),
    ],
)
def test_means_only_decision_table(candidate, promote, failing):
    d = decide([candidate], [BASE], MEANS_ONLY)
    assert d.promote is promote
    assert len(d.reasons) == 3
    if failing:
        assert d.checks[failing] is False
        assert sum(not v for v in d.checks.values()) == 1


def test_missing_metric_never_promotes():
    cand = _cand()
    del cand["ood/mean/fpr95"]
    d = decide([cand], [BASE], MEANS_ONLY)
    assert not d.promote
    assert any("missing or NaN" in r and "ood/mean/fpr95" in r for r in d.reasons)
    assert not decide([{}], [BASE], MEANS_ONLY).promote


def test_margins_are_required_improvements():
    gate = GateConfig(confidence=None, accuracy_margin=0.03)
    d = compare_means(_cand(), BASE, gate)  # +0.02 accuracy < 0.03 margin
    assert not d.promote and not d.checks["test/accuracy"]
    assert "margin 0.03" in d.reasons[0]
    assert compare_means(_cand(test__accuracy=0.95), BASE, gate).promote
    assert not compare_means(_cand(), BASE, GateConfig(confidence=None, fpr95_margin=0.5)).promote
    assert not compare_means(_cand(), BASE, GateConfig(confidence=None, ece_margin=0.03)).promote


def test_means_only_reasons_name_the_values_and_the_reference():
    d = compare_means(_cand(), BASE, MEANS_ONLY, reference="champion")
    assert d.reasons[0] == "accuracy 0.9200 vs champion 0.9000: higher by 0.0200 > margin 0.0"
    assert d.summary().startswith("PROMOTE: ")


def test_fpr95_rule_picks_the_criteria():
    m = {**BASE, "ood/near/fpr95": 0.5, "ood/far/fpr95": 0.7, "ood/worst/fpr95": 0.9}
    assert [c.metric for c in criteria(GateConfig(), m)][2:] == ["ood/mean/fpr95"]
    assert [c.metric for c in criteria(GateConfig(fpr95="groups"), m)][2:] == [
        "ood/near/fpr95",
        "ood/far/fpr95",
    ]
    assert [c.metric for c in criteria(GateConfig(fpr95="worst"), m)][2:] == ["ood/worst/fpr95"]
    only_far = {**BASE, "ood/far/fpr95": 0.7}
    assert [c.metric for c in criteria(GateConfig(fpr95="groups"), only_far)][2:] == ["ood/far/fpr95"]
    # a candidate better on near but not on far OOD fails the groups rule, passes the mean rule
    cand = {**_cand(), "ood/near/fpr95": 0.1, "ood/far/fpr95": 0.75, "ood/worst/fpr95": 0.75}
    assert compare_means(cand, m, GateConfig(confidence=None)).promote
    d = compare_means(cand, m, GateConfig(confidence=None, fpr95="groups"))
    assert not d.promote and d.checks == {
        "test/accuracy": True,
        "test/ece": True,
        "ood/near/fpr95": True,
        "ood/far/fpr95": False,
    }
    assert any(r.startswith("far-OOD FPR95 0.7500 vs baseline 0.7000") for r in d.reasons)


# ---------------------------------------------------------------- the test itself, reference values
def test_welch_evidence_equals_scipy_welch_test_without_sample_noise():
    cand, base = [0.93, 0.95, 0.96, 0.94], [0.90, 0.92, 0.89]
    e = welch_evidence(ACCURACY, cand, base, var_sample=0.0, margin=0.0, confidence=0.95)
    ref = stats.ttest_ind(cand, base, equal_var=False, alternative="greater")
    assert e.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert e.df == pytest.approx(ref.df, rel=1e-12)
    se = math.sqrt(np.var(cand, ddof=1) / 4 + np.var(base, ddof=1) / 3)
    assert e.lower == pytest.approx(np.mean(cand) - np.mean(base) - stats.t.ppf(0.95, ref.df) * se, rel=1e-12)
    assert e.passed == (ref.pvalue < 0.05) and e.seeds == (4, 3)


def test_welch_evidence_adds_the_sample_variance_and_the_margin():
    cand, base = [0.93, 0.95, 0.96], [0.90, 0.92, 0.89]
    vc, vb, vs = np.var(cand, ddof=1) / 3, np.var(base, ddof=1) / 3, 0.01**2
    df = (vc + vb + vs) ** 2 / (vc**2 / 2 + vb**2 / 2)
    t = (np.mean(cand) - np.mean(base) - 0.01) / math.sqrt(vc + vb + vs)
    e = welch_evidence(ACCURACY, cand, base, var_sample=vs, margin=0.01, confidence=0.9)
    assert e.df == pytest.approx(df, rel=1e-12)
    assert e.p_value == pytest.approx(stats.t.sf(t, df), rel=1e-12)
    assert e.se_sample == pytest.approx(0.01)
    # lower is better: the gain is base - cand
    ece = criteria(GateConfig(), BASE)[1]
    e2 = welch_evidence(ece, [0.02, 0.03, 0.025], [0.05, 0.06, 0.055], 0.0, 0.0, 0.95)
    assert e2.gain == pytest.approx(0.03) and e2.passed


def test_welch_evidence_edge_cases():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        welch_evidence(ACCURACY, [0.9], [0.8, 0.81], 0.0, 0.0, 0.95)
    same = welch_evidence(ACCURACY, [0.9, 0.9], [0.8, 0.8], 0.0, 0.0, 0.95)
    assert same.passed and same.p_value == 0.0  # nothing varies: the gain is exact
    tie = welch_evidence(ACCURACY, [0.8, 0.8], [0.8, 0.8], 0.0, 0.0, 0.95)
    assert not tie.passed


# ---------------------------------------------------------------- resampled metrics
def _arrays(rng, n=300, k=4, m=(200, 150), ties=False):
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1.5, (n, k))
    logits[np.arange(n), labels] += 1.5
    id_scores = rng.normal(1, 1, n)
    ood = {"a": rng.normal(0, 1, m[0]), "b": rng.normal(0.5, 1, m[1])}
    if ties:  # ties within and across ID and OOD scores
        id_scores = np.round(id_scores, 1)
        ood = {k: np.round(v, 1) for k, v in ood.items()}
    return logits, labels, id_scores, ood


@pytest.mark.parametrize("ties", [False, True])
def test_resampled_metrics_with_unit_counts_equal_the_metrics(ties):
    logits, labels, id_scores, ood = _arrays(np.random.default_rng(1), ties=ties)
    groups = {"a": "near", "b": "far"}
    ones = resampling.Counts(
        np.ones((1, len(labels)), np.int32), {k: np.ones((1, len(v)), np.int32) for k, v in ood.items()}
    )
    got = {k: v[0] for k, v in resampling.gate_metrics(logits, labels, id_scores, ood, groups, ones).items()}
    fpr = {k: metrics.fpr_at_tpr(id_scores, v) for k, v in ood.items()}
    assert got["test/accuracy"] == metrics.accuracy(logits, labels)
    assert got["test/ece"] == pytest.approx(metrics.ece(logits, labels), abs=1e-15)
    assert got["ood/a/fpr95"] == fpr["a"] and got["ood/b/fpr95"] == fpr["b"]
    assert got["ood/mean/fpr95"] == pytest.approx((fpr["a"] + fpr["b"]) / 2)
    assert got["ood/near/fpr95"] == fpr["a"] and got["ood/far/fpr95"] == fpr["b"]
    assert got["ood/worst/fpr95"] == max(fpr.values())


def test_resampled_metrics_equal_the_metrics_of_the_resampled_arrays():
    rng = np.random.default_rng(2)
    logits, labels, id_scores, ood = _arrays(rng, ties=True)
    counts = resampling.Counts.draw(7, 5, len(labels), {k: len(v) for k, v in ood.items()})
    assert (counts.test.sum(axis=1) == len(labels)).all()
    got = resampling.gate_metrics(logits, labels, id_scores, ood, {"a": "near", "b": "far"}, counts)
    for b in range(5):
        i = np.repeat(np.arange(len(labels)), counts.test[b])
        assert got["test/accuracy"][b] == pytest.approx(metrics.accuracy(logits[i], labels[i]), abs=1e-15)
        assert got["test/ece"][b] == pytest.approx(metrics.ece(logits[i], labels[i]), abs=1e-12)
        for k, v in ood.items():
            j = np.repeat(np.arange(len(v)), counts.ood[k][b])
            assert got[f"ood/{k}/fpr95"][b] == pytest.approx(
                metrics.fpr_at_tpr(id_scores[i], v[j]), abs=1e-15
            )


# ---------------------------------------------------------------- simulated candidates
N_TEST, K, N_OOD = 300, 3, 200


def _world(rng):
    """What the models of one draw share: the test images (labels, difficulty), the OOD images, and
    per family (every seed of one loss) how it fares on each image -- zero on average over all
    images, but not on this finite test set, which only resampling the images can tell."""
    world = {
        "labels": rng.integers(0, K, N_TEST),
        "difficulty": rng.normal(0, 1, N_TEST),
        "ood": {"near": rng.normal(0, 1, N_OOD), "far": rng.normal(0, 1, N_OOD)},
    }
    for family in ("cand", "base"):
        world[family] = rng.normal(0, 1, N_TEST), {k: rng.normal(0, 1, N_OOD) for k in world["ood"]}
    return world


def _model(rng, world, family, skill, separation, seed_sd, overconfidence=1.0):
    """One trained model (one seed): its quality varies by seed, its errors by image. It states
    confidence ``sigmoid(skill + difficulty)`` and is right with probability
    ``sigmoid(skill + difficulty - overconfidence)``; OOD images score ``separation`` below ID ones."""
    skill = skill + rng.normal(0, seed_sd)
    sep = separation + rng.normal(0, seed_sd)
    per_image, per_ood_image = world[family]
    a = skill + world["difficulty"] + per_image
    conf = 1 / (1 + np.exp(-a))
    right = rng.random(N_TEST) < 1 / (1 + np.exp(-(a - overconfidence)))
    labels = world["labels"]
    pred = np.where(right, labels, (labels + 1 + rng.integers(0, K - 1, N_TEST)) % K)
    logits = np.zeros((N_TEST, K))
    logits[np.arange(N_TEST), pred] = np.log(conf * (K - 1) / (1 - conf))  # softmax max = conf
    id_scores = a + rng.normal(0, 0.5, N_TEST)
    ood = {k: v + per_ood_image[k] + rng.normal(0, 0.5, N_OOD) + skill - sep for k, v in world["ood"].items()}
    return SampleSet(logits, labels, id_scores, ood, {"near": "near", "far": "far"})


def _reports(sets):
    out = []
    for s in sets:
        per_set = {k: metrics.fpr_at_tpr(s.id_scores, v) for k, v in s.ood_scores.items()}
        m = {
            "test/accuracy": metrics.accuracy(s.logits, s.labels),
            "test/ece": metrics.ece(s.logits, s.labels),
        }
        m.update({f"ood/{k}/fpr95": v for k, v in per_set.items()})
        m.update({f"ood/{k}/fpr95": v for k, v in metrics.ood_summaries(per_set, s.groups).items()})
        out.append(m)
    return out


def _draw(rng, cand_skill, cand_sep, seed_sd=0.15, seeds=3, gate=None, cand_overconfidence=1.0):
    world = _world(rng)
    cand = [
        _model(rng, world, "cand", cand_skill, cand_sep, seed_sd, cand_overconfidence) for _ in range(seeds)
    ]
    base = [_model(rng, world, "base", 2.0, 1.0, seed_sd) for _ in range(seeds)]
    gate = gate or GateConfig(samples=200)
    return decide(_reports(cand), _reports(base), gate, cand, base)


def test_a_clearly_better_candidate_is_promoted_with_its_evidence():
    d = _draw(np.random.default_rng(0), cand_skill=3.0, cand_sep=3.0, cand_overconfidence=0.0)
    assert d.promote, d.reasons
    assert all("3 vs 3 seeds" in r and "95% lower bound" in r and "p = " in r for r in d.reasons)
    ev = d.metrics()
    assert set(ev) == {
        f"gate/{c}/{k}"
        for c in ("test/accuracy", "test/ece", "ood/mean/fpr95")
        for k in ("gain", "lower", "p_value")
    }
    assert all(ev[f"gate/{c}/lower"] > 0 for c in ("test/accuracy", "test/ece", "ood/mean/fpr95"))


@pytest.mark.parametrize(("seed_sd", "rule"), [(0.15, "mean"), (0.02, "groups")])
def test_a_candidate_identical_to_the_baseline_is_rarely_promoted(seed_sd, rule):
    """200 draws of a candidate with the baseline's distribution, at confidence 0.95. Each criterion
    alone must pass in about 5% of the draws at most (binomial sd at 200 draws: 1.5 points), and the
    promotion (all criteria) less often. With ``seed_sd=0.02`` the seeds hardly differ and the noise is
    the test set's: the bootstrap term must carry the test (without it, each FPR95 criterion alone
    passes in 12% to 18% of these draws)."""
    rng = np.random.default_rng(123)
    gate = GateConfig(samples=200, fpr95=rule)
    draws = [_draw(rng, 2.0, 1.0, seed_sd=seed_sd, gate=gate) for _ in range(200)]
    promoted = np.mean([d.promote for d in draws])
    per_criterion = {k: np.mean([d.checks[k] for d in draws]) for k in draws[0].checks}
    assert promoted <= 0.05, (promoted, per_criterion)
    assert all(rate <= 0.085 for rate in per_criterion.values()), per_criterion


def test_evidence_needs_the_samples():
    with pytest.raises(ValueError, match="per-sample test arrays are missing"):
        decide([_cand(), _cand()], [BASE, BASE], GateConfig())


def test_rank_prefers_lower_fpr_then_ece_then_accuracy():
    a = _cand(ood__mean__fpr95=0.2)
    b = _cand(ood__mean__fpr95=0.3)
    c = _cand(ood__mean__fpr95=0.2, test__ece=0.01)
    assert sorted([a, b, c], key=rank_key) == [c, a, b]


def test_decide_all_equals_deciding_each_candidate_alone():
    rng = np.random.default_rng(5)
    world = _world(rng)
    sets = {
        "base": [_model(rng, world, "base", 2.0, 1.0, 0.15) for _ in range(3)],
        "a": [_model(rng, world, "cand", 2.5, 2.0, 0.15, 0.5) for _ in range(3)],
        "b": [_model(rng, world, "cand", 2.0, 1.0, 0.15) for _ in range(3)],
    }
    reports = {k: _reports(v) for k, v in sets.items()}
    gate = GateConfig(samples=200)
    together = decide_all(reports, "base", gate, sets)
    assert set(together) == {"a", "b"}
    for k in ("a", "b"):
        alone = decide(reports[k], reports["base"], gate, sets[k], sets["base"])
        assert together[k].reasons == alone.reasons and together[k].metrics() == alone.metrics()
    means_only = GateConfig(confidence=None)
    assert decide_all(reports, "base", means_only)["a"] == decide(reports["a"], reports["base"], means_only)
