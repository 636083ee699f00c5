"""The promotion gate: promote a candidate only with evidence that it beats the reference.

The rule (``gate`` in ``params.yaml``): against the reference (the SoftMax baseline),

(a) with ``gate.better_means`` (the default), the candidate's means over seeds are better on all three
    criteria: higher test accuracy, lower calibrated ECE, lower FPR95 (over all OOD sets, per group or
    on the worst set: ``gate.fpr95.over``) -- the rule "accuracy, ECE and FPR95 all beat SoftMax",
    literally; and
(b) each criterion passes its own test at ``gate.confidence``: a ``superior`` criterion (FPR95 by
    default) must be better by more than its margin, a ``noninferior`` one (accuracy, tolerance 0.005,
    and ECE, tolerance 0.01, by default) must not be worse by more than its margin. Both are one-sided
    tests of the gain: ``gain > bound`` with ``bound = +margin`` (superior) or ``-margin``
    (non-inferior), i.e. the one-sided lower confidence bound of the gain is above ``bound``.

Why the two forms: the methods this gate exists for claim far better OOD detection at equal
accuracy, and after temperature scaling every loss is about equally calibrated, so asking for a
significant improvement in accuracy and ECE too would almost never promote them, at any scale;
asking that they are not significantly worse keeps the guarantee that matters. A missing or NaN
metric never promotes.

The evidence for one criterion. Let ``c_1..c_n`` be the candidate's metric on its ``n`` seeds and
``b_1..b_m`` the baseline's, and ``gain = mean(c) - mean(b)`` (sign flipped where lower is better).
Two sources of noise make ``gain`` uncertain:

- the training seed: ``v_seed = s_c^2 / n + s_b^2 / m`` with the sample variances over seeds;
- the finite test and OOD samples, which every seed shares: ``v_sample``, the variance of ``gain``
  over ``gate.samples`` paired bootstrap resamples of the test images and of each OOD set, the
  trained models held fixed (:mod:`oodgate.resampling`).

``se = sqrt(v_seed + v_sample)``; the degrees of freedom are Welch-Satterthwaite's,
``df = se^4 / (s_c^4 / (n^2 (n-1)) + s_b^4 / (m^2 (m-1)))`` (``v_sample`` counted as known). The
one-sided test of ``gain <= bound`` has ``p = P(T_df > (gain - bound) / se)``; the criterion holds
when ``p < 1 - confidence``, i.e. when the one-sided lower confidence bound
``gain - t_{df, confidence} * se`` exceeds the bound.

Why this procedure and not a bootstrap over seeds: with the 3 seeds a CPU run affords, resampling
seeds sees at most 10 distinct seed sets and underestimates the seed variance by ``(n - 1) / n``, and
a percentile interval over them has none of the t distribution's tails, so it promotes noise too
often; a paired permutation or sign test over 3 seeds cannot reach a p-value below 1/8. Welch's
statistic is exact for normal seed effects, and adding ``v_sample`` covers the images all seeds
share (the per-model part of the sampling noise is counted twice, which errs towards rejecting).
Requiring every criterion is an intersection-union test: the probability of promoting a candidate
for which any null hypothesis holds (FPR95 not better by the margin, or accuracy or ECE worse by more
than the tolerance) is at most ``1 - confidence`` without a multiplicity correction.

With ``gate.confidence: null`` the gate compares the means over seeds only (no evidence; for quick
trials and a single seed): each gain must exceed its bound (and be positive with ``better_means``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from oodgate.config import CriterionConfig, GateConfig
from oodgate.metrics import OOD_GROUPS
from oodgate.resampling import Counts, gate_metrics


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

    def reason(self, reference: str, confidence: float | None) -> str:
        """One line, no semicolons (reasons are joined with them): the means, the gain, the test
        and its verdict, and whether the mean is better."""
        c = self.criterion
        head = f"{c.label} {self.candidate:.4f} vs {reference} {self.reference:.4f}: gain {self.gain:+.4f}"
        rule = f"{c.rule()}, bound {c.bound:+.4f}"
        if self.p_value is None:
            test = f"{'passes' if self.tested else 'fails'} {rule}"
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
            test += (
                f", and the mean is better than the {reference}'s"
                if better(self.gain)
                else f", but the mean is not better than the {reference}'s"
            )
        return f"{head}, {test}"

    def metrics(self) -> dict[str, float]:
        """For MLflow: ``gate/<metric>/{gain,bound,lower,p_value}``."""
        out = {"gain": self.gain, "bound": self.criterion.bound, "lower": self.lower, "p_value": self.p_value}
        return {f"gate/{self.criterion.metric}/{k}": v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]
    checks: Mapping[str, bool] = field(default_factory=dict)
    evidence: tuple[Evidence, ...] = ()

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "REJECT"
        return verdict + ": " + "; ".join(self.reasons)

    def metrics(self) -> dict[str, float]:
        return {k: v for e in self.evidence for k, v in e.metrics().items()}

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
) -> Decision:
    """Promote if every criterion's mean gain exceeds its bound (and, with ``better_means``, is
    positive); no evidence asked."""
    reasons, checks, evidence = [], {}, []
    for c in criteria(gate, reference_metrics):
        cand, base = candidate.get(c.metric), reference_metrics.get(c.metric)
        missing = _missing(c, cand, base, reference)
        if missing:
            checks[c.metric] = False
            reasons.append(missing)
            continue
        gain = _gain(c, cand, base)
        tested = gain > c.bound
        passed = tested and (better(gain) or not gate.better_means)
        e = Evidence(c, cand, base, gain, passed, tested, gate.better_means)
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
) -> dict[str, Decision]:
    """:func:`decide` for every candidate against ``baseline_id``: the resamples are drawn and the
    baseline's resampled metrics computed once, not once per candidate."""
    baseline = metrics_by_loss[baseline_id]
    candidates = [k for k in metrics_by_loss if k != baseline_id]
    samples = samples_by_loss or {}
    if gate.confidence is None or not all(samples.get(k) for k in [baseline_id, *candidates]):
        return {
            k: decide(metrics_by_loss[k], baseline, gate, samples.get(k), samples.get(baseline_id))
            for k in candidates
        }
    crits = criteria(gate, _means(baseline))
    counts = _counts(samples[baseline_id], gate)
    base_resampled = _resampled(samples[baseline_id], crits, counts)
    out = {}
    for k in candidates:
        var_sample = _variances(_resampled(samples[k], crits, counts), base_resampled)
        out[k] = _with_evidence(metrics_by_loss[k], baseline, gate, crits, var_sample, "baseline")
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


def rank_key(m: Mapping[str, float]) -> tuple[float, float, float]:
    """Order promoted candidates best-first: lowest mean FPR95, then lowest ECE, then highest accuracy."""
    return (
        m.get("ood/mean/fpr95", math.inf),
        m.get("test/ece", math.inf),
        -m.get("test/accuracy", -math.inf),
    )
