"""The full-scale configuration's code path on the CPU: ``params/cifar10_resnet34.yaml`` through the
flow, with tiny CIFAR-10, CIFAR-100 and SVHN files written in the exact on-disk formats torchvision
reads, for 1 epoch. It exercises what the embedded default never does: ResNet-34, three-channel
normalisation, crop+flip augmentation, torchvision's dataset classes, the SVHN/CIFAR-100 OOD sets,
the gate and a registered ResNet model.

Mocked, because it cannot run here: the real files (a download) and so torchvision's MD5 check of
them (``check_integrity``), and the GPU (the config's ``device: auto`` resolves to the CPU).
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 10  # CIFAR-10 training images per class (100 in all, 1 per class held out for validation)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """CIFAR's rows: (N, 3072) uint8, channel-major 32x32 planes."""
    return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    """``cifar-10-batches-py``: five training batches, a test batch, ``batches.meta`` (pickles)."""
    d = root / "cifar-10-batches-py"
    labels = np.repeat(np.arange(10), PER_CLASS)
    rng.shuffle(labels)
    for i, part in enumerate(np.array_split(labels, 5), start=1):
        _pickle(d / f"data_batch_{i}", {"data": _images(rng, len(part)), "labels": part.tolist()})
    test = np.repeat(np.arange(10), 2)
    _pickle(d / "test_batch", {"data": _images(rng, len(test)), "labels": test.tolist()})
    _pickle(d / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})


def write_cifar100(root: Path, rng: np.random.Generator) -> None:
    """``cifar-100-python``: ``train``, ``test`` and ``meta`` with fine and coarse labels."""
    d = root / "cifar-100-python"
    for split, n in (("train", 20), ("test", 20)):
        fine = rng.integers(0, 100, n)
        _pickle(
            d / split,
            {"data": _images(rng, n), "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()},
        )
    _pickle(
        d / "meta",
        {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"c{i}" for i in range(20)],
        },
    )


def write_svhn(root: Path, rng: np.random.Generator) -> None:
    """``train_32x32.mat`` / ``test_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 (10 is 0)."""
    from scipy.io import savemat

    for split, n in (("train", 20), ("test", 20)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


@pytest.fixture
def cifar_project(tmp_path, monkeypatch) -> Path:
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    root = tmp_path / "project"
    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_cifar10(data, rng)
    write_cifar100(data, rng)
    write_svhn(data, rng)
    from oodgate.data.embedded import materialize_embedded

    materialize_embedded(data)  # the validation OOD sets the config names (glyphs, portrait patches)
    # the only mock: the MD5s torchvision expects are those of the real files
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *a, **k: True)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"], ["add", "-q", "data"]):
        subprocess.run([*dvc, *cmd], cwd=root, check=True, capture_output=True, text=True)
    shutil.copyfile(REPO / "params" / "cifar10_resnet34.yaml", root / "params.yaml")
    return root


# Two of the config's losses (the baseline; DisMax: a distance head, with its mosaics) keep the
# suite short; a head is the same code on any backbone, and every method trains in test_engine.
LOSSES = ("softmax", "dismax_fpr")
# One seed and the means-only gate: the evidence over seeds is the same code on any backbone
# (tests/test_gate.py, and the flow with two seeds in tests/test_pipeline.py).
OVERRIDES = {
    "train.epochs": 1,
    "train.milestones": [],
    "data.ood_size": 20,
    "seeds": [0],
    "gate.confidence": None,
}


@pytest.mark.slow
def test_cifar10_resnet34_config_runs_through_the_flow_on_tiny_files(
    prefect_harness, cifar_project, mlflow_db, capsys
):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from oodgate.base.config import load_config
    from oodgate.running import steps

    full = yaml.safe_load((cifar_project / "params.yaml").read_text())["losses"]
    overrides = {**OVERRIDES, "losses": {k: full[k] for k in LOSSES}}
    cfg = load_config(cifar_project / "params.yaml", overrides)
    assert (cfg.model.backbone, cfg.data.dataset, cfg.train.augment) == ("resnet34", "cifar10", "crop_flip")
    t0 = time.perf_counter()
    outcome = pipeline(root=str(cifar_project), overrides=overrides)
    seconds = time.perf_counter() - t0

    prepared = next((cifar_project / "artifacts" / "cache").glob("prepared-*"))
    summary = steps.read_json(prepared / "data.json")
    assert summary["sizes"] == {
        "train": 90,
        "val": 10,
        "test": 20,
        "ood/svhn": 20,  # every OOD image is a test image
        "ood/cifar100": 20,
        "ood/gaussian_noise": 20,
        "ood/uniform_noise": 20,
        "ood_val/glyphs": 20,  # 28x28 gray, brought to the 32x32 RGB of the data
        "ood_val/portrait_patches": 20,
    }
    assert summary["sizes"] and steps.load_prepared(prepared).ood_groups == {
        "svhn": "far",  # house numbers are not object photos
        "cifar100": "near",
        "gaussian_noise": "far",
        "uniform_noise": "far",
    }
    assert (summary["in_channels"], summary["image_size"], len(summary["mean"])) == (3, 32, 3)
    assert summary["class_names"] == [f"class{i}" for i in range(10)]

    runs = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(cfg.registry.experiment).experiment_id],
        "tags.`oodgate.role` != 'pipeline'",
    )
    assert {r.data.tags["oodgate.loss"] for r in runs} == set(cfg.losses)
    assert all(r.info.status == "FINISHED" for r in runs) and not outcome.failed
    assert set(outcome.report.decisions) == set(cfg.losses) - {"softmax"}
    for r in runs:
        assert r.data.tags["oodgate.device"] == "cpu"
        assert "ood/svhn/fpr95" in r.data.metrics and "ood/cifar100/fpr95" in r.data.metrics
    # whatever the gate decided on random images, a logged ResNet-34 model serves CIFAR-shaped input
    model = mlflow.pyfunc.load_model(runs[0].data.tags["oodgate.model_uri"])
    table = model.predict(torch.rand(2, 3, 32, 32).numpy())
    assert list(table.columns)[:2] == ["p_class0", "p_class1"] and len(table) == 2
    print(
        f"full-scale config, tiny files, {len(cfg.losses)} losses x 1 epoch of ResNet-34 on the CPU: {seconds:.1f} s"
    )
