"""SoftMax baseline: a linear layer, softmax and cross-entropy."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from oodgate.learning.methods.base import Head

if TYPE_CHECKING:
    from pydantic import BaseModel


class SoftMaxHead(Head):
    """``z = W f + b``; training loss ``cross_entropy(z, y)``; default score ``mps``."""

    default_score = "mps"

    def __init__(self, in_features: int, num_classes: int, options: BaseModel | None = None) -> None:
        super().__init__(in_features, num_classes, options)
        self.linear = nn.Linear(in_features, num_classes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.linear(features))

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)
