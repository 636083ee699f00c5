"""The backbone registry and the helpers every architecture shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from oodgate.base.registry import Registry

BackboneFactory = Callable[..., nn.Module]

BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def init_weights(module: nn.Module) -> None:
    """Standard init: Kaiming-normal convs (fan_out, ReLU gain), BN weight 1 and bias 0, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_positive_int(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"option {option!r} must be a positive integer, got {value!r}")
    return value


def check_dropout(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"option {option!r} must be a number in [0, 1), got {value!r}")
    return float(value)
