"""The containers every data loader returns, and the error raised when files are missing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class DataNotFoundError(FileNotFoundError):
    """Dataset files are not where they are expected; the message says where and how to get them."""


@dataclass(frozen=True)
class ImageSet:
    """Images and labels held in memory.

    ``x`` is uint8, ``(N, C, H, W)``, contiguous, on the CPU; ``y`` is int64, ``(N,)``, with labels
    ``0..K-1`` for in-distribution sets and ``-1`` for OOD sets.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(
                f"ImageSet.x must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"ImageSet.y must be int64 of shape ({self.x.shape[0]},), "
                f"got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class DataBundle:
    """Everything training and evaluation need from the data stage.

    ``ood`` holds every OOD set whole (nothing is tuned on OOD data, so all of it is test data),
    keyed by name in the order of ``data.ood``; ``ood_groups`` gives each set's group (``near`` or
    ``far``). ``mean`` and
    ``std`` are per channel, in ``[0, 1]`` pixel units, computed on ``train`` and rounded to 6 decimals.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    ood: dict[str, ImageSet]
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    ood_groups: dict[str, str] = field(default_factory=dict)
    #: the validation OOD sets (``data.ood_val``), disjoint from every test OOD set: what a model's
    #: OOD score is chosen on (never a reported figure)
    ood_val: dict[str, ImageSet] = field(default_factory=dict)
