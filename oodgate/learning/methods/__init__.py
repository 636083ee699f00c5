"""Loss methods: heads that replace a backbone's last ``nn.Linear``, all with one contract.

>>> from oodgate import methods
>>> head = methods.create("dismax", in_features=128, num_classes=10, fpr=True)

Names are the ones used in ``params.yaml``: softmax, isomax, isomax_plus, dismax, logitnorm.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from oodgate.base.registry import Registry
from oodgate.learning.methods.base import ENTROPIC_SCALE, Head
from oodgate.learning.methods.dismax import DisMaxHead
from oodgate.learning.methods.isomax import IsoMaxHead
from oodgate.learning.methods.isomax_plus import IsoMaxPlusHead
from oodgate.learning.methods.logitnorm import LogitNormHead
from oodgate.learning.methods.softmax import SoftMaxHead

METHODS: Registry[type[Head]] = Registry("method")
METHODS.register("softmax")(SoftMaxHead)
METHODS.register("isomax")(IsoMaxHead)
METHODS.register("isomax_plus")(IsoMaxPlusHead)
METHODS.register("dismax")(DisMaxHead)
METHODS.register("logitnorm")(LogitNormHead)

__all__ = ["ENTROPIC_SCALE", "METHODS", "Head", "check_options", "create", "names"]


def names() -> list[str]:
    return METHODS.names()


def check_options(name: str, options: dict[str, Any]) -> Any:
    """Validate a method's options; returns the parsed options object.

    Raises ``ValueError`` naming the method, the bad option and the valid ones.
    """
    cls = METHODS.get(name)
    valid = sorted(cls.Options.model_fields) or ["(none)"]
    try:
        return cls.Options(**options)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown option {key!r}")
            else:
                problems.append(f"option {key}={err.get('input')!r}: {err['msg']}")
        raise ValueError(
            f"method {name!r}: {'; '.join(problems)}; valid options: {', '.join(valid)}"
        ) from None


def create(name: str, in_features: int, num_classes: int, **options: Any) -> Head:
    """Build the head registered as ``name`` with its options (e.g. ``fpr=True``, ``tau=0.04``)."""
    cls = METHODS.get(name)
    return cls(in_features, num_classes, check_options(name, options))
