"""In-distribution datasets: the names allowed in ``data.dataset``.

A loader takes the data config and the resolved root and returns an ``IDSource``: the full training
pool, the official test split when the dataset has one, and the names of all its classes. Class
selection and the val/test carving happen once, in ``oodgate.data.load``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from oodgate.base.config import DataConfig
from oodgate.base.registry import Registry
from oodgate.data.bundle import ImageSet
from oodgate.data.embedded import MNIST_IMAGES, MNIST_LABELS, load_embedded
from oodgate.data.torchvision_sets import TORCHVISION_SETS, load_torchvision


@dataclass(frozen=True)
class IDSource:
    train: ImageSet
    test: ImageSet | None  # None: no official test split, carve one with data.test_fraction
    class_names: list[str]


IDLoader = Callable[[DataConfig, Path], IDSource]
ID_DATASETS: Registry[IDLoader] = Registry("dataset")


def embedded_mnist_set(root: Path) -> ImageSet:
    """MNIST-5k as materialised by ``materialize_embedded``: (5000, 1, 28, 28) and labels 0..9."""
    images = load_embedded(root, MNIST_IMAGES)
    labels = load_embedded(root, MNIST_LABELS)
    return ImageSet(
        torch.from_numpy(images).unsqueeze(1).contiguous(), torch.from_numpy(labels).to(torch.int64)
    )


@ID_DATASETS.register("embedded_mnist")
def _embedded_mnist(cfg: DataConfig, root: Path) -> IDSource:
    return IDSource(embedded_mnist_set(root), None, [str(d) for d in range(10)])


def _torchvision_loader(name: str) -> IDLoader:
    def load(cfg: DataConfig, root: Path) -> IDSource:
        train, class_names = load_torchvision(name, root, train=True, download=cfg.download)
        test, _ = load_torchvision(name, root, train=False, download=cfg.download)
        return IDSource(train, test, class_names)

    load.__name__ = f"load_{name}"
    load.__doc__ = f"{name}: official train and test splits through torchvision."
    return load


for _name in TORCHVISION_SETS:
    ID_DATASETS.register(_name)(_torchvision_loader(_name))
