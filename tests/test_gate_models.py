"""The gate's model-level evidence (``gate.evidence: models``): the paired tests (reference values),
Holm's step-down over candidates, the deployable seed's choice, the seeds a recipe would need, and
two fixed models whose population metrics are known, scored on freshly drawn images
(:mod:`simulation`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import simulation
from scipy import optimize, stats

from oodgate.base.config import GateConfig
from oodgate.deciding import paired
from oodgate.deciding.gate import choose_seed, decide_all, decide_models, seeds_needed

CONFIDENCE = 0.95


# ---------------------------------------------------------------- the paired tests, reference values
def _restricted_mle(n10: int, n01: int, n: int, d0: float) -> float:
    """``p01`` maximising the multinomial likelihood under ``p10 - p01 = d0``, numerically."""
    nc = n - n10 - n01

    def nll(q: float) -> float:
        return -(n10 * math.log(q + d0) + n01 * math.log(q) + nc * math.log(1 - 2 * q - d0))

    lo, hi = max(0.0, -d0) + 1e-12, (1 - d0) / 2 - 1e-12
    return float(optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}).x)


@pytest.mark.parametrize(
    ("n10", "n01", "n", "d0"), [(9, 4, 600, -0.005), (3, 12, 600, -0.01), (40, 35, 2000, 0.004)]
)
def test_tango_statistic_uses_the_restricted_maximum_likelihood(n10, n01, n, d0):
    q = _restricted_mle(n10, n01, n, d0)
    want = (n10 - n01 - n * d0) / math.sqrt(n * (2 * q + d0 - d0 * d0))
    assert paired.tango_z(n10, n01, n, d0) == pytest.approx(want, rel=1e-6)


def test_tango_at_zero_is_mcnemars_statistic_and_its_bound_inverts_the_test():
    assert paired.tango_z(14, 5, 600, 0.0) == pytest.approx((14 - 5) / math.sqrt(14 + 5), rel=1e-12)
    for n10, n01 in [(0, 0), (5, 0), (0, 5), (9, 4), (30, 10), (3, 3)]:
        for bound in (-0.005, -0.01, 0.002):
            t = paired.tango_test(n10, n01, 600, bound, CONFIDENCE)
            # the lower bound is where the statistic meets the normal quantile: p < alpha iff above the bound
            assert (t.p_value < 0.05) == (t.lower > bound), (n10, n01, bound, t)
            if -1 < t.lower < 1:
                assert paired.tango_z(n10, n01, 600, t.lower) == pytest.approx(
                    stats.norm.ppf(CONFIDENCE), abs=1e-6
                )
            assert "Tango" in t.name


def test_mcnemar_exact_test_equals_scipys_binomial_test_and_its_exact_bound():
    for n10, n01 in [(1, 0), (6, 0), (9, 4), (14, 5), (20, 7), (4, 11), (0, 3)]:
        t = paired.mcnemar_test(n10, n01, 600, CONFIDENCE)
        ref = stats.binomtest(n10, n10 + n01, 0.5, alternative="greater").pvalue
        assert t.p_value == pytest.approx(ref, rel=1e-12)
        assert (t.p_value < 0.05) == (t.lower > 0), (n10, n01, t)
        assert t.name == "McNemar's exact test"
    none = paired.mcnemar_test(0, 0, 600, CONFIDENCE)
    assert none.p_value == 1.0 and none.lower == 0.0
    assert paired.accuracy_test(9, 4, 600, 0.0, CONFIDENCE).name == "McNemar's exact test"
    assert "Tango" in paired.accuracy_test(9, 4, 600, -0.005, CONFIDENCE).name


def test_bootstrap_test_is_the_normal_test_with_the_resampled_standard_error():
    gains = np.random.default_rng(0).normal(0.1, 0.04, 1000)
    t = paired.bootstrap_test(0.1, gains, 0.0, CONFIDENCE)
    se = np.std(gains, ddof=1)
    assert t.p_value == pytest.approx(stats.norm.sf(0.1 / se), rel=1e-12)
    assert t.lower == pytest.approx(0.1 - stats.norm.ppf(0.95) * se, rel=1e-12)
    assert paired.bootstrap_test(0.1, np.zeros(10), 0.0, CONFIDENCE).p_value == 0.0  # nothing varies
    assert paired.bootstrap_test(0.0, np.zeros(10), 0.0, CONFIDENCE).p_value == 1.0


def test_holm_adjusted_p_values():
    """Hand-computed: sorted 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1, held at 0.06)."""
    assert paired.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert paired.holm({"a": 0.5}) == {"a": 0.5}
    assert paired.holm({"a": 0.4, "b": 0.9}) == {"a": 0.8, "b": 0.9}
    assert paired.holm({}) == {}


# ---------------------------------------------------------------- the deployable seed
def test_the_seed_is_chosen_by_validation_nll_then_ece_then_the_lowest_seed():
    v = {0: {"val/nll": 0.08, "val/ece": 0.01}, 1: {"val/nll": 0.06, "val/ece": 0.03}, 2: {"val/nll": 0.07}}
    c = choose_seed(v)
    assert c.seed == 1 and "seed 1: 0.0600 / 0.0300" in c.why and "lowest calibrated validation NLL" in c.why
    tie = {3: {"val/nll": 0.05, "val/ece": 0.02}, 1: {"val/nll": 0.05, "val/ece": 0.01}}
    assert choose_seed(tie).seed == 1
    assert choose_seed({5: {"val/nll": 0.05}, 4: {"val/nll": 0.05}}).seed == 4  # then the lowest seed
    assert (
        choose_seed({0: {}, 1: {"val/nll": math.nan}, 2: {"val/nll": 9.0}}).seed == 2
    )  # missing counts worst
    with pytest.raises(ValueError, match="at least one seed"):
        choose_seed({})


# ---------------------------------------------------------------- how many seeds a recipe needs
def test_seeds_needed_has_the_power_it_promises():
    """At the number of seeds it returns, simulated Welch tests pass in about 80% of runs (and at one
    seed fewer, in fewer); no gain above the bound, no number."""
    rng = np.random.default_rng(0)
    gain, sd = 0.1, 0.15
    n = seeds_needed(gain, 0.0, sd**2, sd**2, 0.0, CONFIDENCE)
    assert 10 <= n <= 60

    def rate(k: int) -> float:
        c, b = rng.normal(gain, sd, (4000, k)), rng.normal(0.0, sd, (4000, k))
        return float(
            np.mean(stats.ttest_ind(c, b, axis=1, equal_var=False, alternative="greater").pvalue < 0.05)
        )

    assert rate(n) == pytest.approx(0.8, abs=0.03)
    assert rate(n - 1) < 0.8
    assert seeds_needed(0.0, 0.0, sd**2, sd**2, 0.0, CONFIDENCE) is None
    assert seeds_needed(-0.01, -0.005, sd**2, sd**2, 0.0, CONFIDENCE) is None
    # images every seed shares: more seeds cannot remove their noise
    assert seeds_needed(0.01, 0.0, 1e-4, 1e-4, 0.01**2, CONFIDENCE) is None
    assert seeds_needed(0.2, 0.0, sd**2, sd**2, 0.0, CONFIDENCE) < n  # a larger gain needs fewer


# ---------------------------------------------------------------- decisions on two models
def _pair(rng, candidate: simulation.Family):
    d = simulation.model_draw(rng, candidate)
    return d.candidate[0], d.baseline[0], d.candidate_samples[0], d.baseline_samples[0]


def test_model_level_reasons_name_the_models_the_images_and_the_tests():
    better = simulation.Family(skill=6.0, separation=4.0, overconfidence=0.0)
    c, b, cs, bs = _pair(np.random.default_rng(0), better)
    d = decide_models(c, b, cs, bs, GateConfig(samples=200), compared="x seed 1 against softmax seed 0")
    assert d.promote, d.reasons
    assert d.compared == "x seed 1 against softmax seed 0, on the same 600 test and 5,000 OOD images"
    assert (
        "Tango's paired score test (McNemar-type)" in d.reasons[0]
        and "discordant of 600 test images" in d.reasons[0]
    )
    assert all(
        "paired bootstrap, 200 resamples of the same 600 test and 5,000 OOD images" in r
        for r in d.reasons[1:]
    )
    assert all("and the candidate's is better than the baseline's" in r for r in d.reasons)
    n10 = int(((cs.logits.argmax(1) == cs.labels) & (bs.logits.argmax(1) != bs.labels)).sum())
    assert f"{n10} vs " in d.reasons[0]
    # the accuracy gain the test uses is the metrics' own
    assert d.evidence[0].gain == pytest.approx(c["test/accuracy"] - b["test/accuracy"], abs=1e-12)
    strict = GateConfig(samples=200, accuracy={"test": "superior", "margin": 0.0})
    assert "McNemar's exact test" in decide_models(c, b, cs, bs, strict).reasons[0]


def test_model_level_evidence_needs_the_same_images():
    rng = np.random.default_rng(1)
    c, b, _, bs = _pair(rng, simulation.BASELINE)
    _, _, other, _ = _pair(rng, simulation.BASELINE)
    with pytest.raises(ValueError, match="same test images"):
        decide_models(c, b, other, bs, GateConfig(samples=100))


def test_the_test_images_alone_decide_whatever_the_other_seeds():
    """Model-level: the decision depends on the deployable models only; the other seeds' results
    change the seed-level report beside it, never the decision."""
    rng = np.random.default_rng(2)
    metrics, samples = simulation.run_draw(rng, {"a": simulation.Family(6.0, 4.0, 0.0)})
    extra_m, extra_s = simulation.run_draw(np.random.default_rng(3), {"a": simulation.BASELINE})
    gate = GateConfig(samples=200)
    alone = decide_all(metrics, "baseline", gate, samples)["a"]
    assert alone.seed_level == ("seed-level: not computed (1 vs 1 seeds; it needs 2 or more of each)",)
    more_m = {k: [*metrics[k], *extra_m[k], *extra_m[k]] for k in metrics}
    more_s = {k: [*samples[k], *extra_s[k], *extra_s[k]] for k in samples}
    with_seeds = decide_all(more_m, "baseline", gate, more_s, chosen={"a": 0, "baseline": 0})["a"]
    assert with_seeds.promote == alone.promote and with_seeds.reasons == alone.reasons
    assert (
        with_seeds.seed_level[0].startswith("seed-level: accuracy")
        and "3 vs 3 seeds" in with_seeds.seed_level[0]
    )
    assert (
        "seeds would show it" in with_seeds.seed_level[2] or "no number of seeds" in with_seeds.seed_level[2]
    )


# ---------------------------------------------------------------- known truth: two fixed models
@pytest.fixture(scope="module")
def truths() -> dict[str, simulation.Family]:
    return simulation.MODEL_EFFECTS


def test_the_truths_have_the_population_metrics_asked_for(truths):
    """The fixed models of :data:`simulation.MODEL_EFFECTS` against the baseline's:
    accuracy +1 point, calibrated ECE -0.005 and FPR95 30% lower; accuracy -1 point; FPR95 equal."""
    b = simulation.population(simulation.BASELINE)
    d = simulation.population(truths["dismax-like"])
    assert d["test/accuracy"] == pytest.approx(b["test/accuracy"] + 0.01, abs=5e-4)
    assert d["test/ece"] == pytest.approx(b["test/ece"] - 0.005, abs=5e-4)
    assert d["ood/mean/fpr95"] == pytest.approx(0.7 * b["ood/mean/fpr95"], abs=5e-3)
    w = simulation.population(truths["worse accuracy"])
    assert w["test/accuracy"] == pytest.approx(b["test/accuracy"] - 0.01, abs=5e-4)
    e = simulation.population(truths["fpr95 equal"])
    assert e["ood/mean/fpr95"] == b["ood/mean/fpr95"] and e["test/accuracy"] > b["test/accuracy"] + 0.015
    assert e["test/ece"] < b["test/ece"]
    o = simulation.population(truths["fpr95 lower"])
    assert o["test/accuracy"] == b["test/accuracy"] and o["test/ece"] == b["test/ece"]
    assert o["ood/mean/fpr95"] == pytest.approx(0.7 * b["ood/mean/fpr95"], abs=5e-3)


@pytest.mark.slow
def test_model_with_solves_for_the_population_metrics():
    """:func:`simulation.model_with` finds a fixed model by its population metrics (how
    :data:`simulation.MODEL_EFFECTS` were found)."""
    b = simulation.population(simulation.BASELINE)
    f = simulation.model_with(accuracy=b["test/accuracy"] - 0.01)
    assert simulation.population(f)["test/accuracy"] == pytest.approx(b["test/accuracy"] - 0.01, abs=5e-4)


def _at_most(rate: float, draws: int, bound: float = 0.05) -> bool:
    """Whether ``rate`` over ``draws`` is consistent with a true rate of at most ``bound`` (one-sided
    binomial test at level 0.01): a true rate at the bound exceeds it in half the draws' sets."""
    k = round(rate * draws)
    return stats.binom.sf(k - 1, draws, bound) >= 0.01


@pytest.mark.slow
def test_identical_models_are_promoted_in_at_most_5_percent():
    """Two models with the same population metrics (independent errors beyond the images'
    difficulty), 200 draws of the demo's images: at most 5% promoted, and FPR95's test at about its
    level."""
    r = simulation.model_rate(simulation.BASELINE, GateConfig(), draws=200, rng_seed=21)
    assert r.promoted <= 0.05, r
    assert _at_most(r.criteria["ood/mean/fpr95"], 200), r.criteria


@pytest.mark.slow
def test_a_model_worse_in_accuracy_by_twice_the_tolerance_is_promoted_in_at_most_5_percent(truths):
    r = simulation.model_rate(truths["worse accuracy"], GateConfig(), draws=200, rng_seed=22)
    assert r.promoted <= 0.05, r


@pytest.mark.slow
def test_the_dismax_like_effect_is_promoted_in_80_percent_at_cifar_size(truths):
    """Accuracy +1 point, calibrated ECE -0.005, FPR95 30% lower, at 10,000 test images (CIFAR-10's
    test set) and the demo's OOD sets: promoted in at least 80% of draws (500 resamples each)."""
    world = simulation.World(n_test=10_000)
    r = simulation.model_rate(
        truths["dismax-like"], GateConfig(samples=500), draws=60, world=world, rng_seed=23
    )
    assert r.promoted >= 0.8, r


@pytest.mark.slow
def test_one_error_rate_per_run_however_many_candidates(truths):
    """Four candidates whose FPR95 equals the baseline's (a true null) and which beat it on accuracy
    and ECE by far, so that FPR95's test alone decides each: a run promotes any of them in at most
    5% of 200 runs with Holm's step-down, while testing each alone at 5% would promote one in about
    a fifth of the runs."""
    null = truths["fpr95 equal"]
    candidates = {f"c{i}": null for i in range(4)}
    r = simulation.run_rates(candidates, GateConfig(), draws=200, rng_seed=24)
    assert _at_most(r["any"], 200), r
    assert r["any unadjusted"] > 0.1, r  # what Holm's step-down prevents
