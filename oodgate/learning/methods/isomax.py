"""IsoMax (Macedo et al., IEEE TNNLS 2021): logits are negative Euclidean distances to prototypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from oodgate.learning.methods.base import ENTROPIC_SCALE, Head

if TYPE_CHECKING:
    from pydantic import BaseModel


def exact_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances (no matmul expansion, which can go negative before the sqrt)."""
    return torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


class EntropicHead(Head):
    """Shared loss of the IsoMax family: ``cross_entropy(E_s * z, y)`` with ``E_s = 10``."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(ENTROPIC_SCALE * logits, y)


class IsoMaxHead(EntropicHead):
    """``z_j = -||f - p_j||_2``, prototypes initialised to 0; default score ``entropic``."""

    default_score = "entropic"
    scores = ("entropic", "mps", "mds", "energy")

    def __init__(self, in_features: int, num_classes: int, options: BaseModel | None = None) -> None:
        super().__init__(in_features, num_classes, options)
        self.prototypes = nn.Parameter(torch.zeros(num_classes, in_features))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return -exact_cdist(features, self.prototypes)
