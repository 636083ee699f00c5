"""Train one (loss, seed) into a directory: ``last.pt`` (resume state), ``best.pt`` (the selected
weights), ``history.json`` and, once finished, ``train.json`` (the record, with its fingerprint)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from oodgate import engine
from oodgate.classifier import Classifier, ModelSpec, build_classifier, save_classifier
from oodgate.config import Config
from oodgate.data.bundle import DataBundle
from oodgate.steps.common import (
    activate_numerics,
    file_digest,
    load_prepared,
    output_digests,
    reusable,
    write_json,
    write_provenance,
)
from oodgate.steps.results import Trained

RECORD = "train.json"
OUTPUTS = (engine.BEST, "history.json")  # what train.json vouches for


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
    write_json(out_dir / "history.json", [])
    from oodgate.steps.inputs import train_inputs

    trained = Trained(
        loss=loss_id,
        method=spec.method,
        seed=seed,
        fingerprint=fingerprint,
        dir=str(out_dir),
        best_epoch=0,
        best_val_accuracy=val_accuracy,
        epochs=0,
        device=str(device),
        inputs=train_inputs(cfg, loss_id, seed),
        outputs=output_digests(out_dir, OUTPUTS),
        train_seconds=round(time.perf_counter() - t0, 3),
        imported={"path": path, "format": c.format, "ignored": list(imported.ignored)},
    )
    write_provenance(cfg, out_dir)
    write_json(out_dir / RECORD, trained.record())
    return trained


def train(
    cfg: Config,
    loss_id: str,
    seed: int,
    prepared_dir: str | Path,
    out_dir: str | Path,
    progress: bool = False,
    on_epoch: Callable[[engine.EpochStats], None] | None = None,
    max_epochs: int | None = None,
    fingerprint: str | None = None,
) -> Trained:
    """Train one (loss, seed), or return the finished result in ``out_dir`` if it has the same
    fingerprint (default: :func:`~oodgate.steps.inputs.train_fingerprint` of the current config and
    prepared ``id.pt``). ``last.pt`` is resumed only under the same fingerprint; anything written under
    other inputs is trained again, never returned."""
    from oodgate.steps.inputs import train_fingerprint, train_inputs

    if loss_id not in cfg.losses:
        raise ValueError(f"unknown loss id {loss_id!r}; losses in params.yaml: {', '.join(cfg.losses)}")
    out_dir = Path(out_dir)
    if fingerprint is None:
        fingerprint = train_fingerprint(cfg, loss_id, seed, file_digest(Path(prepared_dir) / "id.pt"))
    done = out_dir / RECORD
    previous = reusable(out_dir, RECORD, fingerprint)  # same inputs, files intact
    if previous is not None:
        return Trained(**previous, dir=str(out_dir))  # training is a pure function of its inputs
    if done.is_file() and engine.distributed().main:  # finished under other inputs, or damaged: retrain
        for name in (RECORD, engine.BEST, engine.LAST):
            (out_dir / name).unlink(missing_ok=True)
    if cfg.losses[loss_id].checkpoint is not None:
        return import_checkpoint(cfg, loss_id, seed, Path(prepared_dir), out_dir, fingerprint)
    dist = engine.distributed()
    n = cfg.train.processes
    if n > 1 and dist.world == 1:  # launch n processes; the first writes the record read below
        from oodgate.distributed import launch
        from oodgate.steps.common import read_json

        t0 = time.perf_counter()
        launch(
            cfg.model_dump(mode="json"),
            loss_id,
            seed,
            Path(prepared_dir),
            out_dir,
            fingerprint,
            n,
            max_epochs,
        )
        record = read_json(done) if done.is_file() else None
        if max_epochs is not None and max_epochs < cfg.train.epochs and record is None:  # stopped on purpose
            return Trained(
                loss_id, cfg.losses[loss_id].method, seed, fingerprint, str(out_dir), 0, float("nan"), 0, ""
            )
        if record is None or record.get("fingerprint") != fingerprint:
            raise RuntimeError(f"distributed training of {loss_id} seed {seed} wrote no record in {out_dir}")
        return Trained(**record, dir=str(out_dir), train_seconds=round(time.perf_counter() - t0, 3))
    if dist.world != n:
        raise ValueError(
            f"train.processes={n}, but this training runs in {dist.world} processes; launch it with "
            f"torchrun with {n} processes in all, or set train.processes: {dist.world}"
        )
    activate_numerics(cfg, processes=dist.world)
    bundle = load_prepared(prepared_dir, with_ood=False)
    spec = model_spec(cfg, loss_id, bundle)
    result = engine.train(
        lambda: new_model(cfg, spec, seed),
        bundle.train,
        bundle.val,
        cfg.train,
        seed=seed,
        out_dir=out_dir,
        progress=progress,
        on_epoch=on_epoch,
        max_epochs=max_epochs,
        fingerprint=fingerprint,
        workers=cfg.data.workers,
    )
    if not dist.main:  # the first process writes the history and the record
        return Trained(
            loss=loss_id,
            method=spec.method,
            seed=seed,
            fingerprint=fingerprint,
            dir=str(out_dir),
            best_epoch=0,
            best_val_accuracy=float("nan"),
            epochs=len(result.history),
            device=result.device,
        )
    # Wall-clock times go into the returned result only, never into the files: the same inputs
    # write the same bytes (a re-run under `dvc repro` leaves dvc.lock unchanged).
    write_json(out_dir / "history.json", [engine.without_timing(h) for h in result.history])
    trained = Trained(
        loss=loss_id,
        method=spec.method,
        seed=seed,
        fingerprint=fingerprint,
        dir=str(out_dir),
        best_epoch=result.best_epoch,
        best_val_accuracy=result.best_val_accuracy,
        epochs=len(result.history),
        device=result.device,
        resumed_from_epoch=result.resumed_from_epoch,
        inputs=train_inputs(cfg, loss_id, seed),
        outputs=output_digests(out_dir, OUTPUTS),
        train_seconds=round(sum(h.get("seconds", 0.0) for h in result.history), 3),
        epoch_seconds=tuple(round(h.get("seconds", 0.0), 3) for h in result.history),
    )
    if len(result.history) == cfg.train.epochs:  # not interrupted on purpose (max_epochs)
        write_provenance(cfg, out_dir)
        write_json(done, trained.record())
    return trained
