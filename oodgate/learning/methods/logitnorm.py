"""LogitNorm (Wei et al., ICML 2022): cross-entropy on per-sample L2-normalised logits."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from oodgate.learning.methods.softmax import SoftMaxHead


class LogitNormOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: 0.04 for 10 classes; smaller for more classes (about 0.0085 for 100)
    tau: float = Field(default=0.04, gt=0.0, le=10.0)


class LogitNormHead(SoftMaxHead):
    """Same head as SoftMax (``z = W f + b``, no normalisation at inference).

    Loss: ``cross_entropy(z / (tau * (||z||_2 + 1e-7)), y)`` with the per-sample norm of ``z``.
    """

    default_score = "mps"
    Options = LogitNormOptions

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(logits, ord=2, dim=1, keepdim=True) + 1e-7
        return F.cross_entropy(logits / (cast(LogitNormOptions, self.options).tau * norms), y)
