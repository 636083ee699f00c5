"""What each step's result depends on, defined once for both orchestrators.

A step's *inputs record* holds exactly the params keys it reads and the version of the code it runs;
its *fingerprint* adds the upstream results: ::

    train      record(data split keys, model, train less eval-only keys, the loss's method and options,
               seed, numerics, code) + digest of prepared/id.pt
    calibrate  record(calibration, eval_batch_size, device, numerics, code) + the train fingerprint
    select     record(OOD score setting, the method's scores, seeds, eval_batch_size, device, numerics,
               code) + with score: auto, every seed's calibrate fingerprint and the digest of
               prepared/ood.pt (which holds the validation OOD sets); one per loss
    evaluate   record(the method's scores, eval_batch_size, device, numerics, code) + the calibrate
               and select fingerprints + digest of prepared/ood.pt

``numerics`` is :func:`oodgate.base.numerics.fingerprint_record`: the mode, the thread count, the pinned
kernels and the software versions (and, in native mode, the CPU whose kernels computed).

So an OOD score, calibration, an OOD set, the gate or a plot never retrains. The Prefect flow keys its
cache on these fingerprints; the DVC stage ``inputs`` writes the records to ``<workdir>/inputs/`` and
each stage depends on its own record file (plus its upstream outputs), so ``dvc repro`` re-runs a
stage exactly when its record or an upstream output changed.

Code versions hash the syntax tree of the modules a step runs (:data:`STEP_CODE`), without docstrings
or comments: editing ``plots.py`` re-evaluates but never retrains, and editing a docstring re-runs
nothing. ``tests/test_inputs.py`` checks, by tracing each step, that every file it executes is listed.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

from oodgate.base import numerics
from oodgate.base.config import AUTO_SCORE, CheckpointConfig, Config
from oodgate.base.files import digest, file_digest, write_json
from oodgate.learning import methods
from oodgate.learning.importing import CheckpointError, checkpoint_for_seed
from oodgate.learning.models.torchvision_models import WeightsError

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # oodgate/
ID_SECTIONS = (
    "dataset",
    "path",
    "classes",
    "image_size",
    "on_bad_image",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "download",
)
EVAL_ONLY_TRAIN_KEYS = ("eval_batch_size",)  # train.* keys that only calibration/evaluation read

_MODEL = (
    "learning/classifier.py",
    "learning/models/*.py",
    "learning/methods/*.py",
    "learning/scores.py",
    "base/registry.py",
    "data/__init__.py",
    "data/bundle.py",
)
_STEP = (
    "running/steps/reuse.py",
    "base/records.py",
    "base/numerics.py",
    "base/files.py",
    "data/prepared.py",
)
_INFERENCE = (
    *_STEP,
    *_MODEL,
    "learning/training/engine.py",
    "measuring/evaluation.py",
    "measuring/calibration.py",
    "measuring/metrics.py",
)
STEP_CODE: dict[str, tuple[str, ...]] = {
    "prepare": ("running/steps/prepare_step.py", *_STEP, "data/*.py", "base/registry.py"),
    "train": (
        "running/steps/train_step.py",
        "learning/training/*.py",
        *_STEP,
        *_MODEL,
        "learning/importing.py",
    ),
    "calibrate": ("running/steps/calibrate_step.py", *_INFERENCE),
    "select": ("running/steps/select_step.py", *_INFERENCE),
    "evaluate": ("running/steps/evaluate_step.py", *_INFERENCE, "measuring/plots.py"),
    "gate": (
        "running/steps/gate_step.py",
        *_STEP,
        "deciding/*.py",
        "measuring/metrics.py",
        "base/registry.py",
    ),
}


def step_files(step: str) -> list[Path]:
    """The source files whose code ``step`` runs."""
    files = {p for pattern in STEP_CODE[step] for p in PACKAGE_DIR.glob(pattern)}
    return sorted(files)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def _module_version(path: str, mtime_ns: int) -> str:
    tree = _without_docstrings(ast.parse(Path(path).read_text(), filename=path))
    return digest(ast.dump(tree, annotate_fields=False, include_attributes=False))


def code_version(step: str) -> str:
    """Hash of the code ``step`` runs: the syntax trees of :func:`step_files`, docstrings dropped."""
    parts = [
        (p.relative_to(PACKAGE_DIR).as_posix(), _module_version(str(p), p.stat().st_mtime_ns))
        for p in step_files(step)
    ]
    return digest(parts)


def code_versions() -> dict[str, str]:
    """Every step's code version (the flow tags its runs with their digest)."""
    return {step: code_version(step) for step in STEP_CODE}


# ---------------------------------------------------------------- records
def _dump(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def score_setting(cfg: Config, loss_id: str) -> dict[str, Any]:
    """What a loss's OOD score depends on: the setting (``auto``, a name, or null for the method's
    default) and the method's scores, the candidates ``auto`` chooses among (the validation OOD
    sets are in the prepared ``ood.pt``, whose digest is in the evaluate fingerprint)."""

    loss = cfg.losses[loss_id]
    return {"score": loss.score, "candidates": list(methods.METHODS.get(loss.method).scores)}


def weights_digest(cfg: Config) -> str | None:
    """The digest of ``model.weights``' bytes (training restarts when the file changes), or None."""
    if cfg.model.weights is None:
        return None

    try:
        return file_digest(cfg.model.weights)
    except OSError as e:
        raise WeightsError(
            f"model.weights: {cfg.model.weights!r} cannot be read ({e.strerror or e}); give a local file "
            "written by torch.save(model.state_dict(), path)"
        ) from None


def numerics_inputs(cfg: Config) -> dict[str, Any]:
    """What a result computed under ``cfg.numerics`` depends on (:func:`oodgate.base.numerics.fingerprint_record`)."""

    return numerics.fingerprint_record(cfg.numerics.mode, cfg.numerics.threads)


def prepare_inputs(cfg: Config) -> dict[str, Any]:
    # data.root: the bytes are data.dvc's; data.workers: how many processes decode, not what
    data = {k: v for k, v in _dump(cfg)["data"].items() if k not in ("root", "workers")}
    return {"step": "prepare", "data": data, "code": code_version("prepare")}


def checkpoint_digest(cfg: Config, loss_id: str, seed: int) -> str:
    """The digest of the bytes of the checkpoint a loss imports for ``seed``."""

    path = checkpoint_for_seed(cast(CheckpointConfig, cfg.losses[loss_id].checkpoint).path, seed)
    try:
        return file_digest(path)
    except OSError as e:
        raise CheckpointError(
            f"losses.{loss_id}.checkpoint: {path!r} cannot be read ({e.strerror or e}); give the file's path, "
            "relative to the project"
        ) from None


def train_inputs(cfg: Config, loss_id: str, seed: int) -> dict[str, Any]:
    d = _dump(cfg)
    loss = d["losses"][loss_id]
    if loss.get("checkpoint") is not None:
        # imported, not trained: the file's bytes, its format and normalisation, the declared
        # architecture and method, and the class selection (the head's size); no training keys
        c = loss["checkpoint"]
        return {
            "step": "import",
            "data": {k: d["data"][k] for k in ID_SECTIONS},
            "model": {k: v for k, v in d["model"].items() if k != "weights"},
            "checkpoint": {
                "digest": checkpoint_digest(cfg, loss_id, seed),
                "format": c["format"],
                "mean": c["mean"],
                "std": c["std"],
            },
            "method": loss["method"],
            "options": loss["options"],
            "seed": seed,
            "numerics": numerics_inputs(cfg),
            "code": code_version("train"),
        }
    return {
        "step": "train",
        "data": {k: d["data"][k] for k in ID_SECTIONS},
        "model": {k: v for k, v in d["model"].items() if k != "weights"},  # its bytes, not its path:
        "weights": weights_digest(cfg),
        "train": {k: v for k, v in d["train"].items() if k not in EVAL_ONLY_TRAIN_KEYS},
        "method": loss["method"],
        "options": loss["options"],
        "seed": seed,
        "numerics": numerics_inputs(cfg),
        "code": code_version("train"),
    }


def _inference(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    return {"eval_batch_size": t.eval_batch_size, "device": t.device, "amp": t.amp}


def calibrate_inputs(cfg: Config, loss_id: str, seed: int) -> dict[str, Any]:
    return {
        "step": "calibrate",
        "calibration": _dump(cfg)["calibration"],
        **_inference(cfg),
        "numerics": numerics_inputs(cfg),
        "code": code_version("calibrate"),
    }


def _chooses(cfg: Config, loss_id: str) -> bool:
    """Whether a loss's score is chosen on validation OOD data (``auto`` with ``data.ood_val``)."""
    return cfg.losses[loss_id].score == AUTO_SCORE and bool(cfg.data.ood_val)


def select_inputs(cfg: Config, loss_id: str) -> dict[str, Any]:
    record = {"step": "select", **score_setting(cfg, loss_id), "code": code_version("select")}
    if _chooses(cfg, loss_id):  # the choice is computed from the seeds' models
        record.update(seeds=cfg.seeds_of(loss_id), **_inference(cfg), numerics=numerics_inputs(cfg))
    return record


def evaluate_inputs(cfg: Config, loss_id: str, seed: int) -> dict[str, Any]:
    return {
        "step": "evaluate",
        # the setting (its choice comes with the select fingerprint) and the candidates, each of which
        # has its test figures reported
        **score_setting(cfg, loss_id),
        **_inference(cfg),
        "numerics": numerics_inputs(cfg),
        "code": code_version("evaluate"),
    }


def gate_inputs(cfg: Config) -> dict[str, Any]:
    return {
        "step": "gate",
        "gate": _dump(cfg)["gate"],
        "losses": cfg.loss_ids(),
        "seeds": list(cfg.seeds),
        "numerics": numerics_inputs(cfg),
        "code": code_version("gate"),
    }


# ---------------------------------------------------------------- fingerprints
def prepare_fingerprint(cfg: Config, data_version: str) -> str:
    return digest([prepare_inputs(cfg), data_version])


def train_fingerprint(cfg: Config, loss_id: str, seed: int, id_digest: str) -> str:
    return digest([train_inputs(cfg, loss_id, seed), id_digest])


def calibrate_fingerprint(cfg: Config, loss_id: str, seed: int, train_fp: str) -> str:
    return digest([calibrate_inputs(cfg, loss_id, seed), train_fp])


def select_fingerprint(cfg: Config, loss_id: str, calibrate_fps: list[str], ood_digest: str) -> str:
    """``auto`` depends on every seed's calibrated model and on the validation OOD sets (in
    ``ood.pt``); a named or default score on neither, so that its seeds stay independent."""
    if _chooses(cfg, loss_id):
        return digest([select_inputs(cfg, loss_id), calibrate_fps, ood_digest])
    return digest([select_inputs(cfg, loss_id)])


def evaluate_fingerprint(
    cfg: Config, loss_id: str, seed: int, calibrate_fp: str, select_fp: str, ood_digest: str
) -> str:
    return digest([evaluate_inputs(cfg, loss_id, seed), calibrate_fp, select_fp, ood_digest])


@dataclass(frozen=True)
class Expected:
    """What the current config and prepared data give one (loss, seed): each step's inputs record
    and fingerprint."""

    inputs: dict[str, dict[str, Any]]
    fingerprint: dict[str, str]


def expected(cfg: Config, loss_id: str, seed: int, prepared_dir: str | Path) -> Expected:
    """Train, calibrate, select (the loss's, over all its seeds) and evaluate of one (loss, seed)."""

    prepared_dir = Path(prepared_dir)
    id_digest, ood_digest = file_digest(prepared_dir / "id.pt"), file_digest(prepared_dir / "ood.pt")

    def calibrated(s: int) -> tuple[str, str]:
        t = train_fingerprint(cfg, loss_id, s, id_digest)
        return t, calibrate_fingerprint(cfg, loss_id, s, t)

    t, c = calibrated(seed)
    sel = select_fingerprint(cfg, loss_id, [calibrated(s)[1] for s in cfg.seeds_of(loss_id)], ood_digest)
    e = evaluate_fingerprint(cfg, loss_id, seed, c, sel, ood_digest)
    inputs = {
        "train": train_inputs(cfg, loss_id, seed),
        "calibrate": calibrate_inputs(cfg, loss_id, seed),
        "select": select_inputs(cfg, loss_id),
        "evaluate": evaluate_inputs(cfg, loss_id, seed),
    }
    return Expected(inputs, {"train": t, "calibrate": c, "select": sel, "evaluate": e})


# ---------------------------------------------------------------- the DVC stage `inputs`
def write_inputs(cfg: Config, out_dir: str | Path) -> list[Path]:
    """``<out_dir>/prepare.json``, ``<step>/<loss>/seed<k>.json`` for train, calibrate and evaluate,
    ``select/<loss>.json`` and ``gate.json``: the records the DVC stages depend on. The directory is
    rewritten whole."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    written = [write_json(out_dir / "prepare.json", prepare_inputs(cfg))]
    records = {"train": train_inputs, "calibrate": calibrate_inputs, "evaluate": evaluate_inputs}
    for loss_id in cfg.loss_ids():
        written.append(write_json(out_dir / "select" / f"{loss_id}.json", select_inputs(cfg, loss_id)))
        for seed in cfg.seeds:
            for step, record in records.items():
                written.append(
                    write_json(out_dir / step / loss_id / f"seed{seed}.json", record(cfg, loss_id, seed))
                )
    written.append(write_json(out_dir / "gate.json", gate_inputs(cfg)))
    return written
