"""One (loss, seed) into a directory, whichever way: imported from a file, trained in data-parallel
processes launched here (:mod:`oodgate.learning.training.distributed`), or trained in this process
(:func:`oodgate.learning.training.driver.train_here`, which every launched process runs too)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oodgate.base.config import Config
from oodgate.base.files import read_json
from oodgate.base.records import Trained
from oodgate.learning.training import engine
from oodgate.learning.training.distributed import launch
from oodgate.learning.training.driver import RECORD, import_checkpoint, train_here


def train_one(
    cfg: Config,
    loss_id: str,
    seed: int,
    prepared_dir: Path,
    out_dir: Path,
    fingerprint: str,
    inputs: dict[str, Any],
    hooks: Sequence[engine.Hook] = (),
) -> Trained:
    """One (loss, seed) into ``out_dir``: imported from a file (``losses.<id>.checkpoint``), trained
    in ``train.processes`` processes launched here, or trained in this process. ``inputs``: the
    record the result's fingerprint is over, written into ``train.json``."""
    if cfg.losses[loss_id].checkpoint is not None:
        return import_checkpoint(cfg, loss_id, seed, prepared_dir, out_dir, fingerprint, inputs)
    if cfg.train.processes > 1 and engine.distributed().world == 1:
        return _launch(cfg, loss_id, seed, prepared_dir, out_dir, fingerprint, inputs)
    _check_world(cfg)
    return train_here(cfg, loss_id, seed, prepared_dir, out_dir, fingerprint, inputs, hooks)


def _launch(
    cfg: Config,
    loss_id: str,
    seed: int,
    prepared_dir: Path,
    out_dir: Path,
    fingerprint: str,
    inputs: dict[str, Any],
) -> Trained:
    """Train in ``train.processes`` processes on this machine; the first writes the record read here."""
    t0 = time.perf_counter()
    launch(
        cfg.model_dump(mode="json"),
        inputs,
        loss_id,
        seed,
        prepared_dir,
        out_dir,
        fingerprint,
        cfg.train.processes,
    )
    record = out_dir / RECORD
    if not record.is_file() or read_json(record).get("fingerprint") != fingerprint:
        raise RuntimeError(f"distributed training of {loss_id} seed {seed} wrote no record in {out_dir}")
    return Trained(**read_json(record), dir=str(out_dir), train_seconds=round(time.perf_counter() - t0, 3))


def _check_world(cfg: Config) -> None:
    """Training in this process: it must be one of ``train.processes`` (1, or ``torchrun``'s)."""
    n, world = cfg.train.processes, engine.distributed().world
    if world != n:
        raise ValueError(
            f"train.processes={n}, but this training runs in {world} processes; launch it with "
            f"torchrun with {n} processes in all, or set train.processes: {world}"
        )
