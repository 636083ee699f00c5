"""Backbones: image -> penultimate features ``f ∈ R^D``.

A backbone never carries a classification layer; the loss method attaches its own head (a linear
layer or class prototypes) on top of ``out_features``. Every factory takes ``in_channels`` and
``image_size`` plus its own keyword-only options, which are what ``model.options`` in
``params.yaml`` holds::

    net = create_backbone("small_cnn", in_channels=1, image_size=28)
    net(torch.zeros(2, 1, 28, 28)).shape  # (2, net.out_features) == (2, 128)

The ``cifar`` architectures (``resnet18``, ``resnet34``, ``densenet_bc_100``, ``wrn_28_10``,
``wrn_40_2``) use a 3x3 stride-1 stem without max-pooling, as in the papers' CIFAR code, and end
with global average pooling, so they accept any ``image_size >= 8``.

``torchvision:<name>`` is any torchvision classification model without its classification layer
(``torchvision:resnet18``, ``torchvision:efficientnet_b0``, ``torchvision:convnext_tiny``; see
``oodgate/learning/models/torchvision_models.py``), its ``options`` passed to torchvision's builder.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

# Importing the architecture modules registers them.
from oodgate.learning.models import densenet, resnet, small_cnn, torchvision_models, wrn  # noqa: F401
from oodgate.learning.models.base import BACKBONES, BackboneFactory

MIN_IMAGE_SIZE = 8
_COMMON_ARGS = ("in_channels", "image_size")

__all__ = [
    "BACKBONES",
    "MIN_IMAGE_SIZE",
    "BackboneFactory",
    "backbone_options",
    "check_options",
    "create_backbone",
    "is_known",
    "names",
]


def names() -> list[str]:
    return BACKBONES.names()


def is_known(name: str) -> bool:
    """A registered backbone, or ``torchvision:<model>`` for one of torchvision's classification models."""
    if torchvision_models.is_torchvision(name):
        return name.removeprefix(torchvision_models.PREFIX) in torchvision_models.available()
    return name in BACKBONES


def backbone_options(name: str) -> dict[str, Any]:
    """The keyword options backbone ``name`` accepts, mapped to their defaults."""
    factory = BACKBONES.get(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.name not in _COMMON_ARGS and p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_options(name: str, options: dict[str, Any], image_size: int | None = None) -> None:
    """Raise ``ValueError`` if ``name`` is unknown or ``options`` holds a key it does not accept (for a
    torchvision model: if it cannot be built with them, or, given ``image_size``, run at that size)."""
    if torchvision_models.is_torchvision(name):
        torchvision_models.check(name.removeprefix(torchvision_models.PREFIX), options, image_size)
        return
    valid = backbone_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        allowed = ", ".join(sorted(valid)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for backbone {name!r}; "
            f"valid options: {allowed}"
        )


def create_backbone(name: str, in_channels: int, image_size: int, **options: Any) -> nn.Module:
    """Build backbone ``name``: a module with ``out_features`` mapping ``(B, in_channels, H, W)``
    floats to ``(B, out_features)`` features.

    Raises ``ValueError`` for an unknown name (listing the valid ones), an unknown option (listing
    the valid options) or an invalid value (naming the option).
    """
    if not torchvision_models.is_torchvision(name):
        check_options(name, options)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if torchvision_models.is_torchvision(name):
        arch = name.removeprefix(torchvision_models.PREFIX)
        return torchvision_models.TorchvisionBackbone(arch, in_channels, options)
    model = BACKBONES.get(name)(in_channels=in_channels, image_size=image_size, **options)
    assert isinstance(getattr(model, "out_features", None), int), f"backbone {name!r} lacks out_features"
    return model
