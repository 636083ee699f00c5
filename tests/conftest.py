"""Shared fixtures: the embedded data materialised once per session, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from oodgate.base import numerics
from oodgate.base.project import telemetry_off

# Nothing phones home from the test suite.
telemetry_off()
# The default numerics (portable, 2 threads), in force before torch loads: the tests' in-process
# steps compute as the pipeline's processes do, and their subprocesses inherit them.
numerics.apply()
# Several test processes share the cores: OpenMP's threads must sleep while they wait instead of
# spinning, or each training burns the cores the others need (three concurrent trainings: 61 s
# spinning, 15 s passive). The wait policy changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
# What oodgate.base.numerics sets: a user's shell has none of it, so the entry points must set it themselves.
NUMERICS_VARIABLES = (
    numerics.MARKER,
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "NPY_ENABLE_CPU_FEATURES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


def shell_env(**extra: str) -> dict[str, str]:
    """This process's environment as a user's shell has it: without the numerics pins."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in NUMERICS_VARIABLES}
    env.update(extra)
    return env


def interrupted_after(epochs: int, train) -> None:
    """``train(hooks)`` stopped as by a SIGINT once epoch ``epochs`` is done: a hook sets
    ``oodgate.learning.training.engine.STOP`` after that epoch, the loop raises TrainingInterrupted in the next one's
    first batch, and STOP is cleared for what runs next. Leaves that epoch's ``last.pt``."""
    from oodgate.learning.training import engine

    class StopAfter(engine.Hook):
        def after_epoch(self, run, stats) -> None:
            if stats.epoch == epochs:
                engine.STOP.set("test")

    try:
        with pytest.raises(engine.TrainingInterrupted, match=rf"at epoch {epochs + 1}, batch 1"):
            train((StopAfter(),))
    finally:
        engine.STOP.clear()


@pytest.fixture(scope="session", autouse=True)
def _shared_tmp(tmp_path_factory) -> None:
    """Where files made once per test run live (stack.migrated_prefect_db): the directory all xdist
    workers' temporary directories are in, which pytest's retention cleans up."""
    base = tmp_path_factory.getbasetemp()
    os.environ["OODGATE_TEST_SHARED_TMP"] = str(
        base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    )


@pytest.fixture(scope="session")
def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> Path:
    from oodgate.data.embedded import materialize_embedded

    root = tmp_path_factory.mktemp("data")
    materialize_embedded(root)
    return root


def tiny_params(root: Path | str, workdir: Path | str, **train) -> dict:
    """A configuration that trains in about a second per method on the embedded data."""
    return {
        "seeds": [0],
        "data": {
            "dataset": "embedded_mnist",
            "root": str(root),
            "classes": [0, 1, 2],
            "ood": ["mnist_unseen", "gaussian_noise"],
            "ood_val": ["glyphs"],  # score: auto chooses on it
            "val_fraction": 0.1,
            "test_fraction": 0.2,
            "ood_size": 100,
        },
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "milestones": [], "warmup_epochs": 0, **train},
        "losses": {
            "softmax": {"method": "softmax"},
            "dismax_fpr": {"method": "dismax", "options": {"fpr": True}},
        },
        # one seed: no evidence to weigh, so the gate compares means (tests that weigh the evidence
        # set two seeds and gate.confidence)
        "gate": {"confidence": None},
        "workdir": str(workdir),
    }


@pytest.fixture
def tiny_config(embedded_root, tmp_path):
    from oodgate.base.config import parse_config

    return parse_config(tiny_params(embedded_root, tmp_path / "artifacts"))


@pytest.fixture(scope="session")
def prepared_dir(embedded_root, tmp_path_factory) -> Path:
    from oodgate.base.config import parse_config
    from oodgate.running import steps

    out = tmp_path_factory.mktemp("prepared")
    steps.prepare(parse_config(tiny_params(embedded_root, out / "w")), out)
    return out


def _run(cmd: list[str], cwd: Path) -> None:
    import subprocess

    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def project_template(tmp_path_factory, embedded_root) -> Path:
    """A project directory as a user has it after `make data`: data/, data.dvc, .dvc/, params.yaml."""
    import shutil
    import sys

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(embedded_root, root / "data")
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "init", "--no-scm", "-q"], root)
    _run([*dvc, "config", "core.analytics", "false"], root)
    _run([*dvc, "add", "-q", "data"], root)
    params = tiny_params("data", "artifacts", epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture
def project(project_template, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "project"
    shutil.copytree(project_template, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """One migrated SQLite tracking database per session; tests copy it (migrations are slow and racy)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_db(mlflow_template, tmp_path, monkeypatch) -> str:
    import shutil

    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def evaluate_one(cfg, loss_id: str, seed: int, calibrate_dir, prepared_dir, out_dir, **kwargs):
    """The select step and the evaluate step, as a test of one (loss, seed) needs them: the config
    restricted to that seed (the score is chosen on its model alone, next to ``out_dir``), then the
    evaluation."""
    from pathlib import Path

    from oodgate.running import steps

    one = cfg.model_copy(update={"seeds": [seed]})
    select_dir = Path(out_dir).parent / f"{Path(out_dir).name}-select"
    steps.select(one, loss_id, {seed: calibrate_dir}, prepared_dir, select_dir)
    return steps.evaluate(one, loss_id, seed, calibrate_dir, prepared_dir, out_dir, select_dir, **kwargs)
