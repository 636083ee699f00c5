"""Deterministic index splits and class selection on label arrays."""

from __future__ import annotations

import numpy as np
import torch

from oodgate.data.bundle import ImageSet


def stratified_carve(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, carved)``: per class, ``round(fraction * n_class)`` go to ``carved``.

    Classes are visited in increasing order and each is permuted with ``rng``, so the result is a
    function of the labels, the fraction and the generator state. Both outputs are sorted.
    """
    carved = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = round(fraction * idx.size)
        carved.append(rng.permutation(idx)[:n])
    out = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(labels.size), out, assume_unique=True)
    return kept, out


def subset(s: ImageSet, idx: np.ndarray) -> ImageSet:
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return ImageSet(s.x[t].contiguous(), s.y[t].clone())


def select_classes(s: ImageSet, classes: list[int] | None, num_classes: int, dataset: str) -> ImageSet:
    """Keep ``classes`` (indices into the dataset's classes) and relabel them ``0..K-1`` in listed order."""
    if classes is None:
        return s
    check_classes(classes, num_classes, dataset)
    lut = torch.full((num_classes,), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    new = lut[s.y]
    keep = torch.nonzero(new >= 0).flatten()
    return ImageSet(s.x[keep].contiguous(), new[keep].clone())


def check_classes(classes: list[int], num_classes: int, dataset: str) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"data.classes: class index {bad[0]} is out of range for dataset {dataset!r}; "
            f"valid indices are 0..{num_classes - 1}"
        )
