"""DisMax (Macedo et al., 2022): distances to all prototypes, fractional probability regularisation."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from oodgate.learning.methods.base import ENTROPIC_SCALE
from oodgate.learning.methods.isomax_plus import IsoMaxPlusHead


class DisMaxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: fractional probability regularisation ("DisMax†"): train on 2x2 mosaics with fractional targets
    fpr: bool = False
    #: weight of the KL term of the regularisation
    alpha: float = Field(default=1.0, ge=0.0, le=100.0)


def mosaic(x: torch.Tensor) -> torch.Tensor:
    """2x2 mosaics of a batch: top-left quadrant from image ``i``, bottom-left from ``i-1``,
    top-right from ``i-2``, bottom-right from ``i-3`` (cyclic), i.e. ``roll(r)`` of the batch per quadrant.
    """
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    out = x.clone()
    out[..., h:, :w] = torch.roll(x[..., h:, :w], 1, 0)
    out[..., :h, w:] = torch.roll(x[..., :h, w:], 2, 0)
    out[..., h:, w:] = torch.roll(x[..., h:, w:], 3, 0)
    return out


def fractional_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Q_i = 0.25 * sum_{r=0..3} onehot(y_{i-r})`` for (B, 4) label tuples ``[y_i, y_{i-1}, y_{i-2}, y_{i-3}]``."""
    return 0.25 * F.one_hot(labels, num_classes).sum(dim=1).to(torch.float32)


class DisMaxHead(IsoMaxPlusHead):
    """``d_j = |s| * ||f^ - p^_j||_2 / sqrt(2)``, ``z_j = -(d_j + mean_k d_k)``; default score ``mmles``.

    Without regularisation the loss is ``cross_entropy(10 z, y)``. With ``fpr=True`` every training
    batch is shuffled, its second half turned into mosaics (``transform_batch``), and the loss is
    ``(CE(10 z[:B/2], y[:B/2]) + alpha * KL(Q || softmax(10 z[B/2:]))) / 2`` (KL with ``batchmean``).
    """

    default_score = "mmles"
    scores = ("mmles", "mps", "entropic", "mds", "energy")
    Options = DisMaxOptions

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        d = self.isometric_distances(features) / math.sqrt(2.0)
        return -(d + d.mean(dim=1, keepdim=True))

    def transform_batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle, keep the first half, turn the second half into mosaics.

        Returns the images and (B, 4) label tuples ``[y_i, y_{i-1}, y_{i-2}, y_{i-3}]``; a label tuple of
        the unmixed half repeats its own label, so its fractional target is its one-hot target.
        """
        if not cast(DisMaxOptions, self.options).fpr or x.shape[0] < 2:
            return x, y
        perm = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
        x, y = x[perm], y[perm]
        half = x.shape[0] // 2
        mixed = y[half:]
        rolled = torch.stack([torch.roll(mixed, r, 0) for r in range(4)], dim=1)
        labels = torch.cat([y[:half, None].expand(half, 4), rolled], dim=0)
        return torch.cat([x[:half], mosaic(x[half:])], dim=0), labels

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.ndim == 1:
            return F.cross_entropy(ENTROPIC_SCALE * logits, y)
        half = logits.shape[0] // 2
        ce = F.cross_entropy(ENTROPIC_SCALE * logits[:half], y[:half, 0])
        q = fractional_targets(y[half:], self.num_classes).to(logits.dtype)
        log_p = F.log_softmax(ENTROPIC_SCALE * logits[half:], dim=1)
        kl = F.kl_div(log_p, q, reduction="batchmean")
        return (ce + cast(DisMaxOptions, self.options).alpha * kl) / 2
