"""Paired tests of two models scored on the same images, and Holm's step-down over candidates.

Accuracy, one image at a time, is a pair of right/wrong answers. Only the discordant images carry
the difference: ``n10`` (the candidate right, the reference wrong) and ``n01`` (the reverse), of
``n`` images; the gain in accuracy is ``(n10 - n01) / n``. One-sided tests of ``gain > bound``:

- ``bound == 0``: McNemar's exact test, conditional on the ``n10 + n01`` discordant images
  (``n10 ~ Binomial(n10 + n01, 1/2)`` when the two are equally accurate), with the Clopper-Pearson
  bound of ``pi = n10 / (n10 + n01)`` as the bound of the gain, ``(n10 + n01) / n * (2 pi - 1)``:
  the test and the bound agree exactly.
- ``bound != 0`` (a non-inferiority tolerance, or a superiority margin): Tango's score test (Tango,
  1998, Statistics in Medicine 17:891), the McNemar-type test for a difference ``d0 != 0``:
  ``Z = (n10 - n01 - n d0) / sqrt(n (2 q + d0 - d0^2))`` with ``q`` the maximum-likelihood ``p01``
  under ``p10 - p01 = d0``, the root of ``2n q^2 + B q + C = 0``, ``B = -(n10 + n01) + (2n - n10 + n01) d0``,
  ``C = -n01 d0 (1 - d0)``; at ``d0 = 0`` it is McNemar's ``(n10 - n01) / sqrt(n10 + n01)``. The
  lower confidence bound is the ``d0`` at which ``Z`` equals the normal quantile (the test inverted).

Holm's step-down (Holm, 1979) keeps the chance of promoting any candidate whose null hypothesis is
true at most ``alpha``, whatever the number of candidates and however their tests depend on each
other (they share the baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats


@dataclass(frozen=True)
class PairedTest:
    """One one-sided test of ``gain > bound``: the p-value, the lower confidence bound of the gain,
    and the test's name as the reasons state it."""

    p_value: float
    lower: float
    name: str


def discordant(candidate_right: np.ndarray, reference_right: np.ndarray) -> tuple[int, int]:
    """``(n10, n01)``: images the candidate alone got right, and the reference alone."""
    c, r = np.asarray(candidate_right, bool), np.asarray(reference_right, bool)
    return int((c & ~r).sum()), int((~c & r).sum())


def _tango_q(n10: int, n01: int, n: int, d0: float) -> float:
    a = 2.0 * n
    b = -(n10 + n01) + (2.0 * n - n10 + n01) * d0
    c = -n01 * d0 * (1.0 - d0)
    return (-b + math.sqrt(max(b * b - 4.0 * a * c, 0.0))) / (2.0 * a)


def tango_z(n10: int, n01: int, n: int, d0: float) -> float:
    """Tango's score statistic for ``p10 - p01 = d0`` (the module docstring); ``+inf``/``-inf`` where
    the null variance is zero."""
    q = _tango_q(n10, n01, n, d0)
    var = n * (2.0 * q + d0 - d0 * d0)
    num = n10 - n01 - n * d0
    if var <= 0.0:
        return math.inf if num > 0 else -math.inf if num < 0 else 0.0
    return num / math.sqrt(var)


def tango_test(n10: int, n01: int, n: int, bound: float, confidence: float) -> PairedTest:
    """Tango's score test of ``(p10 - p01) > bound``, and its lower confidence bound."""
    p = float(stats.norm.sf(tango_z(n10, n01, n, bound)))
    z = float(stats.norm.ppf(confidence))
    lo, hi = -1.0 + 1e-12, 1.0 - 1e-12

    def f(d: float) -> float:  # decreasing in d
        return tango_z(n10, n01, n, d) - z

    if f(lo) <= 0.0:
        lower = -1.0
    elif f(hi) >= 0.0:
        lower = 1.0
    else:
        lower = float(optimize.brentq(f, lo, hi, xtol=1e-10))
    return PairedTest(p, lower, "Tango's paired score test (McNemar-type)")


def mcnemar_test(n10: int, n01: int, n: int, confidence: float) -> PairedTest:
    """McNemar's exact conditional test of ``p10 > p01``, and the exact lower bound of the gain."""
    m = n10 + n01
    if m == 0:
        return PairedTest(1.0, 0.0, "McNemar's exact test")
    p = float(stats.binom.sf(n10 - 1, m, 0.5))
    pi_low = float(stats.beta.ppf(1.0 - confidence, n10, m - n10 + 1)) if n10 > 0 else 0.0
    return PairedTest(p, m / n * (2.0 * pi_low - 1.0), "McNemar's exact test")


def accuracy_test(n10: int, n01: int, n: int, bound: float, confidence: float) -> PairedTest:
    """The paired test of an accuracy gain above ``bound``: exact where the bound is 0, else Tango's."""
    if bound == 0.0:
        return mcnemar_test(n10, n01, n, confidence)
    return tango_test(n10, n01, n, bound, confidence)


def bootstrap_test(gain: float, resampled_gains: np.ndarray, bound: float, confidence: float) -> PairedTest:
    """The one-sided normal test of ``gain > bound`` with the standard error of the paired bootstrap:
    ``p = P(N(0, 1) > (gain - bound) / se)``, lower bound ``gain - z_conf * se``."""
    se = float(np.std(resampled_gains, ddof=1)) if resampled_gains.size > 1 else 0.0
    if se <= 0.0 or not math.isfinite(se):
        return PairedTest(0.0 if gain > bound else 1.0, gain, "paired bootstrap")
    p = float(stats.norm.sf((gain - bound) / se))
    return PairedTest(p, gain - float(stats.norm.ppf(confidence)) * se, "paired bootstrap")


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's adjusted p-values: ``max_{j <= k} min(1, (m - j) p_(j))`` for the ``k``-th smallest;
    rejecting where the adjusted p is below ``alpha`` is Holm's step-down at level ``alpha``. Ties in
    p are ordered by name, so the result never depends on the order of the mapping."""
    ordered = sorted(p_values, key=lambda k: (p_values[k], k))
    m, running, out = len(ordered), 0.0, {}
    for j, k in enumerate(ordered):
        running = max(running, min(1.0, (m - j) * p_values[k]))
        out[k] = running
    return out
