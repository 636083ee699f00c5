"""Training one (loss, seed) in this process: what the train step runs, and what every process of a
data-parallel launch (:mod:`oodgate.learning.training.distributed`) runs for its share.

The first process writes ``history.json``, ``provenance.json`` and the record ``train.json``
(:func:`finish`, also used for a model imported rather than trained); the others only train.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from oodgate.base.config import CheckpointConfig, Config
from oodgate.base.files import output_digests, write_json
from oodgate.base.numerics import write_provenance
from oodgate.base.records import Trained
from oodgate.data.bundle import DataBundle
from oodgate.data.prepared import load_prepared
from oodgate.learning import methods
from oodgate.learning.classifier import Classifier, ModelSpec, build_classifier, save_classifier
from oodgate.learning.importing import checkpoint_for_seed, import_model
from oodgate.learning.models.torchvision_models import load_weights
from oodgate.learning.training import engine
from oodgate.learning.training.engine import activate_numerics

RECORD = "train.json"
BEST, LAST = engine.BEST, engine.LAST
HISTORY = "history.json"
OUTPUTS = (engine.BEST, HISTORY)  # what train.json vouches for


def model_spec(cfg: Config, loss_id: str, bundle: DataBundle) -> ModelSpec:
    """The architecture of one loss. The OOD score is the method's default here: the configured
    score is applied at evaluation, so changing it never retrains."""

    loss = cfg.losses[loss_id]
    return ModelSpec(
        backbone=cfg.model.backbone,
        method=loss.method,
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        image_size=bundle.image_size,
        mean=tuple(bundle.mean),
        std=tuple(bundle.std),
        score=methods.METHODS.get(loss.method).default_score,
        backbone_options=dict(cfg.model.options),
        method_options=dict(loss.options),
        class_names=tuple(bundle.class_names),
        preprocessing="fit" if cfg.data.dataset == "folder" else "exact",
    )


def new_model(cfg: Config, spec: ModelSpec, seed: int) -> Classifier:
    """The model training starts from: initialised by ``seed``, then the backbone's pretrained
    weights from ``model.weights`` when set (the head always starts from ``seed``)."""
    model = build_classifier(spec, seed)
    if cfg.model.weights is not None:
        load_weights(model.backbone, cfg.model.weights)
    return model


def trained(cfg: Config, loss_id: str, seed: int, out_dir: Path, fingerprint: str, **figures: Any) -> Trained:
    """The :class:`~oodgate.base.records.Trained` of one (loss, seed) in ``out_dir``: its identity,
    and ``figures`` for the rest of its fields."""
    return Trained(
        loss=loss_id,
        method=cfg.losses[loss_id].method,
        seed=seed,
        fingerprint=fingerprint,
        dir=str(out_dir),
        **figures,
    )


def finish(
    cfg: Config,
    loss_id: str,
    seed: int,
    out_dir: Path,
    fingerprint: str,
    inputs: dict[str, Any],
    **figures: Any,
) -> Trained:
    """:func:`trained` for files (``best.pt``, ``history.json``) written in ``out_dir``, with the
    inputs record (what the train step's fingerprint is over) and the files' digests; writes
    ``provenance.json`` and, last, the record."""
    result = trained(
        cfg,
        loss_id,
        seed,
        out_dir,
        fingerprint,
        inputs=inputs,
        outputs=output_digests(out_dir, OUTPUTS),
        **figures,
    )
    write_provenance(cfg, out_dir)
    write_json(out_dir / RECORD, result.record())  # last: the record marks a finished result
    return result


def train_here(
    cfg: Config,
    loss_id: str,
    seed: int,
    prepared_dir: str | Path,
    out_dir: Path,
    fingerprint: str,
    inputs: dict[str, Any],
    hooks: Sequence[engine.Hook] = (),
) -> Trained:
    """Train one (loss, seed) in this process (its share, in a data-parallel launch), resuming from
    ``last.pt`` written under the same ``fingerprint``. The first process writes the history and the
    record; the others write nothing and return no figures of the selection."""
    dist = engine.distributed()
    activate_numerics(cfg, processes=dist.world)
    bundle = load_prepared(prepared_dir, with_ood=False)
    spec = model_spec(cfg, loss_id, bundle)
    result = engine.train(
        lambda: new_model(cfg, spec, seed),
        bundle.train,
        bundle.val,
        cfg.train,
        seed,
        hooks=(engine.PrototypeWatch(), engine.Checkpointer(out_dir, fingerprint), *hooks),
        workers=cfg.data.workers,
    )
    if not dist.main:
        epochs = len(result.history)
        return trained(
            cfg,
            loss_id,
            seed,
            out_dir,
            fingerprint,
            best_epoch=0,
            best_val_accuracy=math.nan,
            epochs=epochs,
            device=result.device,
        )
    # Wall-clock times go into the returned result only, never into the files: the same inputs
    # write the same bytes (a re-run under `dvc repro` leaves dvc.lock unchanged).
    write_json(out_dir / HISTORY, [engine.without_timing(h) for h in result.history])
    return finish(cfg, loss_id, seed, out_dir, fingerprint, inputs, **_figures(result))


def import_checkpoint(
    cfg: Config,
    loss_id: str,
    seed: int,
    prepared_dir: Path,
    out_dir: Path,
    fingerprint: str,
    inputs: dict[str, Any],
) -> Trained:
    """The train step of a loss with ``checkpoint:``: the model is imported from the file
    (:mod:`oodgate.learning.importing`), not trained, and written as ``best.pt`` with the same record a
    training writes (its validation accuracy too: the registered seed is chosen on it)."""
    activate_numerics(cfg)
    t0 = time.perf_counter()
    c = cast(CheckpointConfig, cfg.losses[loss_id].checkpoint)  # called for a loss with one
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
        inputs,
        best_epoch=0,
        best_val_accuracy=val_accuracy,
        epochs=0,
        device=str(device),
        train_seconds=round(time.perf_counter() - t0, 3),
        imported={"path": path, "format": c.format, "ignored": list(imported.ignored)},
    )


def _figures(result: engine.TrainResult) -> dict[str, Any]:
    """The fields of :class:`~oodgate.base.records.Trained` a finished training gives."""
    seconds = [h.get("seconds", 0.0) for h in result.history]
    last = result.history[-1] if result.history else {}
    prototypes: dict[str, float | str] = {
        k.removeprefix("prototype_"): v for k, v in last.items() if k.startswith("prototype_")
    }
    still = engine.prototypes_still(result.history)
    if still is not None:
        prototypes["warning"] = still
        logging.getLogger("oodgate").warning("%s", still)
    return {
        "prototypes": prototypes,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs": len(result.history),
        "device": result.device,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_seconds": round(sum(seconds), 3),
        "epoch_seconds": tuple(round(x, 3) for x in seconds),
    }
