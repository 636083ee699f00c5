"""The gate: the means-only rule, the evidence tests (reference values), the resampled metrics, and
simulated candidates whose truth is known (:mod:`simulation`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import simulation
from scipy import stats

from oodgate.base.config import GateConfig
from oodgate.deciding import resampling
from oodgate.deciding.gate import (
    Criterion,
    compare_means,
    criteria,
    decide,
    decide_all,
    rank_key,
    welch_evidence,
)
from oodgate.measuring import metrics

ACCURACY = Criterion("test/accuracy", True, "accuracy", "superior", 0.0)

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


def test_superior_margins_are_required_improvements_and_noninferior_margins_tolerances():
    superior = {"test": "superior", "margin": 0.03}
    gate = GateConfig(confidence=None, accuracy=superior)
    d = compare_means(_cand(), BASE, gate)  # +0.02 accuracy < 0.03 margin
    assert not d.promote and not d.checks["test/accuracy"]
    assert "superior: higher by more than 0.03, bound +0.0300" in d.reasons[0]
    assert compare_means(_cand(test__accuracy=0.95), BASE, gate).promote
    assert not compare_means(_cand(), BASE, GateConfig(confidence=None, fpr95={"margin": 0.5})).promote
    # non-inferior: a lower accuracy within the tolerance passes its test, but the mean must still be better
    lower = _cand(test__accuracy=0.898)
    d = compare_means(lower, BASE, MEANS_ONLY)
    assert not d.promote and d.evidence[0].tested and not d.evidence[0].passed
    assert "but the mean is not better than the baseline's" in d.reasons[0]
    assert compare_means(lower, BASE, GateConfig(confidence=None, better_means=False)).promote
    assert not compare_means(
        _cand(test__accuracy=0.89), BASE, GateConfig(confidence=None, better_means=False)
    ).promote


def test_equal_means_summed_in_another_order_are_not_better():
    """The same per-seed accuracies in another order: their means differ in the last bit, which is
    rounding, not an improvement (the committed demo's IsoMax showed +1.1e-16 as a better mean)."""
    cand, base = [0.985, 0.97, 0.975], [0.985, 0.975, 0.97]
    assert np.mean(cand) - np.mean(base) > 0  # +1.1e-16: the rounding this test is about
    noninferior = Criterion("test/accuracy", True, "accuracy", "noninferior", 0.005)
    e = welch_evidence(noninferior, cand, base, 1e-6, 0.95)
    assert not e.passed
    assert "but the mean is not better than the baseline's" in e.reason("baseline", 0.95)
    d = compare_means(
        {**BASE, "test/accuracy": float(np.mean(cand))},
        {**BASE, "test/accuracy": float(np.mean(base))},
        MEANS_ONLY,
    )
    assert not d.evidence[0].passed


def test_means_only_reasons_name_the_values_the_test_and_the_reference():
    d = compare_means(_cand(), BASE, MEANS_ONLY, reference="champion")
    assert d.reasons[0] == (
        "accuracy 0.9200 vs champion 0.9000: gain +0.0200, passes non-inferior: not lower by more than "
        "0.005, bound -0.0050, and the mean is better than the champion's"
    )
    assert d.reasons[2].startswith(
        "mean FPR95 0.3000 vs champion 0.6000: gain +0.3000, passes superior: lower"
    )
    assert d.summary().startswith("PROMOTE: ")
    assert d.tests() == {
        "test/accuracy": "noninferior > -0.005",
        "test/ece": "noninferior > -0.01",
        "ood/mean/fpr95": "superior > +0",
    }


def test_fpr95_rule_picks_the_criteria():
    m = {**BASE, "ood/near/fpr95": 0.5, "ood/far/fpr95": 0.7, "ood/worst/fpr95": 0.9}
    assert [c.metric for c in criteria(GateConfig(), m)][2:] == ["ood/mean/fpr95"]
    assert [c.metric for c in criteria(GateConfig(fpr95={"over": "groups"}), m)][2:] == [
        "ood/near/fpr95",
        "ood/far/fpr95",
    ]
    assert [c.metric for c in criteria(GateConfig(fpr95={"over": "worst"}), m)][2:] == ["ood/worst/fpr95"]
    only_far = {**BASE, "ood/far/fpr95": 0.7}
    assert [c.metric for c in criteria(GateConfig(fpr95={"over": "groups"}), only_far)][2:] == [
        "ood/far/fpr95"
    ]
    # a candidate better on near but not on far OOD fails the groups rule, passes the mean rule
    cand = {**_cand(), "ood/near/fpr95": 0.1, "ood/far/fpr95": 0.75, "ood/worst/fpr95": 0.75}
    assert compare_means(cand, m, GateConfig(confidence=None)).promote
    d = compare_means(cand, m, GateConfig(confidence=None, fpr95={"over": "groups"}))
    assert not d.promote and d.checks == {
        "test/accuracy": True,
        "test/ece": True,
        "ood/near/fpr95": True,
        "ood/far/fpr95": False,
    }
    assert any(
        r.startswith("far-OOD FPR95 0.7500 vs baseline 0.7000: gain -0.0500, fails") for r in d.reasons
    )


# ---------------------------------------------------------------- the test itself, reference values
def test_welch_evidence_equals_scipy_welch_test_without_sample_noise():
    cand, base = [0.93, 0.95, 0.96, 0.94], [0.90, 0.92, 0.89]
    e = welch_evidence(ACCURACY, cand, base, var_sample=0.0, confidence=0.95)
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
    e = welch_evidence(Criterion("test/accuracy", True, "accuracy", "superior", 0.01), cand, base, vs, 0.9)
    assert e.df == pytest.approx(df, rel=1e-12)
    assert e.p_value == pytest.approx(stats.t.sf(t, df), rel=1e-12)
    assert e.se_sample == pytest.approx(0.01)
    # lower is better: the gain is base - cand
    ece = criteria(GateConfig(), BASE)[1]
    e2 = welch_evidence(ece, [0.02, 0.03, 0.025], [0.05, 0.06, 0.055], 0.0, 0.95)
    assert e2.gain == pytest.approx(0.03) and e2.passed


def test_noninferiority_tests_the_gain_against_minus_the_tolerance():
    """``noninferior`` with margin d: the one-sided test of ``gain > -d``, i.e. Welch's test of the
    shifted difference, and its lower bound above ``-d``."""
    cand, base = [0.901, 0.899, 0.902], [0.90, 0.905, 0.898]
    c = Criterion("test/accuracy", True, "accuracy", "noninferior", 0.01)
    e = welch_evidence(c, cand, base, 0.0, 0.95, better_means=False)
    ref = stats.ttest_ind(np.add(cand, 0.01), base, equal_var=False, alternative="greater")
    assert e.p_value == pytest.approx(ref.pvalue, rel=1e-12) and e.tested == (ref.pvalue < 0.05)
    assert e.passed and e.lower > -0.01 and e.gain < 0  # worse on average, but shown not worse by 0.01
    assert not welch_evidence(c, cand, base, 0.0, 0.95, better_means=True).passed  # the mean is not better


def test_welch_evidence_edge_cases():
    with pytest.raises(ValueError, match="needs results of both models"):
        welch_evidence(ACCURACY, [], [0.8, 0.81], 0.0, 0.95)
    same = welch_evidence(ACCURACY, [0.9, 0.9], [0.8, 0.8], 0.0, 0.95)
    assert same.passed and same.p_value == 0.0  # nothing varies: the gain is exact
    tie = welch_evidence(ACCURACY, [0.8, 0.8], [0.8, 0.8], 0.0, 0.95)
    assert not tie.passed


def test_a_single_checkpoint_has_no_seed_variance_and_all_its_sampling_noise():
    """One imported checkpoint against 3 seeds: the candidate side adds no seed variance, its test-sample
    variance stays in ``var_sample``; the df come from the baseline's seeds; the reason says so."""
    base = [0.90, 0.92, 0.89]
    e = welch_evidence(ACCURACY, [0.95], base, var_sample=0.01**2, confidence=0.95)
    vb = np.var(base, ddof=1) / 3
    assert e.df == pytest.approx((vb + 0.01**2) ** 2 / (vb**2 / 2))
    assert e.p_value == pytest.approx(stats.t.sf((0.95 - np.mean(base)) / math.sqrt(vb + 0.01**2), e.df))
    assert "1 vs 3 seeds (a single checkpoint: its evidence is the test samples alone)" in e.reason(
        "baseline", 0.95
    )
    both = welch_evidence(ACCURACY, [0.95], [0.9], var_sample=0.01**2, confidence=0.95)
    assert both.df == math.inf and both.p_value == pytest.approx(stats.norm.sf(0.05 / 0.01))


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
SMALL = simulation.World(n_test=300, classes=3, ood={"near": (200, "near"), "far": (200, "far")})


SEEDS = {"evidence": "seeds"}  # the seed-level evidence (gate.evidence: seeds)


def test_a_clearly_better_candidate_is_promoted_with_its_evidence():
    better = simulation.Family(skill=6.0, separation=5.0, overconfidence=0.0)
    d = simulation.draw(np.random.default_rng(0), better, world=SMALL).decide(
        GateConfig(samples=200, **SEEDS)
    )
    assert d.promote, d.reasons
    assert all("3 vs 3 seeds" in r and "95% lower bound" in r and "p = " in r for r in d.reasons)
    ev = d.metrics()
    assert set(ev) == {
        f"gate/{c}/{k}"
        for c in ("test/accuracy", "test/ece", "ood/mean/fpr95")
        for k in ("gain", "bound", "lower", "p_value")
    }
    assert ev["gate/test/accuracy/bound"] == -0.005 and ev["gate/ood/mean/fpr95/bound"] == 0.0
    assert all(
        ev[f"gate/{c}/lower"] > ev[f"gate/{c}/bound"] for c in ("test/accuracy", "test/ece", "ood/mean/fpr95")
    )


@pytest.mark.slow
@pytest.mark.parametrize(("world", "over"), [(simulation.DEMO, "mean"), (SMALL, "groups")])
def test_a_candidate_identical_to_the_baseline_is_promoted_in_at_most_5_percent(world, over):
    """200 draws of a candidate with the baseline's distribution, at confidence 0.95, at the demo's
    sizes and seed noise and on a small world: the promotion rate is at most 1 - confidence, and so
    is each superior criterion's (binomial sd at 200 draws: 1.5 points)."""
    gate = GateConfig(samples=200, fpr95={"over": over}, **SEEDS)
    r = simulation.promotion_rate(simulation.BASELINE, gate, draws=200, world=world, rng_seed=123)
    assert r.promoted <= 0.05, r
    superior = [k for k in r.criteria if k.endswith("fpr95")]
    assert all(r.criteria[k] <= 0.085 for k in superior), r.criteria


@pytest.fixture(scope="module")
def papers_effect() -> tuple[dict, float]:
    """The baseline's description over 150 models, and the separation that lowers its mean FPR95 by
    30% (a bisection: seconds, shared by the tests that need it)."""
    base = simulation.describe(simulation.BASELINE, 150)
    return base, simulation.separation_for_fpr95(0.7 * base["ood/mean/fpr95"][0])


@pytest.mark.slow
def test_a_candidate_worse_in_accuracy_by_twice_the_tolerance_is_rarely_promoted(papers_effect):
    """Accuracy lower by 0.01 (twice the default tolerance) but FPR95 30% lower: at most 5% of 200
    draws promote it, at the demo's sizes and seed noise."""
    base, papers = papers_effect
    worse = simulation.Family(
        simulation.skill_for_accuracy(base["test/accuracy"][0] - 0.01),
        papers,
        simulation.BASELINE.overconfidence,
    )
    found = simulation.describe(worse, 150)
    assert found["test/accuracy"][0] == pytest.approx(base["test/accuracy"][0] - 0.01, abs=0.002)
    r = simulation.promotion_rate(worse, GateConfig(samples=200, **SEEDS), draws=200, rng_seed=7)
    assert r.promoted <= 0.05, r


@pytest.mark.slow
def test_the_papers_effect_is_promoted_more_often_the_more_seeds(papers_effect):
    """The papers' typical effect (the baseline's accuracy and ECE, mean FPR95 30% lower) at the
    demo's sizes and seed noise: what the gate can show grows with the seeds
    (``benchmarks/bench_gate_power.py`` prints the rates; at 3 seeds they are low, see the README)."""
    base, separation = papers_effect
    papers = simulation.Family(simulation.BASELINE.skill, separation, simulation.BASELINE.overconfidence)
    found = simulation.describe(papers, 150)
    assert found["ood/mean/fpr95"][0] == pytest.approx(0.7 * base["ood/mean/fpr95"][0], rel=0.05)
    assert found["test/accuracy"] == base["test/accuracy"]  # the same skill: the same accuracy
    gate = GateConfig(samples=200, **SEEDS)
    few = simulation.promotion_rate(papers, gate, draws=40, seeds=3, rng_seed=11)
    many = simulation.promotion_rate(papers, gate, draws=40, seeds=10, rng_seed=11)
    identical = simulation.promotion_rate(simulation.BASELINE, gate, draws=40, seeds=10, rng_seed=11)
    assert many.criteria["ood/mean/fpr95"] > few.criteria["ood/mean/fpr95"]
    assert many.promoted > identical.promoted


def test_evidence_needs_the_samples():
    with pytest.raises(ValueError, match="per-sample test arrays are missing"):
        decide([_cand(), _cand()], [BASE, BASE], GateConfig())
    with pytest.raises(ValueError, match="per-sample test arrays are missing"):
        decide_all({"a": [_cand()], "base": [BASE]}, "base", GateConfig())


def test_rank_prefers_lower_fpr_then_ece_then_accuracy():
    a = _cand(ood__mean__fpr95=0.2)
    b = _cand(ood__mean__fpr95=0.3)
    c = _cand(ood__mean__fpr95=0.2, test__ece=0.01)
    assert sorted([a, b, c], key=rank_key) == [c, a, b]


def test_decide_all_equals_deciding_each_candidate_alone():
    rng = np.random.default_rng(5)
    a = simulation.draw(rng, simulation.Family(5.0, 3.0, 0.1), world=SMALL)
    b = simulation.draw(rng, simulation.BASELINE, world=SMALL)
    sets = {"base": a.baseline_samples, "a": a.candidate_samples, "b": b.candidate_samples}
    reports = {"base": a.baseline, "a": a.candidate, "b": b.candidate}
    gate = GateConfig(samples=200, **SEEDS)
    together = decide_all(reports, "base", gate, sets)
    assert set(together) == {"a", "b"}
    for k in ("a", "b"):
        alone = decide(reports[k], reports["base"], gate, sets[k], sets["base"])
        # the same evidence per criterion; over the run, Holm's line and p-values come last
        assert together[k].reasons[:-1] == alone.reasons
        assert "Holm-adjusted over 2 candidates" in together[k].reasons[-1]
        run_level = {"gate/p_value", "gate/p_adjusted"}
        assert {m: v for m, v in together[k].metrics().items() if m not in run_level} == alone.metrics()
    means_only = GateConfig(confidence=None, **SEEDS)
    assert decide_all(reports, "base", means_only)["a"] == decide(reports["a"], reports["base"], means_only)


@pytest.mark.parametrize("n", [1, 2, 5, 30, 64, 65, 600, 3000])
@pytest.mark.parametrize("tpr", [0.95, 0.5, 1.0])
def test_the_tail_threshold_equals_the_whole_cumulative_count(n, tpr):
    """``id_threshold`` sums only the lowest-scored images unless a resample's threshold lies above
    them: the same thresholds as the cumulative count over every image, with ties, and with
    resamples drawn all on the lowest or all on the highest score (the whole sum's path)."""
    rng = np.random.default_rng(n)
    scores = np.round(rng.normal(size=n), 1)
    w = resampling.draw_counts(rng, n, 200)
    w[0], w[1] = 0, 0
    w[0, np.argmin(scores)], w[1, np.argmax(scores)] = n, n
    order = np.argsort(-scores, kind="stable")
    whole = scores[order][np.argmax(np.cumsum(w[:, order], axis=1) / n >= tpr, axis=1)]
    assert np.array_equal(resampling.id_threshold(scores, w, tpr), whole)
