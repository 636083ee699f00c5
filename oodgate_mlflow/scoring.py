"""A registered version scored on a run's images: what the flow compares a promoted candidate with
the current champion on (:func:`tasks.track.champion_judge`). The version's files are verified
against the registry's record before anything loads them (:func:`oodgate_mlflow.champion.verified_copy`).

NumPy is imported at the top: this module is imported by the flow, after its entry point pinned
the numerics, never by a command line that pins them itself (``oodgate_mlflow.champion``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oodgate_mlflow import tracking
from oodgate_mlflow.champion import verified_copy

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


class NotComparableError(ValueError):
    """A registered model cannot be scored on these images: other classes or another input shape."""


def score_version(
    name: str,
    version: ModelVersion,
    images: Mapping[str, np.ndarray],
    class_names: list[str],
    batch_size: int = 1024,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A registered version's calibrated probabilities ``(N, K)`` and OOD scores ``(N,)`` on each
    set of uint8 images ``(N, C, H, W)``, from a copy of its files verified against the registry's
    record (:class:`~oodgate_mlflow.integrity.ModelIntegrityError` otherwise), ``batch_size`` images at
    a time. :class:`NotComparableError` when its classes or input shape are not these images'."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="oodgate-model-") as tmp:
        local = verified_copy(name, version, Path(tmp) / "model")
        with tracking.no_pickle():
            model = mlflow.pyfunc.load_model(str(local))
    inner = model.unwrap_python_model()
    shape = tuple(next(iter(images.values())).shape[1:]) if images else ()
    if list(inner.class_names) != list(class_names):
        raise NotComparableError(
            f"it has the classes {list(inner.class_names)}, these images {list(class_names)}"
        )
    if tuple(inner.shape) != shape:
        raise NotComparableError(f"it takes images of shape {tuple(inner.shape)}, these are {shape}")
    k = len(class_names)
    out = {}
    for set_name, x in images.items():
        parts = [model.predict(np.asarray(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        probs = np.concatenate([p[[f"p_{c}" for c in inner.class_names]].to_numpy(np.float64) for p in parts])
        scores = np.concatenate([p["score"].to_numpy(np.float64) for p in parts])
        out[set_name] = (probs.reshape(-1, k), scores)
    return out
