"""The pipeline's steps, each a plain function over paths: prepare, train, calibrate, evaluate, gate.

Both orchestrators call these and nothing else: the Prefect tasks (``tasks/``) and the DVC stages
(``python -m oodgate <step>``, see ``dvc.yaml``). One implementation per step, so a result of the
flow and of ``dvc repro`` with the same params is the same to the last digit.

Files a step writes, in the directory it is given::

    prepare    id.pt (train/val/test uint8 tensors + stats), ood.pt (OOD val/test halves)
    train      last.pt (resume state), best.pt (selected weights), history.json, train.json
    calibrate  calibrated.pt (best.pt with the fitted temperature), calibration.json
    evaluate   metrics.json, samples.pt (per-sample arrays for the bootstrap), plots/
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from oodgate import data as data_lib
from oodgate import engine, evaluation
from oodgate.classifier import ModelSpec, build_classifier, load_classifier, save_classifier
from oodgate.config import Config
from oodgate.data import DataBundle, ImageSet
from oodgate.gate import Decision, SampleSet, decide, rank_key

PACKAGE_DIR = Path(__file__).resolve().parent
ID_SECTIONS = ("dataset", "classes", "val_fraction", "test_fraction", "split_seed", "download")


# ---------------------------------------------------------------- versions and fingerprints
def code_version() -> str:
    """Hash of the ``oodgate`` package's source files (what a training result depends on)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Short SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object (fingerprints and cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_params(cfg: Config, loss_id: str) -> dict[str, Any]:
    """Exactly the configuration a training run depends on (no OOD, calibration or gate keys)."""
    dump = cfg.model_dump(mode="json")
    return {
        "data": {k: dump["data"][k] for k in ID_SECTIONS},
        "model": dump["model"],
        "train": dump["train"],
        "loss": dump["losses"][loss_id],
    }


def train_fingerprint(cfg: Config, loss_id: str, seed: int, data_version: str, code: str) -> str:
    return digest({"params": train_params(cfg, loss_id), "seed": seed, "data": data_version, "code": code})


# ---------------------------------------------------------------- JSON helpers
def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- prepare
def _pack(s: ImageSet) -> dict[str, torch.Tensor]:
    return {"x": s.x, "y": s.y}


def _unpack(d: Mapping[str, torch.Tensor]) -> ImageSet:
    return ImageSet(x=d["x"], y=d["y"])


def prepare(cfg: Config, out_dir: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """Load the configured datasets once and save their splits as tensors (``id.pt``, ``ood.pt``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = data_lib.load_data(cfg.data, root)
    meta = {
        "num_classes": bundle.num_classes,
        "in_channels": bundle.in_channels,
        "image_size": bundle.image_size,
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "class_names": list(bundle.class_names),
    }
    torch.save(
        {"meta": meta, "train": _pack(bundle.train), "val": _pack(bundle.val), "test": _pack(bundle.test)},
        out_dir / "id.pt",
    )
    torch.save(
        {
            "names": list(bundle.ood_test),
            "val": {k: _pack(v) for k, v in bundle.ood_val.items()},
            "test": {k: _pack(v) for k, v in bundle.ood_test.items()},
        },
        out_dir / "ood.pt",
    )
    sizes = {"train": len(bundle.train.y), "val": len(bundle.val.y), "test": len(bundle.test.y)}
    sizes.update({f"ood/{k}": len(v.y) for k, v in bundle.ood_test.items()})
    summary = {**meta, "sizes": sizes}
    write_json(out_dir / "data.json", summary)
    return summary


def load_prepared(prepared_dir: str | Path, with_ood: bool = True) -> DataBundle:
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "id.pt").is_file():
        raise FileNotFoundError(
            f"prepared data not found in {str(prepared_dir)!r}; run the prepare step first "
            "(`python -m oodgate prepare` or `dvc repro prepare`)"
        )
    d = torch.load(prepared_dir / "id.pt", weights_only=True)
    ood = (
        torch.load(prepared_dir / "ood.pt", weights_only=True)
        if with_ood
        else {"names": [], "val": {}, "test": {}}
    )
    m = d["meta"]
    return DataBundle(
        train=_unpack(d["train"]),
        val=_unpack(d["val"]),
        test=_unpack(d["test"]),
        ood_val={k: _unpack(ood["val"][k]) for k in ood["names"]},
        ood_test={k: _unpack(ood["test"][k]) for k in ood["names"]},
        num_classes=m["num_classes"],
        in_channels=m["in_channels"],
        image_size=m["image_size"],
        mean=tuple(m["mean"]),
        std=tuple(m["std"]),
        class_names=list(m["class_names"]),
    )


# ---------------------------------------------------------------- train
def model_spec(cfg: Config, loss_id: str, bundle: DataBundle) -> ModelSpec:
    loss = cfg.losses[loss_id]
    from oodgate import methods

    head_cls = methods.METHODS.get(loss.method)
    return ModelSpec(
        backbone=cfg.model.backbone,
        method=loss.method,
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        image_size=bundle.image_size,
        mean=tuple(bundle.mean),
        std=tuple(bundle.std),
        score=loss.score or head_cls.default_score,
        backbone_options=dict(cfg.model.options),
        method_options=dict(loss.options),
        class_names=tuple(bundle.class_names),
    )


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
) -> dict[str, Any]:
    """Train one (loss, seed). Returns ``train.json``'s content (plus this call's timings).

    ``fingerprint`` identifies the inputs (default: :func:`train_fingerprint` over the params, the
    seed, the hash of the prepared ``id.pt`` and the code version). A finished result in
    ``out_dir`` is returned only if it carries the same fingerprint, and ``last.pt`` is resumed only
    if it does; anything written under other inputs is trained again, never returned."""
    if loss_id not in cfg.losses:
        raise ValueError(f"unknown loss id {loss_id!r}; losses in params.yaml: {', '.join(cfg.losses)}")
    out_dir = Path(out_dir)
    if fingerprint is None:
        fingerprint = train_fingerprint(
            cfg, loss_id, seed, file_digest(Path(prepared_dir) / "id.pt"), code_version()
        )
    done = out_dir / "train.json"
    if done.is_file():
        previous = read_json(done)
        if previous.get("fingerprint") == fingerprint:  # training is a pure function of its inputs
            return {**previous, "train_seconds": 0.0, "epoch_seconds": []}
        done.unlink()  # trained under other inputs: stale, train again
    bundle = load_prepared(prepared_dir, with_ood=False)
    spec = model_spec(cfg, loss_id, bundle)
    result = engine.train(
        lambda: build_classifier(spec, seed),
        bundle.train,
        bundle.val,
        cfg.train,
        seed=seed,
        out_dir=out_dir,
        progress=progress,
        on_epoch=on_epoch,
        max_epochs=max_epochs,
        fingerprint=fingerprint,
    )
    # Wall-clock times go into the returned summary only, never into the files: the same inputs
    # write the same bytes (a re-run under `dvc repro` leaves dvc.lock unchanged).
    write_json(out_dir / "history.json", [engine.without_timing(h) for h in result.history])
    summary = {
        "loss": loss_id,
        "method": spec.method,
        "score": spec.score,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs": len(result.history),
        "device": result.device,
        "resumed_from_epoch": result.resumed_from_epoch,
        "fingerprint": fingerprint,
    }
    timing = {
        "train_seconds": round(sum(h.get("seconds", 0.0) for h in result.history), 3),
        "epoch_seconds": [round(h.get("seconds", 0.0), 3) for h in result.history],
    }
    if len(result.history) < cfg.train.epochs:
        return {**summary, **timing}  # interrupted on purpose (max_epochs): not finished, no train.json
    write_json(done, summary)
    return {**summary, **timing}


# ---------------------------------------------------------------- calibrate
def inference_device(cfg: Config) -> tuple[str, bool]:
    """Where calibration and evaluation run: the device training resolved (``train.device``), with
    bf16 autocast exactly where training used it (``train.amp`` on CUDA)."""
    device = engine.resolve_device(cfg.train.device)
    return str(device), cfg.train.amp and device.type == "cuda"


def calibrate(
    cfg: Config, train_dir: str | Path, prepared_dir: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """Fit the temperature on validation logits; write ``calibrated.pt`` and ``calibration.json``."""
    out_dir = Path(out_dir)
    model = load_classifier(Path(train_dir) / engine.BEST)
    bundle = load_prepared(prepared_dir, with_ood=False)
    t0 = time.perf_counter()
    device, amp = inference_device(cfg)
    cal = evaluation.calibrate(
        model, bundle, cfg.calibration.objective, cfg.train.eval_batch_size, device=device, amp=amp
    )
    save_classifier(model, out_dir / "calibrated.pt")
    result = {"objective": cal.objective, **cal.metrics()}
    write_json(out_dir / "calibration.json", result)  # no wall-clock time in a versioned file
    return {**result, "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------- evaluate
def evaluate(
    cfg: Config, calibrate_dir: str | Path, prepared_dir: str | Path, out_dir: str | Path, plots: bool = True
) -> dict[str, Any]:
    """Final test-split and OOD-test metrics of the calibrated model; writes ``metrics.json``."""
    out_dir = Path(out_dir)
    model = load_classifier(Path(calibrate_dir) / "calibrated.pt")
    bundle = load_prepared(prepared_dir)
    device, amp = inference_device(cfg)
    ev = evaluation.evaluate(model, bundle, batch_size=cfg.train.eval_batch_size, device=device, amp=amp)
    write_json(out_dir / "metrics.json", ev.metrics)
    torch.save(
        {
            "logits": torch.from_numpy(ev.logits),
            "labels": torch.from_numpy(ev.labels),
            "id_scores": torch.from_numpy(ev.id_scores),
            "ood_names": list(ev.ood_scores),
            "ood_scores": {k: torch.from_numpy(v) for k, v in ev.ood_scores.items()},
            "threshold": ev.threshold,
            "score": ev.score,
        },
        out_dir / "samples.pt",
    )
    if plots:
        from oodgate import plots as plots_lib

        plots_lib.write_all(ev, out_dir / "plots")
    return {"score": ev.score, "threshold": ev.threshold, "metrics": ev.metrics}


def load_samples(evaluate_dir: str | Path) -> SampleSet:
    d = torch.load(Path(evaluate_dir) / "samples.pt", weights_only=True)
    return SampleSet(
        logits=d["logits"].numpy(),
        labels=d["labels"].numpy(),
        id_scores=d["id_scores"].numpy(),
        ood_scores={k: d["ood_scores"][k].numpy() for k in d["ood_names"]},
    )


# ---------------------------------------------------------------- gate
def gate(
    cfg: Config,
    metrics_by_loss: Mapping[str, list[dict[str, float]]],
    samples_by_loss: Mapping[str, list[SampleSet]] | None = None,
    scores: Mapping[str, str] | None = None,
    seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Decide every candidate against the baseline (means over seeds). Returns a JSON-able report
    whose ``table`` is the comparison table (``scores`` and training ``seconds`` per loss optional)."""
    base_id = cfg.gate.baseline
    if base_id not in metrics_by_loss:
        raise ValueError(f"no metrics for the baseline {base_id!r}; evaluate it before gating")
    aggregated = {k: evaluation.aggregate(v) for k, v in metrics_by_loss.items()}
    means = {k: mean for k, (mean, _) in aggregated.items()}
    stds = {k: std for k, (_, std) in aggregated.items()}
    decisions: dict[str, Decision] = {}
    for loss_id in metrics_by_loss:
        if loss_id == base_id:
            continue
        decisions[loss_id] = decide(
            means[loss_id],
            means[base_id],
            cfg.gate,
            candidate_samples=(samples_by_loss or {}).get(loss_id),
            baseline_samples=(samples_by_loss or {}).get(base_id),
        )
    promoted = sorted((k for k, d in decisions.items() if d.promote), key=lambda k: rank_key(means[k]))
    return {
        "baseline": base_id,
        "decisions": {k: {"promote": d.promote, "reasons": list(d.reasons)} for k, d in decisions.items()},
        "promoted": promoted,
        "best": promoted[0] if promoted else None,
        "means": means,
        "stds": stds,
        "seeds": {k: len(v) for k, v in metrics_by_loss.items()},
        "table": comparison_table(means, stds, scores, seconds),
    }


def gate_markdown(report: Mapping[str, Any]) -> str:
    """The gate's decision for every candidate, with every reason, as a markdown section."""
    lines = [f"## Gate (baseline: {report['baseline']})", ""]
    for loss_id, d in report["decisions"].items():
        lines.append(f"- **{loss_id}**: {'PROMOTE' if d['promote'] else 'REJECT'}")
        lines += [f"    - {r}" for r in d["reasons"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reports
TABLE_COLUMNS = (
    ("accuracy", "test/accuracy"),
    ("ECE", "test/ece"),
    ("ECE uncal.", "test/ece_uncalibrated"),
    ("NLL", "test/nll"),
    ("mean FPR95", "ood/mean/fpr95"),
    ("mean AUROC", "ood/mean/auroc"),
)


def comparison_table(
    means: Mapping[str, Mapping[str, float]],
    stds: Mapping[str, Mapping[str, float]] | None = None,
    scores: Mapping[str, str] | None = None,
    seconds: Mapping[str, float] | None = None,
    per_set: bool = True,
) -> str:
    """A markdown table: one row per loss, the gate's metrics first, then FPR95 per OOD set."""
    first = next(iter(means.values()))
    sets = sorted(
        {k.split("/")[1] for k in first if k.startswith("ood/") and k.endswith("/fpr95")} - {"mean"}
    )
    cols = list(TABLE_COLUMNS) + ([(f"FPR95 {s}", f"ood/{s}/fpr95") for s in sets] if per_set else [])
    head = ["loss", "score"] + [c for c, _ in cols] + (["train s"] if seconds else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss_id, m in means.items():
        cells = [loss_id, (scores or {}).get(loss_id, "")]
        for _, key in cols:
            v = m.get(key, math.nan)
            sd = (stds or {}).get(loss_id, {}).get(key)
            cells.append(f"{v:.4f}" + (f" ± {sd:.4f}" if sd else ""))
        if seconds:
            cells.append(f"{seconds.get(loss_id, math.nan):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
