"""Train one (loss, seed) into a directory: ``last.pt`` (resume state), ``best.pt`` (the selected
weights), ``history.json`` and, once finished, ``train.json`` (the record, with its fingerprint).

:func:`train` picks one way to the result: the finished one reused, a model imported from a file,
training in processes launched here (:mod:`oodgate.distributed`), or training in this process
(:func:`oodgate.training.train_here`, which every launched process runs too).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from oodgate import engine
from oodgate.classifier import save_classifier
from oodgate.config import Config
from oodgate.steps.common import (
    activate_numerics,
    exclusive,
    file_digest,
    load_prepared,
    reusable,
    write_json,
)
from oodgate.steps.results import Trained
from oodgate.training import HISTORY, OUTPUTS, RECORD, finish, model_spec, train_here

__all__ = ["OUTPUTS", "RECORD", "import_checkpoint", "model_spec", "train"]


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
    fingerprint (default: :func:`~oodgate.steps.inputs.train_fingerprint` of the current config and
    prepared ``id.pt``). ``last.pt`` is resumed only under the same fingerprint; anything written under
    other inputs is trained again, never returned. ``hooks`` (:class:`oodgate.engine.Hook`) follow a
    training in this process."""
    if loss_id not in cfg.losses:
        raise ValueError(f"unknown loss id {loss_id!r}; losses in params.yaml: {', '.join(cfg.losses)}")
    out_dir, prepared_dir = Path(out_dir), Path(prepared_dir)
    if fingerprint is None:
        from oodgate.steps.inputs import train_fingerprint

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
    if cfg.losses[loss_id].checkpoint is not None:
        return import_checkpoint(cfg, loss_id, seed, prepared_dir, out_dir, fingerprint)
    if cfg.train.processes > 1 and engine.distributed().world == 1:
        return _launch(cfg, loss_id, seed, prepared_dir, out_dir, fingerprint)
    _check_world(cfg)
    return train_here(cfg, loss_id, seed, prepared_dir, out_dir, fingerprint, hooks)


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
        for name in (RECORD, engine.BEST, engine.LAST):
            (out_dir / name).unlink(missing_ok=True)


def _launch(
    cfg: Config, loss_id: str, seed: int, prepared_dir: Path, out_dir: Path, fingerprint: str
) -> Trained:
    """Train in ``train.processes`` processes on this machine; the first writes the record read here."""
    from oodgate.distributed import launch

    t0 = time.perf_counter()
    launch(
        cfg.model_dump(mode="json"), loss_id, seed, prepared_dir, out_dir, fingerprint, cfg.train.processes
    )
    trained = _reused(out_dir, fingerprint, train_seconds=round(time.perf_counter() - t0, 3))
    if trained is None:
        raise RuntimeError(f"distributed training of {loss_id} seed {seed} wrote no record in {out_dir}")
    return trained


def _check_world(cfg: Config) -> None:
    """Training in this process: it must be one of ``train.processes`` (1, or ``torchrun``'s)."""
    n, world = cfg.train.processes, engine.distributed().world
    if world != n:
        raise ValueError(
            f"train.processes={n}, but this training runs in {world} processes; launch it with "
            f"torchrun with {n} processes in all, or set train.processes: {world}"
        )


def import_checkpoint(
    cfg: Config, loss_id: str, seed: int, prepared_dir: Path, out_dir: Path, fingerprint: str
) -> Trained:
    """The train step of a loss with ``checkpoint:``: the model is imported from the file
    (:mod:`oodgate.importing`), not trained, and written as ``best.pt`` with the same record a
    training writes (its validation accuracy too: the registered seed is chosen on it)."""
    from oodgate.importing import checkpoint_for_seed, import_model

    activate_numerics(cfg)
    t0 = time.perf_counter()
    c = cfg.losses[loss_id].checkpoint
    path = checkpoint_for_seed(c.path, seed)
    bundle = load_prepared(prepared_dir, with_ood=False)
    spec = model_spec(cfg, loss_id, bundle)
    imported = import_model(
        path, c.format, spec, c.mean, c.std, source=f"losses.{loss_id}.checkpoint {path!r}"
    )
    device = engine.resolve_device(cfg.train.device)
    _, val_accuracy = engine.validate(imported.model, bundle.val, cfg.train, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_classifier(imported.model.cpu(), out_dir / engine.BEST, epoch=0)
    write_json(out_dir / HISTORY, [])
    return finish(
        cfg,
        loss_id,
        seed,
        out_dir,
        fingerprint,
        best_epoch=0,
        best_val_accuracy=val_accuracy,
        epochs=0,
        device=str(device),
        train_seconds=round(time.perf_counter() - t0, 3),
        imported={"path": path, "format": c.format, "ignored": list(imported.ignored)},
    )
