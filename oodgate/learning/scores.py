"""OOD scores as functions of logits. Convention: higher = more in-distribution.

``logits`` are the head's output, already divided by its temperature; ``p = softmax(logits)``.
The entropic scale ``E_s`` used by IsoMax-family losses never appears here (it is a training-only
constant, see ``oodgate.learning.methods``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from oodgate.base.registry import Registry

Score = Callable[[torch.Tensor], torch.Tensor]
SCORES: Registry[Score] = Registry("score")


def _neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    # sum_j p_j log p_j from log-softmax (precise for tiny p_j); terms with p_j == 0 are 0, also for
    # -inf logits, where p_j * log p_j would be 0 * -inf = NaN.
    logp = F.log_softmax(logits, dim=1)
    p = logp.exp()
    return torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)


@SCORES.register("mps")
def mps(logits: torch.Tensor) -> torch.Tensor:
    """Maximum probability score: ``max_j softmax(z)_j`` (Hendrycks & Gimpel, 2017)."""
    return F.softmax(logits, dim=1).max(dim=1).values


@SCORES.register("entropic")
def entropic(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy ``sum_j p_j log p_j`` (IsoMax, Macedo et al., 2021)."""
    return _neg_entropy(logits)


@SCORES.register("mds")
def mds(logits: torch.Tensor) -> torch.Tensor:
    """Minimum distance score ``max_j z_j`` (IsoMax+: logits are negative distances)."""
    return logits.max(dim=1).values


@SCORES.register("mmles")
def mmles(logits: torch.Tensor) -> torch.Tensor:
    """Max-mean logit entropy score ``max_j z_j + mean_j z_j + sum_j p_j log p_j`` (DisMax)."""
    return logits.max(dim=1).values + logits.mean(dim=1) + _neg_entropy(logits)


@SCORES.register("max_logit")
def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit ``max_j z_j`` (Hendrycks et al., 2022)."""
    return logits.max(dim=1).values


@SCORES.register("energy")
def energy(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy ``T logsumexp(z / T)`` with ``T = 1`` (Liu et al., 2020)."""
    return torch.logsumexp(logits, dim=1)


def get(name: str) -> Score:
    return SCORES.get(name)


def names() -> list[str]:
    return SCORES.names()
