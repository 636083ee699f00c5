"""The train step of one (loss, seed): ``last.pt`` (resume state), ``best.pt`` (the selected
weights), ``history.json`` and, once finished, ``train.json`` (the record, with its fingerprint).

The step decides whether to train (:mod:`oodgate.running.steps.reuse`: the finished result is
reused when its record has the current fingerprint and its files are intact), under a lock beside
its directory so that a concurrent run with the same inputs waits and then reuses it; training
itself, imported, launched in processes or in this one, is :func:`oodgate.learning.training.dispatch.train_one`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from oodgate.base.config import Config
from oodgate.base.files import file_digest
from oodgate.base.records import Trained
from oodgate.learning.training import engine
from oodgate.learning.training.dispatch import train_one
from oodgate.learning.training.driver import OUTPUTS, RECORD, model_spec
from oodgate.learning.training.engine import BEST, LAST
from oodgate.running.steps.inputs import train_fingerprint, train_inputs
from oodgate.running.steps.reuse import exclusive, reusable

__all__ = ["OUTPUTS", "RECORD", "model_spec", "train"]


def train(
    cfg: Config,
    loss_id: str,
    seed: int,
    prepared_dir: str | Path,
    out_dir: str | Path,
    hooks: Sequence[engine.Hook] = (),
    fingerprint: str | None = None,
) -> Trained:
    """Train one (loss, seed), or return the finished result in ``out_dir`` if it has the same
    fingerprint (default: :func:`~oodgate.running.steps.inputs.train_fingerprint` of the current
    config and prepared ``id.pt``). ``last.pt`` is resumed only under the same fingerprint; anything
    written under other inputs is trained again, never returned. ``hooks``
    (:class:`oodgate.learning.training.engine.Hook`) follow a training in this process."""
    if loss_id not in cfg.losses:
        raise ValueError(f"unknown loss id {loss_id!r}; losses in params.yaml: {', '.join(cfg.losses)}")
    out_dir, prepared_dir = Path(out_dir), Path(prepared_dir)
    if fingerprint is None:
        fingerprint = train_fingerprint(cfg, loss_id, seed, file_digest(prepared_dir / "id.pt"))
    if engine.distributed().world > 1:  # a process of a data-parallel launch: its launcher holds the lock
        return _train(cfg, loss_id, seed, prepared_dir, out_dir, hooks, fingerprint)
    with exclusive(out_dir):  # a concurrent run with the same inputs waits, then reuses this result
        return _train(cfg, loss_id, seed, prepared_dir, out_dir, hooks, fingerprint)


def _train(
    cfg: Config,
    loss_id: str,
    seed: int,
    prepared_dir: Path,
    out_dir: Path,
    hooks: Sequence[engine.Hook],
    fingerprint: str,
) -> Trained:
    previous = _reused(out_dir, fingerprint)
    if previous is not None:
        return previous  # training is a pure function of its inputs
    _discard(out_dir)
    inputs = train_inputs(cfg, loss_id, seed)
    return train_one(cfg, loss_id, seed, prepared_dir, out_dir, fingerprint, inputs, hooks)


def _reused(out_dir: Path, fingerprint: str, train_seconds: float = 0.0) -> Trained | None:
    """The result recorded in ``out_dir`` if it has ``fingerprint`` and its files are intact."""
    record = reusable(out_dir, RECORD, fingerprint)
    if record is None:
        return None
    return Trained(**record, dir=str(out_dir), train_seconds=train_seconds)


def _discard(out_dir: Path) -> None:
    """A record :func:`_reused` did not return was finished under other inputs, or is damaged: the
    first process removes it and the checkpoints, so that it trains again."""
    if (out_dir / RECORD).is_file() and engine.distributed().main:
        for name in (RECORD, BEST, LAST):
            (out_dir / name).unlink(missing_ok=True)
