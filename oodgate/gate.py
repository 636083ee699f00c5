"""The promotion gate: promote a candidate only with evidence that it beats the reference.

A candidate is promoted when, against the reference (the SoftMax baseline), its test accuracy is
higher, its calibrated ECE lower and its FPR95 lower (over all OOD sets, per group or on the worst
set: ``gate.fpr95``), each by more than its margin from ``gate`` in ``params.yaml``, and each with
confidence ``gate.confidence``. A missing or NaN metric never promotes.

The evidence for one criterion. Let ``c_1..c_n`` be the candidate's metric on its ``n`` seeds and
``b_1..b_m`` the baseline's, and ``gain = mean(c) - mean(b)`` (sign flipped where lower is better).
Two sources of noise make ``gain`` uncertain:

- the training seed: ``v_seed = s_c^2 / n + s_b^2 / m`` with the sample variances over seeds;
- the finite test and OOD samples, which every seed shares: ``v_sample``, the variance of ``gain``
  over ``gate.samples`` paired bootstrap resamples of the test images and of each OOD set, the
  trained models held fixed (:mod:`oodgate.resampling`).

``se = sqrt(v_seed + v_sample)``; the degrees of freedom are Welch-Satterthwaite's,
``df = se^4 / (s_c^4 / (n^2 (n-1)) + s_b^4 / (m^2 (m-1)))`` (``v_sample`` counted as known). The
one-sided test of ``gain <= margin`` has ``p = P(T_df > (gain - margin) / se)``; the criterion holds
when ``p < 1 - confidence``, i.e. when the one-sided lower confidence bound
``gain - t_{df, confidence} * se`` exceeds the margin.

Why this procedure and not a bootstrap over seeds: with the 3 seeds a CPU run affords, resampling
seeds sees at most 10 distinct seed sets and underestimates the seed variance by ``(n - 1) / n``, and
a percentile interval over them has none of the t distribution's tails, so it promotes noise too
often; a paired permutation or sign test over 3 seeds cannot reach a p-value below 1/8. Welch's
statistic is exact for normal seed effects, and adding ``v_sample`` covers the images all seeds
share (the per-model part of the sampling noise is counted twice, which errs towards rejecting).
Requiring all criteria is an intersection-union test: the promotion's false-positive rate is at
most ``1 - confidence`` without any multiplicity correction.

With ``gate.confidence: null`` the gate compares the means over seeds only (no evidence; for quick
trials and a single seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from oodgate.config import GateConfig
from oodgate.metrics import OOD_GROUPS
from oodgate.resampling import Counts, gate_metrics


@dataclass(frozen=True)
class Criterion:
    metric: str
    higher_is_better: bool
    margin_key: str
    label: str


ACCURACY = Criterion("test/accuracy", True, "accuracy_margin", "accuracy")
ECE = Criterion("test/ece", False, "ece_margin", "calibrated ECE")
FPR95_LABELS = {
    "mean": "mean FPR95",
    "near": "near-OOD FPR95",
    "far": "far-OOD FPR95",
    "worst": "worst-set FPR95",
}


def criteria(gate: GateConfig, reference: Mapping[str, float]) -> tuple[Criterion, ...]:
    """The criteria of ``gate``: accuracy, ECE and the FPR95 rule of ``gate.fpr95``; under the
    ``groups`` rule, one FPR95 criterion per OOD group in the ``reference`` metrics."""
    groups = [g for g in OOD_GROUPS if f"ood/{g}/fpr95" in reference]
    keys = {"mean": ["mean"], "worst": ["worst"], "groups": groups}[gate.fpr95]
    if not keys:
        raise ValueError("gate.fpr95='groups' needs at least one OOD set with a group (near or far)")
    fpr = [Criterion(f"ood/{k}/fpr95", False, "fpr95_margin", FPR95_LABELS[k]) for k in keys]
    return (ACCURACY, ECE, *fpr)


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
    """One criterion's comparison: means over seeds, the gain, and (with a confidence) its test."""

    criterion: Criterion
    candidate: float
    reference: float
    gain: float  # > 0: the candidate is better
    margin: float
    passed: bool
    seeds: tuple[int, int] = (1, 1)
    lower: float | None = None  # one-sided lower confidence bound of the gain
    p_value: float | None = None
    df: float | None = None
    se_seed: float | None = None
    se_sample: float | None = None

    def reason(self, reference: str, confidence: float | None) -> str:
        c = self.criterion
        head = f"{c.label} {self.candidate:.4f} vs {reference} {self.reference:.4f}"
        word = "higher" if c.higher_is_better else "lower"
        if self.p_value is None:
            verdict = (
                f"{word} by {self.gain:.4f} > margin {self.margin}"
                if self.passed
                else (f"not {word} by more than margin {self.margin}")
            )
            return f"{head}: {verdict}"
        n, m = self.seeds
        bound = f"{confidence:.0%} lower bound {self.lower:+.4f}"
        detail = f"gain {self.gain:+.4f}, {bound}, p = {self.p_value:.3g}, {n} vs {m} seeds"
        verdict = (
            f"{word} with {confidence:.0%} confidence (lower bound > margin {self.margin})"
            if self.passed
            else f"not shown {word} by more than margin {self.margin} (p >= {1 - confidence:.2g})"
        )
        return f"{head}: {detail}: {verdict}"

    def metrics(self) -> dict[str, float]:
        """For MLflow: ``gate/<metric>/{gain,lower,p_value}``."""
        out = {"gain": self.gain, "lower": self.lower, "p_value": self.p_value}
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


def _missing(c: Criterion, cand: float | None, base: float | None, reference: str) -> str | None:
    if cand is None or base is None or not math.isfinite(cand) or not math.isfinite(base):
        return f"{c.label}: missing or NaN ({c.metric}: candidate {cand}, {reference} {base})"
    return None


def _gain(c: Criterion, cand: float, base: float) -> float:
    return cand - base if c.higher_is_better else base - cand


def compare_means(
    candidate: Mapping[str, float],
    reference_metrics: Mapping[str, float],
    gate: GateConfig,
    reference: str = "baseline",
) -> Decision:
    """Promote if every criterion's mean improves by more than its margin (no evidence asked)."""
    reasons, checks, evidence = [], {}, []
    for c in criteria(gate, reference_metrics):
        cand, base = candidate.get(c.metric), reference_metrics.get(c.metric)
        missing = _missing(c, cand, base, reference)
        if missing:
            checks[c.metric] = False
            reasons.append(missing)
            continue
        margin = getattr(gate, c.margin_key)
        e = Evidence(c, cand, base, _gain(c, cand, base), margin, _gain(c, cand, base) > margin)
        checks[c.metric] = e.passed
        evidence.append(e)
        reasons.append(e.reason(reference, None))
    return Decision(bool(checks) and all(checks.values()), tuple(reasons), checks, tuple(evidence))


def welch_evidence(
    c: Criterion,
    cand: Sequence[float],
    base: Sequence[float],
    var_sample: float,
    margin: float,
    confidence: float,
) -> Evidence:
    """The one-sided Welch-Satterthwaite test of ``gain > margin`` (the module docstring)."""
    cand_a, base_a = np.asarray(cand, dtype=np.float64), np.asarray(base, dtype=np.float64)
    n, m = cand_a.size, base_a.size
    if n < 2 or m < 2:
        raise ValueError(f"the gate's evidence needs at least 2 seeds per model, got {n} and {m}")
    gain = _gain(c, float(cand_a.mean()), float(base_a.mean()))
    vc, vb = cand_a.var(ddof=1) / n, base_a.var(ddof=1) / m
    var = vc + vb + var_sample
    if var <= 0.0:  # nothing varies: the observed gain is the gain
        df, p = math.inf, 0.0 if gain > margin else 1.0
        lower = gain
    else:
        seed_terms = vc**2 / (n - 1) + vb**2 / (m - 1)
        df = float(var**2 / seed_terms) if seed_terms > 0 else math.inf
        se = math.sqrt(var)
        p = float(stats.t.sf((gain - margin) / se, df))
        lower = gain - float(stats.t.ppf(confidence, df)) * se
    return Evidence(
        criterion=c,
        candidate=float(cand_a.mean()),
        reference=float(base_a.mean()),
        gain=gain,
        margin=margin,
        passed=bool(p < 1.0 - confidence),
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


def _resampled_means(
    sets: Sequence[SampleSet], crits: Sequence[Criterion], counts: Counts
) -> dict[str, np.ndarray]:
    """Per criterion: the metric of each resample, averaged over the seeds of one model."""
    per_seed = [gate_metrics(s.logits, s.labels, s.id_scores, s.ood_scores, s.groups, counts) for s in sets]
    return {c.metric: np.mean([m[c.metric] for m in per_seed], axis=0) for c in crits}


def sample_variances(
    cand: Sequence[SampleSet], base: Sequence[SampleSet], crits: Sequence[Criterion], gate: GateConfig
) -> dict[str, float]:
    """Per criterion: the variance of the gain over paired bootstrap resamples of the test images
    and OOD sets, every model held fixed (the same resamples for all seeds and both models)."""
    counts = _counts(base, gate)
    return _variances(_resampled_means(cand, crits, counts), _resampled_means(base, crits, counts))


def _variances(cand: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.var(cand[k] - base[k], ddof=1)) for k in cand}


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
    base_resampled = _resampled_means(samples[baseline_id], crits, counts)
    out = {}
    for k in candidates:
        var_sample = _variances(_resampled_means(samples[k], crits, counts), base_resampled)
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
        e = welch_evidence(c, cand, base, var_sample[c.metric], getattr(gate, c.margin_key), gate.confidence)
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
