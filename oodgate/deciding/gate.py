"""The promotion gate: promote a candidate only with evidence that it beats the reference.

The rule (``gate`` in ``params.yaml``): against the reference (the SoftMax baseline),

(a) with ``gate.better_means`` (the default), the candidate's point estimates are better on all three
    criteria: higher test accuracy, lower calibrated ECE, lower FPR95 (over all OOD sets, per group or
    on the worst set: ``gate.fpr95.over``) -- the rule "accuracy, ECE and FPR95 all beat SoftMax",
    literally; and
(b) each criterion passes its own test at ``gate.confidence``: a ``superior`` criterion (FPR95 by
    default) must be better by more than its margin, a ``noninferior`` one (accuracy, tolerance 0.005,
    and ECE, tolerance 0.01, by default) must not be worse by more than its margin. Both are one-sided
    tests of the gain: ``gain > bound`` with ``bound = +margin`` (superior) or ``-margin``
    (non-inferior), i.e. the one-sided lower confidence bound of the gain is above ``bound``; and
(c) over the run's candidates, Holm's step-down on each candidate's p-value (the largest of its
    criteria's, 1 where (a) fails) at ``1 - confidence`` (:func:`oodgate.deciding.paired.holm`).

Requiring every criterion is an intersection-union test, and Holm's step-down keeps the chance that a
run promotes any candidate for which a null hypothesis holds (FPR95 not better by the margin, or
accuracy or ECE worse by more than the tolerance) at most ``1 - confidence``, however many
candidates the run has. A missing or NaN metric never promotes.

Why the two forms of test: the methods this gate exists for claim far better OOD detection at equal
accuracy, and after temperature scaling every loss is about equally calibrated, so asking for a
significant improvement in accuracy and ECE too would almost never promote them, at any scale;
asking that they are not significantly worse keeps the guarantee that matters. Rule (a) then asks,
literally, that accuracy and ECE are better too: a method that only claims "OOD better at equal
accuracy" passes it about as often as a coin lands heads, since an exact tie is not better.

**The evidence** (``gate.evidence``) answers one of two questions.

``models`` (the default): *is this model, which would be deployed, better than the model it would
replace, on these images?* Each loss's deployable model is one seed, chosen on validation data only
(:func:`choose_seed`), and the candidate's is compared with the baseline's, both scored on the very
same test and OOD images: accuracy by the paired exact test on the discordant images (McNemar's, or
Tango's score test for a non-zero bound: :mod:`oodgate.deciding.paired`), calibrated ECE and FPR95 by the
paired bootstrap (``gate.samples`` resamples of the images, the same for both models, stratified by
the test set and by each OOD set: :mod:`oodgate.deciding.resampling`) with the normal test
``p = P(Z > (gain - bound) / se)``, ``se`` the resampled gains' standard deviation.

``seeds``: *is this loss better than the baseline's on average over training seeds?* Let ``c_1..c_n``
be the candidate's metric on its ``n`` seeds and ``b_1..b_m`` the baseline's, and
``gain = mean(c) - mean(b)`` (sign flipped where lower is better). Two sources of noise make ``gain``
uncertain:

- the training seed: ``v_seed = s_c^2 / n + s_b^2 / m`` with the sample variances over seeds;
- the finite test and OOD samples, which every seed shares: ``v_sample``, the variance of ``gain``
  over ``gate.samples`` paired bootstrap resamples of the test images and of each OOD set, the
  trained models held fixed (:mod:`oodgate.deciding.resampling`).

``se = sqrt(v_seed + v_sample)``; the degrees of freedom are Welch-Satterthwaite's,
``df = se^4 / (s_c^4 / (n^2 (n-1)) + s_b^4 / (m^2 (m-1)))`` (``v_sample`` counted as known). The
one-sided test of ``gain <= bound`` has ``p = P(T_df > (gain - bound) / se)``; the criterion holds
when ``p < 1 - confidence``, i.e. when the one-sided lower confidence bound
``gain - t_{df, confidence} * se`` exceeds the bound. With 3 seeds, resampling the seeds would see
at most 10 distinct seed sets and a permutation test could not go below p = 1/8; Welch's statistic
is exact for normal seed effects. Under ``models`` the seed-level evidence is still computed and
reported beside the decision, with the number of seeds at which the recipe's observed gain would be
shown (:func:`seeds_needed`).

With ``gate.confidence: null`` the gate compares the point estimates only (no evidence; for quick
trials): each gain must exceed its bound (and be positive with ``better_means``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
from scipy import stats

from oodgate.base.config import CriterionConfig, GateConfig
from oodgate.deciding import paired
from oodgate.deciding.resampling import Counts, gate_metrics
from oodgate.measuring.metrics import OOD_GROUPS


@dataclass(frozen=True)
class Criterion:
    """One metric the gate compares: which way is better, and its test (``superior`` or
    ``noninferior``) with its margin."""

    metric: str
    higher_is_better: bool
    label: str
    test: str = "superior"
    margin: float = 0.0

    @property
    def bound(self) -> float:
        """What the gain (or its lower confidence bound) must exceed: ``+margin`` or ``-margin``."""
        return self.margin if self.test == "superior" else -self.margin

    def rule(self) -> str:
        """The test in words: ``lower by more than 0`` or ``not higher by more than 0.01``."""
        better, worse = ("higher", "lower") if self.higher_is_better else ("lower", "higher")
        if self.test == "superior":
            return f"superior: {better} by more than {self.margin:g}"
        return f"non-inferior: not {worse} by more than {self.margin:g}"


FPR95_LABELS = {
    "mean": "mean FPR95",
    "near": "near-OOD FPR95",
    "far": "far-OOD FPR95",
    "worst": "worst-set FPR95",
}


def _criterion(metric: str, higher: bool, label: str, cfg: CriterionConfig) -> Criterion:
    return Criterion(metric, higher, label, cfg.test, cfg.margin)


def criteria(gate: GateConfig, reference: Mapping[str, float]) -> tuple[Criterion, ...]:
    """The criteria of ``gate``: accuracy, ECE and the FPR95 of ``gate.fpr95.over``; under
    ``groups``, one FPR95 criterion per OOD group in the ``reference`` metrics."""
    groups = [g for g in OOD_GROUPS if f"ood/{g}/fpr95" in reference]
    keys = {"mean": ["mean"], "worst": ["worst"], "groups": groups}[gate.fpr95.over]
    if not keys:
        raise ValueError("gate.fpr95.over='groups' needs at least one OOD set with a group (near or far)")
    fpr = [_criterion(f"ood/{k}/fpr95", False, FPR95_LABELS[k], gate.fpr95) for k in keys]
    return (
        _criterion("test/accuracy", True, "accuracy", gate.accuracy),
        _criterion("test/ece", False, "calibrated ECE", gate.ece),
        *fpr,
    )


@dataclass(frozen=True)
class SampleSet:
    """Per-test-sample arrays of one trained model (one seed)."""

    logits: np.ndarray  # calibrated test logits (N, K)
    labels: np.ndarray  # (N,)
    id_scores: np.ndarray  # (N,)
    ood_scores: Mapping[str, np.ndarray]
    groups: Mapping[str, str] = field(default_factory=dict)  # OOD set -> near / far


@dataclass(frozen=True)
class Evidence:
    """One criterion's comparison: means over seeds, the gain, and (with a confidence) its test.
    ``passed`` is the criterion's verdict: its test (``tested``) and, with ``better_means``, a
    positive mean gain."""

    criterion: Criterion
    candidate: float
    reference: float
    gain: float  # > 0: the candidate is better
    passed: bool
    tested: bool  # the gain (or its lower confidence bound) exceeds the criterion's bound
    better_means: bool = True  # whether a better mean was required
    seeds: tuple[int, int] = (1, 1)
    lower: float | None = None  # one-sided lower confidence bound of the gain
    p_value: float | None = None
    df: float | None = None
    se_seed: float | None = None
    se_sample: float | None = None
    test_name: str = ""  # model-level: the paired test that gave p (McNemar's exact test, ...)
    detail: str = ""  # model-level: what it was computed on (9 vs 4 discordant of 600 test images)
    of_models: bool = False  # two models' metrics (else the means over seeds)

    @property
    def models(self) -> bool:
        """Whether this compares two models on the same images (else means over seeds)."""
        return bool(self.test_name) or self.of_models

    def reason(self, reference: str, confidence: float | None) -> str:
        """One line, no semicolons (reasons are joined with them): the estimates, the gain, the test
        and its verdict, and whether the estimate is better."""
        c = self.criterion
        head = f"{c.label} {self.candidate:.4f} vs {reference} {self.reference:.4f}: gain {self.gain:+.4f}"
        rule = f"{c.rule()}, bound {c.bound:+.4f}"
        if self.p_value is None:
            test = f"{'passes' if self.tested else 'fails'} {rule}"
        else:
            if self.models:
                sides = f"{self.test_name}, {self.detail}"
            else:
                n, m = self.seeds
                sides = f"{n} vs {m} seeds"
                if 1 in (n, m):
                    sides += " (a single checkpoint: its evidence is the test samples alone)"
            test = (
                f"{confidence:.0%} lower bound {self.lower:+.4f}, p = {self.p_value:.3g}, {sides}: "
                f"{'shown' if self.tested else 'not shown'} with {confidence:.0%} confidence ({rule})"
            )
        if self.better_means:
            what = "the candidate's" if self.models else "the mean"
            test += (
                f", and {what} is better than the {reference}'s"
                if better(self.gain)
                else f", but {what} is not better than the {reference}'s"
            )
        return f"{head}, {test}"

    def metrics(self) -> dict[str, float]:
        """For MLflow: ``gate/<metric>/{gain,bound,lower,p_value}``."""
        out = {"gain": self.gain, "bound": self.criterion.bound, "lower": self.lower, "p_value": self.p_value}
        return {f"gate/{self.criterion.metric}/{k}": v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Decision:
    """The gate's decision on one candidate. ``reasons``: one line per criterion, then (with
    evidence, over several candidates) the run-level line; ``compared``: which two models were
    compared on which images (model-level evidence); ``p_value``: the candidate's (the largest of its
    criteria's, 1 where a point estimate is not better); ``adjusted``: Holm's over the run's
    candidates; ``seed_level``: the seed-level evidence, reported beside a model-level decision."""

    promote: bool
    reasons: tuple[str, ...]
    checks: Mapping[str, bool] = field(default_factory=dict)
    evidence: tuple[Evidence, ...] = ()
    compared: str = ""
    p_value: float | None = None
    adjusted: float | None = None
    seed_level: tuple[str, ...] = ()

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "REJECT"
        return verdict + ": " + "; ".join(self.reasons)

    def metrics(self) -> dict[str, float]:
        out = {k: v for e in self.evidence for k, v in e.metrics().items()}
        if self.p_value is not None:
            out["gate/p_value"] = self.p_value
        if self.adjusted is not None:
            out["gate/p_adjusted"] = self.adjusted
        return out

    def by_metric(self) -> dict[str, str]:
        """Per criterion, its reason (the reasons hold one line per criterion, in order, then the
        run-level line)."""
        return dict(zip(self.checks, self.reasons))

    def tests(self) -> dict[str, str]:
        """Per criterion, its test and bound (``noninferior > -0.005``): what the tags record."""
        return {e.criterion.metric: f"{e.criterion.test} > {e.criterion.bound:+g}" for e in self.evidence}

    def strength(self) -> tuple[int, int, float]:
        """How strong the evidence is, to pick the run's best candidate when none is promoted:
        promoted first, then the number of criteria that pass, then the smallest margin by which a
        criterion misses or clears its bound (its lower confidence bound, or the mean gain, minus the
        bound)."""
        slack = [(e.lower if e.lower is not None else e.gain) - e.criterion.bound for e in self.evidence] or [
            -math.inf
        ]
        return (int(self.promote), sum(self.checks.values()), min(slack))


def _missing(c: Criterion, cand: float | None, base: float | None, reference: str) -> str | None:
    if cand is None or base is None or not math.isfinite(cand) or not math.isfinite(base):
        return f"{c.label}: missing or NaN ({c.metric}: candidate {cand}, {reference} {base})"
    return None


def _gain(c: Criterion, cand: float, base: float) -> float:
    return cand - base if c.higher_is_better else base - cand


# Means closer than this are equal: two means of the same values summed in another order differ in
# the last bits (0.9778 - 0.9778 gave +1.1e-16), and rounding is not an improvement.
TIE = 1e-12


def better(gain: float) -> bool:
    """Whether a mean gain is an improvement, not a rounding difference."""
    return gain > TIE


def compare_means(
    candidate: Mapping[str, float],
    reference_metrics: Mapping[str, float],
    gate: GateConfig,
    reference: str = "baseline",
    of_models: bool = False,
) -> Decision:
    """Promote if every criterion's gain exceeds its bound (and, with ``better_means``, is
    positive); no evidence asked. ``of_models``: the metrics are two models' (not means over seeds),
    as the reasons then say."""
    reasons, checks, evidence = [], {}, []
    for c in criteria(gate, reference_metrics):
        cand, base = candidate.get(c.metric), reference_metrics.get(c.metric)
        missing = _missing(c, cand, base, reference)
        if missing:
            checks[c.metric] = False
            reasons.append(missing)
            continue
        gain = _gain(c, cast(float, cand), cast(float, base))  # not None: _missing said so
        tested = gain > c.bound
        passed = tested and (better(gain) or not gate.better_means)
        e = Evidence(
            c,
            cast(float, cand),
            cast(float, base),
            gain,
            passed,
            tested,
            gate.better_means,
            of_models=of_models,
        )
        checks[c.metric] = e.passed
        evidence.append(e)
        reasons.append(e.reason(reference, None))
    return Decision(bool(checks) and all(checks.values()), tuple(reasons), checks, tuple(evidence))


def welch_evidence(
    c: Criterion,
    cand: Sequence[float],
    base: Sequence[float],
    var_sample: float,
    confidence: float,
    better_means: bool = True,
) -> Evidence:
    """The one-sided Welch-Satterthwaite test of ``gain > c.bound`` (the module docstring)."""
    cand_a, base_a = np.asarray(cand, dtype=np.float64), np.asarray(base, dtype=np.float64)
    n, m = cand_a.size, base_a.size
    if n < 1 or m < 1:
        raise ValueError(f"the gate's evidence needs results of both models, got {n} and {m}")
    gain = _gain(c, float(cand_a.mean()), float(base_a.mean()))
    # A side with one result is one model (a single imported checkpoint): no seed variance; its
    # sampling noise is all in var_sample (the resampling does not take it out).
    vc = cand_a.var(ddof=1) / n if n > 1 else 0.0
    vb = base_a.var(ddof=1) / m if m > 1 else 0.0
    var = vc + vb + var_sample
    if var <= 0.0:  # nothing varies: the observed gain is the gain
        df, p = math.inf, 0.0 if gain > c.bound else 1.0
        lower = gain
    else:
        seed_terms = (vc**2 / (n - 1) if n > 1 else 0.0) + (vb**2 / (m - 1) if m > 1 else 0.0)
        df = float(var**2 / seed_terms) if seed_terms > 0 else math.inf
        se = math.sqrt(var)
        p = float(stats.t.sf((gain - c.bound) / se, df))
        lower = gain - float(stats.t.ppf(confidence, df)) * se
    tested = bool(p < 1.0 - confidence)
    return Evidence(
        criterion=c,
        candidate=float(cand_a.mean()),
        reference=float(base_a.mean()),
        gain=gain,
        passed=tested and (better(gain) or not better_means),
        tested=tested,
        better_means=better_means,
        seeds=(n, m),
        lower=lower,
        p_value=p,
        df=df,
        se_seed=math.sqrt(vc + vb),
        se_sample=math.sqrt(var_sample),
    )


def _counts(sets: Sequence[SampleSet], gate: GateConfig) -> Counts:
    first = sets[0]
    sizes = {k: len(v) for k, v in first.ood_scores.items()}
    return Counts.draw(gate.seed, gate.samples, len(first.labels), sizes)


@dataclass(frozen=True)
class Resampled:
    """One model's metric under the resamples: the mean over its seeds per resample, and the part
    of that mean's variance that is each seed's own (``sum_s var(m_s) / n^2``)."""

    mean: np.ndarray
    own: float


def _resampled(sets: Sequence[SampleSet], crits: Sequence[Criterion], counts: Counts) -> dict[str, Resampled]:
    """Per criterion: the metric of each resample for every seed of one model."""
    per_seed = [gate_metrics(s.logits, s.labels, s.id_scores, s.ood_scores, s.groups, counts) for s in sets]
    n = len(sets)
    out = {}
    for c in crits:
        values = np.array([m[c.metric] for m in per_seed])  # (seeds, resamples)
        # one model (a single imported checkpoint): no seed variance holds its sampling noise
        own = float(values.var(axis=1, ddof=1).sum()) / n**2 if n > 1 else 0.0
        out[c.metric] = Resampled(values.mean(axis=0), own)
    return out


def sample_variances(
    cand: Sequence[SampleSet], base: Sequence[SampleSet], crits: Sequence[Criterion], gate: GateConfig
) -> dict[str, float]:
    """Per criterion: the variance of the gain that the test and OOD images all seeds share add to
    the seed variance (paired bootstrap resamples, every model held fixed, the same resamples for all
    seeds and both models)."""
    counts = _counts(base, gate)
    return _variances(_resampled(cand, crits, counts), _resampled(base, crits, counts))


def _variances(cand: Mapping[str, Resampled], base: Mapping[str, Resampled]) -> dict[str, float]:
    """The bootstrap variance of the gain less each seed's own sampling variance: that part already
    varies from seed to seed, so the seed variance counts it; what remains is the images' effect
    common to the seeds of a model (its difficulty for the loss), which no seed shows."""
    return {
        k: max(0.0, float(np.var(cand[k].mean - base[k].mean, ddof=1)) - cand[k].own - base[k].own)
        for k in cand
    }


def _means(ms: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m.get(k, math.nan) for m in ms])) for k in _keys(ms)}


def decide(
    candidate: Sequence[Mapping[str, float]],
    baseline: Sequence[Mapping[str, float]],
    gate: GateConfig,
    candidate_samples: Sequence[SampleSet] | None = None,
    baseline_samples: Sequence[SampleSet] | None = None,
    reference: str = "baseline",
) -> Decision:
    """The gate's decision from per-seed metrics (one mapping per seed) and, with
    ``gate.confidence``, the per-sample arrays of every seed; every reason is returned.

    ``gate.confidence: null`` compares the means.
    """
    if gate.confidence is None:
        return compare_means(_means(candidate), _means(baseline), gate, reference)
    if not candidate_samples or not baseline_samples:
        raise ValueError("gate.confidence is set but the per-sample test arrays are missing")
    crits = criteria(gate, _means(baseline))
    var_sample = sample_variances(candidate_samples, baseline_samples, crits, gate)
    return _with_evidence(candidate, baseline, gate, crits, var_sample, reference)


def decide_all(
    metrics_by_loss: Mapping[str, Sequence[Mapping[str, float]]],
    baseline_id: str,
    gate: GateConfig,
    samples_by_loss: Mapping[str, Sequence[SampleSet]] | None = None,
    chosen: Mapping[str, int] | None = None,
    names: Mapping[str, str] | None = None,
) -> dict[str, Decision]:
    """Every candidate against ``baseline_id``, then Holm's step-down over them (the module
    docstring). ``metrics_by_loss`` and ``samples_by_loss``: per loss, one entry per seed;
    ``chosen``: per loss, the position of its deployable model in those lists (``gate.evidence:
    models``; default the first); ``names``: how the reasons name each loss's deployable model
    (``softmax seed 0``). The resamples are drawn and the baseline's resampled metrics computed
    once, not once per candidate."""
    chosen = {k: (chosen or {}).get(k, 0) for k in metrics_by_loss}
    names = {k: (names or {}).get(k, k) for k in metrics_by_loss}
    candidates = [k for k in metrics_by_loss if k != baseline_id]
    samples = samples_by_loss or {}
    if gate.evidence == "models":
        point = {k: metrics_by_loss[k][chosen[k]] for k in metrics_by_loss}
        if gate.confidence is None:
            return {
                k: replace(
                    compare_means(point[k], point[baseline_id], gate, of_models=True),
                    compared=f"{names[k]} against {names[baseline_id]}",
                )
                for k in candidates
            }
        if not all(samples.get(k) for k in [baseline_id, *candidates]):
            raise ValueError("gate.confidence is set but the per-sample test arrays are missing")
        base = samples[baseline_id][chosen[baseline_id]]
        crits = criteria(gate, point[baseline_id])
        counts = _counts([base], gate)
        base_resampled = gate_metrics(
            base.logits, base.labels, base.id_scores, base.ood_scores, base.groups, counts
        )
        out = {}
        for k in candidates:
            d = decide_models(
                point[k],
                point[baseline_id],
                samples[k][chosen[k]],
                base,
                gate,
                crits=crits,
                counts=counts,
                reference_resampled=base_resampled,
                compared=f"{names[k]} against {names[baseline_id]}",
            )
            out[k] = replace(d, seed_level=_seed_level(k, metrics_by_loss, baseline_id, gate, samples))
        return with_holm(out, gate)
    if gate.confidence is None or not all(samples.get(k) for k in [baseline_id, *candidates]):
        baseline = metrics_by_loss[baseline_id]
        out = {
            k: decide(metrics_by_loss[k], baseline, gate, samples.get(k), samples.get(baseline_id))
            for k in candidates
        }
        return out if gate.confidence is None else with_holm(out, gate)
    return with_holm(_seed_decisions(metrics_by_loss, baseline_id, gate, samples, candidates), gate)


def _seed_decisions(
    metrics_by_loss: Mapping[str, Sequence[Mapping[str, float]]],
    baseline_id: str,
    gate: GateConfig,
    samples: Mapping[str, Sequence[SampleSet]],
    candidates: Sequence[str],
) -> dict[str, Decision]:
    """The seed-level evidence (Welch over seeds plus the shared images' bootstrap) of every
    candidate, the baseline's resamples computed once."""
    baseline = metrics_by_loss[baseline_id]
    crits = criteria(gate, _means(baseline))
    counts = _counts(samples[baseline_id], gate)
    base_resampled = _resampled(samples[baseline_id], crits, counts)
    out = {}
    for k in candidates:
        var_sample = _variances(_resampled(samples[k], crits, counts), base_resampled)
        out[k] = _with_evidence(metrics_by_loss[k], baseline, gate, crits, var_sample, "baseline")
    return out


def _seed_level(
    loss_id: str,
    metrics_by_loss: Mapping[str, Sequence[Mapping[str, float]]],
    baseline_id: str,
    gate: GateConfig,
    samples: Mapping[str, Sequence[SampleSet]],
) -> tuple[str, ...]:
    """The seed-level evidence of one candidate as lines, with the number of seeds each criterion's
    observed gain would need (:func:`seeds_needed`): information beside a model-level decision."""
    n, m = len(metrics_by_loss[loss_id]), len(metrics_by_loss[baseline_id])
    if n < 2 or m < 2:
        return (f"seed-level: not computed ({n} vs {m} seeds; it needs 2 or more of each)",)
    d = _seed_decisions(metrics_by_loss, baseline_id, gate, samples, [loss_id])[loss_id]
    lines, needs = [], []
    for e, r in zip(d.evidence, d.reasons):
        cand = [x.get(e.criterion.metric, math.nan) for x in metrics_by_loss[loss_id]]
        base = [x.get(e.criterion.metric, math.nan) for x in metrics_by_loss[baseline_id]]
        need = seeds_needed(
            e.gain,
            e.criterion.bound,
            float(np.var(cand, ddof=1)),
            float(np.var(base, ddof=1)),
            (e.se_sample or 0.0) ** 2,
            gate.confidence or 0.95,
        )
        needs.append(need)
        lines.append(f"seed-level: {r}; {_need_text(need)}")
    if needs and all(x is not None for x in needs):
        lines.append(
            f"seed-level: the recipe would need about {max(cast(list[int], needs))} seeds per loss to "
            "show all three"
        )
    else:
        lines.append("seed-level: no number of seeds would show all three at the observed gains")
    return tuple(lines)


def _need_text(need: int | None) -> str:
    if need is None:
        return "no number of seeds would show it at this gain"
    return f"{need} seeds would show it in {POWER:.0%} of runs at this gain and seed spread"


POWER = 0.8  # the power at which seeds_needed counts seeds


def seeds_needed(
    gain: float,
    bound: float,
    var_candidate: float,
    var_baseline: float,
    var_sample: float,
    confidence: float,
    power: float = POWER,
    most: int = 1000,
) -> int | None:
    """The smallest number of seeds per loss at which the seed-level test of ``gain > bound`` (Welch
    plus the shared images' variance ``var_sample``, which more seeds do not shrink) would pass in
    ``power`` of runs, were ``gain`` and the per-seed variances the truth: the noncentral t's
    ``P(T_{df, ncp} > t_{df, confidence}) >= power`` with ``ncp = (gain - bound) / sqrt((var_c +
    var_b) / N + var_sample)`` and Welch's ``df = (var_c + var_b)^2 (N - 1) / (var_c^2 + var_b^2)``.
    None when ``gain <= bound`` or ``most`` seeds are not enough."""
    if not gain > bound or not all(math.isfinite(v) for v in (gain, var_candidate, var_baseline, var_sample)):
        return None
    spread = var_candidate + var_baseline

    def achieved(n: int) -> float:
        var = spread / n + var_sample
        if var <= 0.0:
            return 1.0
        ncp = (gain - bound) / math.sqrt(var)
        squares = var_candidate**2 + var_baseline**2
        df = spread**2 * (n - 1) / squares if squares > 0 else math.inf
        if math.isinf(df):
            return float(stats.norm.sf(stats.norm.ppf(confidence) - ncp))
        return float(stats.nct.sf(stats.t.ppf(confidence, df), df, ncp))

    if achieved(most) < power:
        return None
    lo, hi = 2, most  # achieved(hi) >= power; find the smallest such n
    if achieved(lo) >= power:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if achieved(mid) >= power else (mid, hi)
    return hi


def decide_models(
    candidate: Mapping[str, float],
    reference_metrics: Mapping[str, float],
    candidate_samples: SampleSet,
    reference_samples: SampleSet,
    gate: GateConfig,
    reference: str = "baseline",
    crits: Sequence[Criterion] | None = None,
    counts: Counts | None = None,
    reference_resampled: Mapping[str, np.ndarray] | None = None,
    compared: str = "",
) -> Decision:
    """Two models scored on the same images (the module docstring's ``models`` evidence):
    ``candidate`` and ``reference_metrics`` are each model's metrics on them, the samples its
    per-image arrays. ``counts`` and ``reference_resampled`` may be passed to share them between
    candidates; ``compared`` names the two models for the reasons."""
    assert gate.confidence is not None
    c_s, r_s = candidate_samples, reference_samples
    if c_s.labels.shape != r_s.labels.shape or not np.array_equal(c_s.labels, r_s.labels):
        raise ValueError("model-level evidence needs both models scored on the same test images")
    if {k: v.size for k, v in c_s.ood_scores.items()} != {k: v.size for k, v in r_s.ood_scores.items()}:
        raise ValueError("model-level evidence needs both models scored on the same OOD images")
    crits = crits if crits is not None else criteria(gate, reference_metrics)
    counts = counts if counts is not None else _counts([r_s], gate)
    if reference_resampled is None:
        reference_resampled = gate_metrics(
            r_s.logits, r_s.labels, r_s.id_scores, r_s.ood_scores, r_s.groups, counts
        )
    cand_resampled = gate_metrics(c_s.logits, c_s.labels, c_s.id_scores, c_s.ood_scores, c_s.groups, counts)
    n = int(c_s.labels.size)
    ood = sum(v.size for v in c_s.ood_scores.values())
    images = f"{n:,} test and {ood:,} OOD images"
    reasons, checks, evidence = [], {}, []
    for c in crits:
        cand, base = candidate.get(c.metric), reference_metrics.get(c.metric)
        missing = _missing(c, cand, base, reference)
        if missing:
            checks[c.metric] = False
            reasons.append(missing)
            continue
        gain = _gain(c, cast(float, cand), cast(float, base))  # not None: _missing said so
        if c.metric == "test/accuracy":
            n10, n01 = paired.discordant(
                c_s.logits.argmax(1) == c_s.labels, r_s.logits.argmax(1) == r_s.labels
            )
            test = paired.accuracy_test(n10, n01, n, c.bound, gate.confidence)
            detail = f"{n10} vs {n01} discordant of {n:,} test images"
        else:
            sign = 1.0 if c.higher_is_better else -1.0
            resampled = sign * (cand_resampled[c.metric] - reference_resampled[c.metric])
            test = paired.bootstrap_test(gain, resampled, c.bound, gate.confidence)
            detail = f"{gate.samples} resamples of the same {images}, by set"
        tested = bool(test.p_value < 1.0 - gate.confidence)
        e = Evidence(
            criterion=c,
            candidate=float(cast(float, cand)),
            reference=float(cast(float, base)),
            gain=gain,
            passed=tested and (better(gain) or not gate.better_means),
            tested=tested,
            better_means=gate.better_means,
            lower=test.lower,
            p_value=test.p_value,
            test_name=test.name,
            detail=detail,
        )
        checks[c.metric] = e.passed
        evidence.append(e)
        reasons.append(e.reason(reference, gate.confidence))
    head = f"{compared}, on the same {images}" if compared else f"on the same {images}"
    return Decision(all(checks.values()), tuple(reasons), checks, tuple(evidence), compared=head)


def samples_from_probabilities(
    probabilities: np.ndarray,
    labels: np.ndarray,
    id_scores: np.ndarray,
    ood_scores: Mapping[str, np.ndarray],
    groups: Mapping[str, str],
) -> SampleSet:
    """A model known only by its outputs (a registered model: calibrated probabilities and OOD
    scores) as the gate's per-image arrays: its logits are ``log p``, whose softmax is ``p``."""
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(probabilities, dtype=np.float64))
    return SampleSet(logits, np.asarray(labels), np.asarray(id_scores), dict(ood_scores), dict(groups))


def point_metrics(s: SampleSet) -> dict[str, float]:
    """One model's gate metrics on its images: every count 1 in :func:`oodgate.deciding.resampling.gate_metrics`,
    which equals :mod:`oodgate.measuring.metrics` on the arrays."""
    ones = Counts(
        np.ones((1, s.labels.size), np.int32),
        {k: np.ones((1, v.size), np.int32) for k, v in s.ood_scores.items()},
    )
    return {
        k: float(v[0])
        for k, v in gate_metrics(s.logits, s.labels, s.id_scores, s.ood_scores, s.groups, ones).items()
    }


def challenge(
    candidate: SampleSet, incumbent: SampleSet, gate: GateConfig, reference: str, compared: str = ""
) -> Decision:
    """The gate's rule and evidence on two models scored on the same images (a promoted candidate
    against the champion): model-level evidence, or the point estimates with ``gate.confidence:
    null``. Both models' metrics are computed here, the same way, from their arrays."""
    c, r = point_metrics(candidate), point_metrics(incumbent)
    if gate.confidence is None:
        d = compare_means(c, r, gate, reference, of_models=True)
        n, ood = candidate.labels.size, sum(v.size for v in candidate.ood_scores.values())
        return replace(d, compared=f"{compared}, on the same {n:,} test and {ood:,} OOD images")
    return decide_models(c, r, candidate, incumbent, gate, reference=reference, compared=compared)


def candidate_p_value(d: Decision) -> float:
    """A candidate's p-value for the run: the largest of its criteria's (the intersection-union
    test), 1 when a criterion is missing or, with ``better_means``, a point estimate is not better."""
    if not d.evidence or len(d.evidence) != len(d.checks):
        return 1.0
    if any(e.better_means and not better(e.gain) for e in d.evidence):
        return 1.0
    return max(e.p_value if e.p_value is not None else 1.0 for e in d.evidence)


def with_holm(decisions: Mapping[str, Decision], gate: GateConfig) -> dict[str, Decision]:
    """Holm's step-down over the candidates at ``1 - gate.confidence``: a candidate is promoted when
    its adjusted p-value is below it (which implies that every criterion passed). With more than one
    candidate, a last reason says so."""
    assert gate.confidence is not None
    alpha = 1.0 - gate.confidence
    p = {k: candidate_p_value(d) for k, d in decisions.items()}
    adjusted = paired.holm(p)
    out = {}
    for k, d in decisions.items():
        promote = adjusted[k] < alpha
        reasons = d.reasons
        if len(decisions) > 1:
            worse = [e.criterion.label for e in d.evidence if e.better_means and not better(e.gain)]
            why = (
                f"{', '.join(worse)} not better than the baseline's, so p = 1"
                if worse
                else f"p = {p[k]:.3g}, the largest of its criteria's"
            )
            verdict = "shown" if promote else "not shown"
            reasons = (
                *reasons,
                f"for the run ({why}): Holm-adjusted over {len(decisions)} candidates p = {adjusted[k]:.3g}, "
                f"{verdict} with {gate.confidence:.0%} confidence for the whole run",
            )
        out[k] = replace(d, promote=promote, reasons=reasons, p_value=p[k], adjusted=adjusted[k])
    return out


def _with_evidence(
    candidate: Sequence[Mapping[str, float]],
    baseline: Sequence[Mapping[str, float]],
    gate: GateConfig,
    crits: Sequence[Criterion],
    var_sample: Mapping[str, float],
    reference: str,
) -> Decision:
    assert gate.confidence is not None
    reasons, checks, evidence = [], {}, []
    for c in crits:
        cand = [m.get(c.metric, math.nan) for m in candidate]
        base = [m.get(c.metric, math.nan) for m in baseline]
        missing = _missing(c, float(np.mean(cand)), float(np.mean(base)), reference)
        if missing:
            checks[c.metric] = False
            reasons.append(missing)
            continue
        e = welch_evidence(c, cand, base, var_sample[c.metric], gate.confidence, gate.better_means)
        checks[c.metric] = e.passed
        evidence.append(e)
        reasons.append(e.reason(reference, gate.confidence))
    return Decision(all(checks.values()), tuple(reasons), checks, tuple(evidence))


def _keys(ms: Sequence[Mapping[str, float]]) -> set[str]:
    return {k for m in ms for k in m}


@dataclass(frozen=True)
class SeedChoice:
    """Which seed's model stands for its loss (the deployable model), and why."""

    seed: int
    why: str


def choose_seed(validation: Mapping[int, Mapping[str, float]]) -> SeedChoice:
    """The deployable model of a loss, chosen on validation data only: the lowest calibrated
    validation NLL (``val/nll``), a continuous criterion that seeds do not tie on; then the lowest
    calibrated validation ECE (``val/ece``); then the lowest seed. A missing figure counts as the
    worst. Returns the seed and the reason, with every seed's figures."""
    if not validation:
        raise ValueError("choose_seed needs the validation metrics of at least one seed")

    def figure(seed: int, key: str) -> float:
        v = validation[seed].get(key, math.inf)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf

    best = min(validation, key=lambda s: (figure(s, "val/nll"), figure(s, "val/ece"), s))
    figures = ", ".join(
        f"seed {s}: {figure(s, 'val/nll'):.4f} / {figure(s, 'val/ece'):.4f}" for s in sorted(validation)
    )
    return SeedChoice(
        best,
        "chosen on validation data: the lowest calibrated validation NLL, then ECE, then the lowest seed "
        f"(NLL / ECE: {figures})",
    )


def rank_key(m: Mapping[str, float]) -> tuple[float, float, float]:
    """Order promoted candidates best-first: lowest mean FPR95, then lowest ECE, then highest accuracy."""
    return (
        m.get("ood/mean/fpr95", math.inf),
        m.get("test/ece", math.inf),
        -m.get("test/accuracy", -math.inf),
    )
