"""The contract every loss method implements, so the training loop never branches on a name.

A method is an ``nn.Module`` head that replaces the backbone's last ``nn.Linear``::

    logits = head(features)              # (B, K), already divided by head.temperature
    x, y = head.transform_batch(x, y)    # training only; identity unless the method regularises inputs
    loss = head.loss(logits, y)          # scalar, differentiable
    s = head.score(logits)               # (B,), the method's default OOD score, higher = in-distribution
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from oodgate.learning import scores

#: Entropic scale of IsoMax, IsoMax+ and DisMax. It multiplies the logits inside the training loss
#: ONLY; probabilities and scores at inference use softmax(z) without it.
ENTROPIC_SCALE = 10.0


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Head(nn.Module):
    """Base class: holds the calibration ``temperature`` (shape (1,), 1.0 until calibrated)."""

    #: name of the OOD score in ``oodgate.learning.scores`` used when the config does not override it
    default_score: ClassVar[str] = "mps"
    #: the scores ``score: auto`` chooses among on validation OOD data, the default first (one name
    #: per function: ``mds`` and ``max_logit`` are the same function of the logits)
    scores: ClassVar[tuple[str, ...]] = ("mps", "max_logit", "energy", "entropic")
    Options: ClassVar[type[BaseModel]] = NoOptions
    temperature: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, in_features: int, num_classes: int, options: BaseModel | None = None) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(
                f"a head needs in_features >= 1 and num_classes >= 2, got {in_features} and {num_classes}"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.options = options if options is not None else self.Options()
        # A persistent buffer: saved with the state dict, never trained, never weight-decayed.
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features) / self.temperature

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits ``z`` (temperature 1)."""
        raise NotImplementedError

    def transform_batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time batch transform; identity by default."""
        return x, y

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return scores.get(self.default_score)(logits)

    @staticmethod
    def hard_targets(y: torch.Tensor) -> torch.Tensor:
        """Class labels of a (possibly transformed) target tensor, for training accuracy.

        Transformed targets are (B, 4) label tuples (see DisMax's mosaics); column 0 is the
        image that keeps its top-left quadrant, i.e. the label of the unmixed image.
        """
        return y if y.ndim == 1 else y[:, 0]

    def set_temperature(self, value: float) -> None:
        if not value > 0 or value != value:
            raise ValueError(f"temperature must be a positive finite number, got {value}")
        self.temperature.fill_(float(value))

    def extra_repr(self) -> str:
        opts = self.options.model_dump()
        shown = ", ".join(f"{k}={v}" for k, v in opts.items())
        return f"in_features={self.in_features}, num_classes={self.num_classes}" + (
            f", {shown}" if shown else ""
        )
