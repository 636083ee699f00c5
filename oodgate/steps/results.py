"""What each step returns: typed records, also what the Prefect tasks pass to each other.

``record()`` is the part written to the step's directory (``train.json``, ``calibration.json``,
``evaluation.json``): no wall-clock times there, so the same inputs write the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class StaleResultError(RuntimeError):
    """A step's input was computed from other inputs than the current ones (params, data or code
    changed since): using it would return a result that does not match the config."""


class CorruptResultError(RuntimeError):
    """A file a step reads is not the one its record vouches for (truncated, overwritten)."""


@dataclass(frozen=True)
class Trained:
    loss: str
    method: str
    seed: int
    fingerprint: str
    dir: str
    best_epoch: int
    best_val_accuracy: float
    epochs: int
    device: str
    resumed_from_epoch: int = 0
    inputs: dict = field(default_factory=dict)  # the inputs record (oodgate.steps.inputs)
    outputs: dict = field(default_factory=dict)  # file name -> digest, verified before any reuse
    train_seconds: float = 0.0  # this call's training time (0.0 when the result was reused)
    epoch_seconds: tuple[float, ...] = ()
    imported: dict = field(default_factory=dict)  # imported, not trained: the file and what was left out

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("dir", "train_seconds", "epoch_seconds")}


@dataclass(frozen=True)
class Calibrated:
    loss: str
    seed: int
    fingerprint: str
    dir: str
    objective: str
    metrics: dict[str, float] = field(default_factory=dict)  # calibration/temperature, val/...
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def temperature(self) -> float:
        return self.metrics["calibration/temperature"]

    def record(self) -> dict:
        return {
            "loss": self.loss,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "objective": self.objective,
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class Evaluated:
    loss: str
    seed: int
    fingerprint: str
    dir: str  # metrics.json, samples.pt, plots/
    score: str
    threshold: float
    metrics: dict[str, float] = field(default_factory=dict)  # also in metrics.json
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {
            "loss": self.loss,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "score": self.score,
            "threshold": self.threshold,
        }


def choose_seed(trained: list[Trained], calibrated: list[Calibrated]) -> tuple[int, str]:
    """The seed whose model stands for its loss (the one logged, registered and served), chosen on
    validation data only: the highest validation accuracy of its selected epoch, then the lowest
    calibrated validation NLL, then the lowest seed. Returns the seed and the reason, with every
    seed's figures."""
    nll = {c.seed: c.metrics.get("val/nll", float("inf")) for c in calibrated}
    ranked = sorted(trained, key=lambda t: (-t.best_val_accuracy, nll.get(t.seed, float("inf")), t.seed))
    best = ranked[0]
    figures = ", ".join(
        f"seed {t.seed}: {t.best_val_accuracy:.4f} / {nll.get(t.seed, float('nan')):.4f}"
        for t in sorted(trained, key=lambda t: t.seed)
    )
    return best.seed, (
        f"chosen on validation data: the highest validation accuracy, then the lowest calibrated "
        f"validation NLL ({figures})"
    )
