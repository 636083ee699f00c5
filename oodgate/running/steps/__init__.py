"""The pipeline's steps, each a plain function over paths: prepare, train, calibrate, select, evaluate, gate.

Both orchestrators call these and nothing else: the Prefect tasks (``tasks/``) and the DVC stages
(``python -m oodgate <step>``, see ``dvc.yaml``). One implementation per step, so a result of the
flow and of ``dvc repro`` with the same params is the same to the last digit. What each step depends
on, and so when it re-runs, is :mod:`oodgate.running.steps.inputs`.

Files a step writes, in the directory it is given::

    prepare    id.pt (train/val/test uint8 tensors + stats), ood.pt (the whole OOD sets, grouped), data.json
    train      last.pt (resume state), best.pt (selected weights), history.json, train.json
    calibrate  calibrated.pt (best.pt with the fitted temperature), calibration.json
    select     choice.json (the loss's OOD score, chosen on validation OOD data), selection.json
    evaluate   metrics.json, samples.pt (per-sample arrays for the bootstrap), plots/, evaluation.json

Each step lives in its own module; the names below are the steps' public face.
"""

from oodgate.base.files import digest, file_digest, read_json, write_json
from oodgate.base.records import (
    Calibrated,
    CorruptResultError,
    Evaluated,
    Selected,
    StaleResultError,
    Trained,
)
from oodgate.data.prepared import load_prepared
from oodgate.learning.training.engine import inference_device
from oodgate.running.steps.calibrate_step import calibrate
from oodgate.running.steps.evaluate_step import evaluate
from oodgate.running.steps.gate_step import (
    TABLE_COLUMNS,
    GateReport,
    LossDecision,
    collect,
    comparison_table,
    gate,
    gate_markdown,
    load_samples,
)
from oodgate.running.steps.prepare_step import prepare
from oodgate.running.steps.select_step import select
from oodgate.running.steps.train_step import model_spec, train

__all__ = [
    "TABLE_COLUMNS",
    "Calibrated",
    "CorruptResultError",
    "Evaluated",
    "GateReport",
    "LossDecision",
    "Selected",
    "StaleResultError",
    "Trained",
    "calibrate",
    "collect",
    "comparison_table",
    "digest",
    "evaluate",
    "file_digest",
    "gate",
    "gate_markdown",
    "inference_device",
    "load_prepared",
    "load_samples",
    "model_spec",
    "prepare",
    "read_json",
    "select",
    "train",
    "write_json",
]
