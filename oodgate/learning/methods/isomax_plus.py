"""IsoMax+ (Macedo & Ludermir, 2021): isometric distances between normalised features and prototypes."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from oodgate.learning.methods.isomax import EntropicHead, exact_cdist

if TYPE_CHECKING:
    from pydantic import BaseModel


class IsoMaxPlusHead(EntropicHead):
    """``z_j = -|s| * ||f^ - p^_j||_2`` with ``f^ = f/||f||``; default score ``mds``.

    ``prototypes ~ N(0, 1)``; ``distance_scale`` (shape (1,)) starts at 1.0 and is used as ``|s|``.
    """

    default_score = "mds"
    scores: ClassVar[tuple[str, ...]] = ("mds", "mps", "entropic", "energy")

    def __init__(self, in_features: int, num_classes: int, options: BaseModel | None = None) -> None:
        super().__init__(in_features, num_classes, options)
        self.prototypes = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.prototypes, mean=0.0, std=1.0)
        self.distance_scale = nn.Parameter(torch.ones(1))

    def isometric_distances(self, features: torch.Tensor) -> torch.Tensor:
        """``|s| * ||f^ - p^_j||_2``, shape (B, K)."""
        d = exact_cdist(F.normalize(features, dim=1), F.normalize(self.prototypes, dim=1))
        return torch.abs(self.distance_scale) * d

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return -self.isometric_distances(features)
