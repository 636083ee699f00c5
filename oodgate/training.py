"""Training one (loss, seed) in this process: what the train step runs, and what every process of a
data-parallel launch (:mod:`oodgate.distributed`) runs for its share.

The first process writes ``history.json``, ``provenance.json`` and the record ``train.json``
(:func:`finish`, also used for a model imported rather than trained); the others only train.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from oodgate import engine
from oodgate.classifier import Classifier, ModelSpec, build_classifier
from oodgate.config import Config
from oodgate.data.bundle import DataBundle
from oodgate.steps.common import (
    activate_numerics,
    load_prepared,
    output_digests,
    write_json,
    write_provenance,
)
from oodgate.steps.results import Trained

RECORD = "train.json"
HISTORY = "history.json"
OUTPUTS = (engine.BEST, HISTORY)  # what train.json vouches for


def model_spec(cfg: Config, loss_id: str, bundle: DataBundle) -> ModelSpec:
    """The architecture of one loss. The OOD score is the method's default here: the configured
    score is applied at evaluation, so changing it never retrains."""
    from oodgate import methods

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
        from oodgate.models.torchvision_models import load_weights

        load_weights(model.backbone, cfg.model.weights)
    return model


def trained(cfg: Config, loss_id: str, seed: int, out_dir: Path, fingerprint: str, **figures) -> Trained:
    """The :class:`~oodgate.steps.results.Trained` of one (loss, seed) in ``out_dir``: its identity,
    and ``figures`` for the rest of its fields."""
    return Trained(
        loss=loss_id,
        method=cfg.losses[loss_id].method,
        seed=seed,
        fingerprint=fingerprint,
        dir=str(out_dir),
        **figures,
    )


def finish(cfg: Config, loss_id: str, seed: int, out_dir: Path, fingerprint: str, **figures) -> Trained:
    """:func:`trained` for files (``best.pt``, ``history.json``) written in ``out_dir``, with the
    inputs record and the files' digests; writes ``provenance.json`` and, last, the record."""
    from oodgate.steps.inputs import train_inputs

    result = trained(
        cfg,
        loss_id,
        seed,
        out_dir,
        fingerprint,
        inputs=train_inputs(cfg, loss_id, seed),
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
    return finish(cfg, loss_id, seed, out_dir, fingerprint, **_figures(result))


def _figures(result: engine.TrainResult) -> dict:
    """The fields of :class:`~oodgate.steps.results.Trained` a finished training gives."""
    seconds = [h.get("seconds", 0.0) for h in result.history]
    last = result.history[-1] if result.history else {}
    prototypes = {k.removeprefix("prototype_"): v for k, v in last.items() if k.startswith("prototype_")}
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
