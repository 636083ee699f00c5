"""What each step returns: typed records, also what the Prefect tasks pass to each other.

``record()`` is the part written to the step's directory (``train.json``, ``calibration.json``,
``evaluation.json``): every field but those declared with :data:`UNRECORDED` (the directory, which
the record sits in; wall-clock times, so that the same inputs write the same bytes; figures kept in
a file of their own).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

UNRECORDED = {"recorded": False}  # field metadata: not part of record()


class _Record:
    def record(self) -> dict[str, Any]:
        """The fields written to the step's record file, as JSON-ready values (:func:`dataclasses.asdict`)."""
        kept = {f.name for f in fields(cast("DataclassInstance", self)) if f.metadata.get("recorded", True)}
        return {k: v for k, v in asdict(cast("DataclassInstance", self)).items() if k in kept}


class StaleResultError(RuntimeError):
    """A step's input was computed from other inputs than the current ones (params, data or code
    changed since): using it would return a result that does not match the config."""


class CorruptResultError(RuntimeError):
    """A file a step reads is not the one its record vouches for (truncated, overwritten)."""


@dataclass(frozen=True)
class Trained(_Record):
    loss: str
    method: str
    seed: int
    fingerprint: str
    dir: str = field(metadata=UNRECORDED)
    best_epoch: int
    best_val_accuracy: float
    epochs: int
    device: str
    resumed_from_epoch: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)  # the inputs record (oodgate.running.steps.inputs)
    outputs: dict[str, Any] = field(default_factory=dict)  # file name -> digest, verified before any reuse
    # this call's training time (0.0 when the result was reused)
    train_seconds: float = field(default=0.0, metadata=UNRECORDED)
    epoch_seconds: tuple[float, ...] = field(default=(), metadata=UNRECORDED)
    # imported, not trained: the file and what was left out
    imported: dict[str, Any] = field(default_factory=dict)
    # a prototype head's last epoch: norm, cosine_min, cosine_mean, and a warning if they never moved
    prototypes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibrated(_Record):
    loss: str
    seed: int
    fingerprint: str
    dir: str = field(metadata=UNRECORDED)
    objective: str
    metrics: dict[str, float] = field(default_factory=dict)  # calibration/temperature, val/...
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = field(default=0.0, metadata=UNRECORDED)

    @property
    def temperature(self) -> float:
        return self.metrics["calibration/temperature"]


@dataclass(frozen=True)
class Evaluated(_Record):
    loss: str
    seed: int
    fingerprint: str
    dir: str = field(metadata=UNRECORDED)  # metrics.json, samples.pt, plots/
    score: str
    threshold: float
    metrics: dict[str, float] = field(default_factory=dict, metadata=UNRECORDED)  # in metrics.json
    score_choice: str = ""  # why this score (oodgate.measuring.evaluation.ScoreChoice.text)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Selected(_Record):
    """One loss's OOD score, chosen on validation data (:func:`oodgate.measuring.evaluation.choose_score`):
    ``choice`` is :meth:`oodgate.measuring.evaluation.ScoreChoice.record`."""

    loss: str
    fingerprint: str
    dir: str = field(metadata=UNRECORDED)
    choice: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> str:
        return cast(str, self.choice["score"])
