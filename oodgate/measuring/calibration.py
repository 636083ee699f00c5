"""Post-hoc temperature scaling: one scalar ``T`` for the whole head; the formulas below are the reference.

``T`` is fitted on cached VALIDATION logits produced with head temperature 1 (never on the test
split); the calibrated logits are ``z / T``. Dividing by a positive scalar changes neither the argmax
(accuracy) nor the ranking of ``max_j z_j`` (``mds``/``max_logit`` AUROC and FPR95).

Objectives:

- ``"nll"`` (default): Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017).
  Minimise ``mean_i -log softmax(z_i / T)_{y_i}`` over ``log T`` with ``torch.optim.LBFGS`` in float64,
  starting at ``T = 1``, strong-Wolfe line search.
- ``"ece"``: the DisMax paper's (Macedo & Ludermir, 2022). Minimise the 15-bin ECE of
  ``softmax(z / T)`` (:func:`oodgate.measuring.metrics.ece`) with ``scipy.optimize.minimize(method="L-BFGS-B")``,
  ``T in [0.001, 100]``, ``x0 = 1``. ECE is only piecewise smooth in ``T``, so L-BFGS-B's
  finite-difference line searches take a few hundred evaluations (each a float64 softmax over the
  validation logits): seconds for 10k x 100, against well under a second for ``"nll"``.

Both objectives return ``T`` in ``[0.001, 100]``: for the ``nll`` objective ``log T`` is clamped to
that range inside the objective, which only matters on degenerate validation sets (all predictions
correct and separable drive ``T -> 0``, all wrong drive ``T -> inf``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

from oodgate.measuring import metrics

__all__ = ["OBJECTIVES", "T_MAX", "T_MIN", "NotFittedError", "TemperatureScaler", "fit_temperature"]

OBJECTIVES = ("nll", "ece")
T_MIN = 0.001
T_MAX = 100.0


class NotFittedError(RuntimeError):
    """A calibrator was used before ``fit``."""


def _fit_nll(z: np.ndarray, y: np.ndarray) -> float:
    logits = torch.from_numpy(z)  # float64, from metrics.check_logits_labels
    labels = torch.from_numpy(y)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    optimizer = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=100,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Outside [lo, hi] the loss is flat (zero gradient), so LBFGS stops at the bound instead of
        # following a degenerate set to T = 0 or infinity, where the loss turns into NaN.
        loss = F.cross_entropy(logits / torch.exp(log_t.clamp(lo, hi)), labels)
        loss.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward unannotated
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]  # torch: LBFGS.step unannotated
    # Clamp again after exp: exp(log(100)) rounds to 100.00000000000001.
    return min(max(math.exp(min(max(log_t.item(), lo), hi)), T_MIN), T_MAX)


def _fit_ece(z: np.ndarray, y: np.ndarray) -> float:
    result = scipy.optimize.minimize(
        lambda x: metrics.ece(z / x[0], y),
        x0=[1.0],
        method="L-BFGS-B",
        bounds=[(T_MIN, T_MAX)],
    )
    return float(result.x[0])


class TemperatureScaler:
    """Fit/transform temperature scaling (Guo et al., 2017): ``transform(z) = z / T``.

    Typical use: ``scaler = TemperatureScaler("nll").fit(val_logits, val_labels)``, then store
    ``scaler.temperature`` in the head's ``temperature`` buffer.
    """

    def __init__(self, objective: str = "nll") -> None:
        if objective not in OBJECTIVES:
            raise ValueError(
                f"unknown calibration objective {objective!r}; valid objectives: {', '.join(OBJECTIVES)}"
            )
        self.objective = objective
        self._temperature: float | None = None

    def fit(self, logits: Any, labels: Any) -> TemperatureScaler:
        """Fit ``T`` on raw validation logits ``(N, K)`` (head temperature 1) and labels ``(N,)``."""
        z, y = metrics.check_logits_labels(logits, labels)
        self._temperature = _fit_nll(z, y) if self.objective == "nll" else _fit_ece(z, y)
        return self

    @property
    def is_fitted(self) -> bool:
        return self._temperature is not None

    @property
    def temperature(self) -> float:
        """The fitted ``T`` in ``[0.001, 100]``."""
        if self._temperature is None:
            raise NotFittedError("TemperatureScaler is not fitted; call fit(logits, labels) first")
        return self._temperature

    def transform(self, logits: Any) -> torch.Tensor:
        """``logits / T`` as a tensor; floating-point input keeps its dtype, anything else becomes float32."""
        t = self.temperature
        z = torch.as_tensor(logits)
        if z.ndim != 2:
            raise ValueError(f"logits must be 2-D (N, K), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            z = z.to(torch.float32)
        return z / t

    def __repr__(self) -> str:
        fitted = f"temperature={self._temperature:.4g}" if self.is_fitted else "unfitted"
        return f"TemperatureScaler(objective={self.objective!r}, {fitted})"


def fit_temperature(logits: Any, labels: Any, objective: str = "nll") -> float:
    """Fit one temperature on validation logits; see :class:`TemperatureScaler`."""
    return TemperatureScaler(objective).fit(logits, labels).temperature
