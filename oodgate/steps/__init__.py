"""The pipeline's steps, each a plain function over paths: prepare, train, calibrate, select, evaluate, gate.

Both orchestrators call these and nothing else: the Prefect tasks (``tasks/``) and the DVC stages
(``python -m oodgate <step>``, see ``dvc.yaml``). One implementation per step, so a result of the
flow and of ``dvc repro`` with the same params is the same to the last digit. What each step depends
on, and so when it re-runs, is :mod:`oodgate.steps.inputs`.

Files a step writes, in the directory it is given::

    prepare    id.pt (train/val/test uint8 tensors + stats), ood.pt (the whole OOD sets, grouped), data.json
    train      last.pt (resume state), best.pt (selected weights), history.json, train.json
    calibrate  calibrated.pt (best.pt with the fitted temperature), calibration.json
    select     choice.json (the loss's OOD score, chosen on validation OOD data), selection.json
    evaluate   metrics.json, samples.pt (per-sample arrays for the bootstrap), plots/, evaluation.json

Each step lives in its own module, and the names below are imported on first use, so that a step
loads (and its code version covers) only the code it runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StaleResultError": "results",
    "CorruptResultError": "results",
    "digest": "common",
    "file_digest": "common",
    "inference_device": "common",
    "load_prepared": "common",
    "read_json": "common",
    "write_json": "common",
    "prepare": "prepare_step",
    "model_spec": "train_step",
    "train": "train_step",
    "calibrate": "calibrate_step",
    "select": "select_step",
    "evaluate": "evaluate_step",
    "load_samples": "gate_step",
    "collect": "gate_step",
    "comparison_table": "gate_step",
    "gate": "gate_step",
    "GateReport": "gate_step",
    "LossDecision": "gate_step",
    "gate_markdown": "gate_step",
    "TABLE_COLUMNS": "gate_step",
    "Trained": "results",
    "Calibrated": "results",
    "Evaluated": "results",
    "Selected": "results",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'oodgate.steps' has no attribute {name!r}")
    return getattr(importlib.import_module(f"oodgate.steps.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
