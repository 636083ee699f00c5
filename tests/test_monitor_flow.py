"""The monitoring flow end to end with real parts: a model trained here (SoftMax, 4 epochs on the
embedded digits 0-5), logged and registered by the pipeline's own functions in a real SQLite MLflow
store, a real Prefect server (the session's test harness), batches written by `make monitor`'s demo
code. The scheduled monitoring deployment itself is exercised in test_deployment.py.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import evaluate_one
from mlflow.tracking import MlflowClient
from stack import REPO, free_port, read_events

from tasks.registry import serialised

pytestmark = pytest.mark.slow
MODEL = "oodgate-classifier"


@dataclass
class Project:
    root: Path
    batches: dict[str, Path]
    model_uri: str

    @property
    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}")

    def batch_runs(self) -> list:
        exp = self.mlflow.get_experiment_by_name("oodgate-monitor")
        if exp is None:
            return []
        return self.mlflow.search_runs(
            [exp.experiment_id],
            filter_string="tags.`oodgate.role` = 'monitor-batch'",
            order_by=["attributes.start_time ASC"],
        )


@contextlib.contextmanager
def _store(root: Path):
    """The project's tracking store for this block; MLflow's set_tracking_uri also writes
    MLFLOW_TRACKING_URI into the environment, which is restored afterwards."""
    from oodgate_mlflow import tracking

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        tracking.connect(root=root)
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, embedded_root, mlflow_template, prefect_harness) -> Project:
    from flows.monitor import write_demo_batches
    from oodgate.base.config import parse_config
    from oodgate.running import steps
    from oodgate_mlflow import registry, tracking
    from oodgate_mlflow.runs import PipelineRun
    from tasks.track import package_model

    root = tmp_path_factory.mktemp("monitored")
    shutil.copy(mlflow_template, root / "mlflow.db")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(embedded_root)
    # A champion that tells the demo batch's noise from digits (so that the alert path runs): the
    # width-32 CNN for 4 epochs without warm-up flags over 10% of the shifted batch; the default
    # width-16 one accepts most of that noise.
    raw["model"]["options"] = {"width": 32}
    raw["train"].update(epochs=4, milestones=[3], warmup_epochs=0)
    raw["losses"] = {"softmax": {"method": "softmax"}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = parse_config(raw)
    work = root / "artifacts"
    steps.prepare(cfg, work / "prepared")
    trained = steps.train(cfg, "softmax", 0, work / "prepared", work / "train")
    calibrated = steps.calibrate(cfg, "softmax", 0, work / "train", work / "prepared", work / "calibrate")
    evaluated = evaluate_one(cfg, "softmax", 0, work / "calibrate", work / "prepared", work / "evaluate")
    with _store(root):
        exp = tracking.ensure_experiment("oodgate", root)
        run_id = tracking.start_run(exp, "softmax", {"oodgate.loss": "softmax"})
        packaged = package_model.fn("softmax", [trained], [calibrated], [evaluated], str(work / "package"))
        run = PipelineRun(exp, run_id, {}, str(work / "cache"), 0)
        logged = run.log_loss(run_id, "softmax", [trained], [calibrated], [evaluated], packaged, "")
        candidate = registry.Candidate(
            loss="softmax",
            model_uri=logged.model_uri,
            run_id=run_id,
            fingerprint=logged.model_fingerprint,
            promote=True,  # a champion to monitor with: the gate is not under test here
            reasons=(),
            tests={},
        )
        registry.register(MODEL, candidate, serialised(MODEL, work / ".lock"))
    paths = write_demo_batches(root / "params.yaml", root / "incoming")
    return Project(root, {p.stem: p for p in paths}, logged.model_uri)


def _monitor(project: Project, batch: Path | str, **overrides):
    from flows.monitor import monitor

    return monitor(batch=str(batch), root=str(project.root), overrides=overrides or None)


def test_in_distribution_images_raise_no_alert(project):
    s = _monitor(project, project.batches["in_distribution"])
    assert s["test"]["alert"] == "none", s["test"]
    assert 0.02 <= s["ood_rate"] <= 0.09 and s["n"] == 600
    assert s["champion_version"] == 1 and s["test"]["method"] == "beta_binomial"
    table = pd.read_parquet(s["predictions"])
    assert list(table.columns[:3]) == ["image", "p_0", "confidence"]
    assert {"predicted", "score", "in_distribution"} <= set(table.columns) and len(table) == 600
    assert table["in_distribution"].mean() == pytest.approx(1 - s["ood_rate"])
    (run,) = project.batch_runs()
    assert run.data.tags["oodgate.monitor.alert"] == "none"
    assert run.data.tags["oodgate.champion_version"] == "1"
    assert run.data.metrics["ood_rate"] == pytest.approx(s["ood_rate"])
    assert run.data.metrics["class_count/3"] == (table["predicted"] == "3").sum()
    names = {a.path for a in project.mlflow.list_artifacts(run.info.run_id)}
    assert names == {"predictions.parquet", "report.md", "scores.png", "summary.json"}


def test_a_quarter_of_noise_and_photo_patches_raises_the_alert(project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL

    s = _monitor(project, project.batches["shifted"])
    assert s["test"]["alert"] == "high" and s["test"]["p_value"] < 1e-3, s["test"]
    assert s["ood_rate"] > 0.10
    run = project.batch_runs()[-1]
    assert run.data.tags["oodgate.monitor.alert"] == "high"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["monitor-report"]))
        )
    assert any("ALERT (more OOD than expected)" in a.data and "shifted.npz" in a.data for a in artifacts)
    # the event an automation triggers on, as the Prefect server stored it
    (event,) = read_events(PREFECT_API_URL.value(), "oodgate.monitor.alert")
    assert event["resource"]["prefect.resource.id"] == f"oodgate.model.{MODEL}"
    assert event["payload"]["alert"] == "high" and event["payload"]["mlflow_run_id"] == run.info.run_id


def test_history_has_one_step_per_batch_and_a_rescored_batch_adds_nothing(project):
    before = len(project.batch_runs())
    again = _monitor(project, project.batches["in_distribution"])
    assert len(project.batch_runs()) == before  # the same batch and champion version: not logged twice
    assert again["champion_version"] == 1 and again["reused"] is True
    exp = project.mlflow.get_experiment_by_name("oodgate-monitor")
    (history,) = project.mlflow.search_runs([exp.experiment_id], "tags.`oodgate.role` = 'monitor-history'")
    steps = [m.step for m in project.mlflow.get_metric_history(history.info.run_id, "ood_rate")]
    assert steps == list(range(before))
    assert {r.data.tags["mlflow.parentRunId"] for r in project.batch_runs()} == {history.info.run_id}


def test_a_new_champion_version_is_recorded(project):
    import mlflow

    from oodgate_mlflow import registry

    with _store(project.root):
        v2 = mlflow.register_model(project.model_uri, MODEL)
        registry.record_files(MODEL, v2)  # what the registry records for every version it adds
    project.mlflow.set_registered_model_alias(MODEL, "champion", v2.version)
    s = _monitor(project, project.batches["in_distribution"])
    assert s["champion_version"] == int(v2.version) == 2
    assert project.batch_runs()[-1].data.tags["oodgate.champion_version"] == "2"
    assert Path(s["predictions"]).name.endswith("-v2.parquet")


def test_a_dvc_tracked_folder_of_images_is_scored_and_its_dvc_hash_recorded(project):
    """A folder of PNGs versioned with `dvc add`: scored image by image, the run records the hash in
    its .dvc file; once removed from the workspace it is refused with the command that brings it back."""
    import torch
    from PIL import Image

    from oodgate.watching.monitoring import BatchError

    folder = project.root / "pngs"
    folder.mkdir()
    test_x = torch.load(project.root / "artifacts" / "prepared" / "id.pt", weights_only=True)["test"]["x"]
    for i in range(40):
        Image.fromarray(test_x[i, 0].numpy()).save(folder / f"img{i:03d}.png")
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"], ["add", "-q", "pngs"]):
        subprocess.run([*dvc, *args], cwd=project.root, check=True, capture_output=True)
    md5 = yaml.safe_load((project.root / "pngs.dvc").read_text())["outs"][0]["md5"]
    s = _monitor(project, "pngs")  # relative to the project directory
    assert s["n"] == 40 and s["batch"] == str(folder)
    run = project.batch_runs()[-1]
    assert run.data.tags["oodgate.batch_dvc_md5"] == md5
    table = pd.read_parquet(s["predictions"])
    assert table["image"].tolist() == [f"img{i:03d}.png" for i in range(40)]
    shutil.rmtree(folder)
    with pytest.raises(
        BatchError, match=r"tracked by DVC \(pngs.dvc\) but not in the workspace; run `dvc pull"
    ):
        _monitor(project, "pngs")
    subprocess.run([*dvc, "checkout", "-q", "pngs"], cwd=project.root, check=True, capture_output=True)
    assert _monitor(project, "pngs")["mlflow_run_id"] == run.info.run_id  # the same batch: not logged again


def _snapshot(project: Project) -> tuple[dict[str, bytes], int]:
    out = project.root / "artifacts" / "monitor"
    files = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else {}
    return files, len(project.batch_runs())


@pytest.mark.parametrize(
    "write, error",
    [
        (lambda d: np.savez(d / "bad.npz", x=np.zeros((0, 28, 28), np.uint8)), "holds no images"),
        (lambda d: np.savez(d / "bad.npz", x=np.zeros((4, 32, 32, 3), np.uint8)), "28x28 grayscale"),
    ],
)
def test_a_failed_batch_changes_nothing(project, tmp_path, write, error):
    from oodgate.watching.monitoring import BatchError

    before = _snapshot(project)
    write(tmp_path)
    with pytest.raises(BatchError, match=error):
        _monitor(project, tmp_path / "bad.npz")
    assert _snapshot(project) == before


def test_a_batch_over_monitor_max_images_is_refused_by_the_flow_and_changes_nothing(project, tmp_path):
    """`--set monitor.max_images=N` reaches the reading of the batch: a 381 KB .npz of 500,000 zero
    images used to be read whole (363 s, 4.6 GB)."""
    from oodgate.watching.monitoring import BatchError

    before = _snapshot(project)
    np.savez_compressed(tmp_path / "big.npz", x=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(
        BatchError,
        match=r"big\.npz' \(its header: array 'x' uint8 of shape \(4, 28, 28\)\) holds 4 images, more than "
        r"monitor\.max_images=3; split the batch .* --set monitor\.max_images=N$",
    ):
        _monitor(project, tmp_path / "big.npz", **{"monitor.max_images": 3})
    assert _snapshot(project) == before


def test_a_missing_alias_names_the_model_and_its_versions(project):
    from oodgate_mlflow.champion import ChampionNotFoundError

    with pytest.raises(
        ChampionNotFoundError, match=r"has no version with alias 'production' \(versions: 1, 2\)"
    ):
        _monitor(project, project.batches["in_distribution"], **{"monitor.alias": "production"})


def test_cli_errors_before_any_work(project, monkeypatch, capsys):
    """`python -m flows.monitor` (its main, in this process): an unreachable tracking server and a
    missing batch are refused with exit code 2 and one line, before Prefect starts or anything is written."""
    from flows.monitor import main

    before = _snapshot(project)
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    assert main(["--root", str(project.root), "--batch", str(project.batches["shifted"])]) == 2
    assert f"cannot reach the MLflow tracking server at {url}" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["--root", str(project.root)]) == 2
    assert "no batch to score: pass --batch PATH" in capsys.readouterr().err
    assert _snapshot(project) == before


def test_a_refused_batch_or_model_is_one_line_before_the_flow_starts(project, tmp_path, capsys):
    """`make monitor` on a batch with NaN pixels, or with a champion whose files were changed in the
    artifact store: exit 2 and one `error:` line (it used to print 80 to 140 lines of Prefect's
    tracebacks of the failed flow run first); nothing is written or logged."""
    import shutil

    from flows.monitor import main

    before = _snapshot(project)
    x = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    x[0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    with _store(project.root):
        assert main(["--root", str(project.root), "--batch", str(tmp_path / "nan.npz")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: batch '{tmp_path / 'nan.npz'}': 1 pixel values are NaN")
        and err.count("\n") == 1
    )
    (meta,) = [p for p in (project.root / "mlartifacts").rglob("meta.json") if "models" in p.parts]
    saved = tmp_path / "meta.json"
    shutil.copyfile(meta, saved)
    try:
        meta.write_text(meta.read_text().replace("]", ", 0]", 1))
        with _store(project.root):
            assert main(["--root", str(project.root), "--batch", str(project.batches["shifted"])]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: model '{MODEL}' version ")
            and "meta.json is not the file registered" in err
        )
        assert err.count("\n") == 1 and "Traceback" not in err
    finally:
        shutil.copyfile(saved, meta)
    assert _snapshot(project) == before


def test_a_model_logged_without_its_reference_gets_the_binomial_test_only(project):
    """A version logged without validation scores (by hand, or by an older oodgate): the
    beta-binomial test is refused with the fix; the binomial test scores it, without a score plot."""
    import mlflow
    import torch

    from flows.monitor import MonitorError
    from oodgate.learning.classifier import load_classifier
    from oodgate.learning.serving import ServingModel
    from oodgate_mlflow import registry, tracking

    model = load_classifier(project.root / "artifacts" / "calibrate" / "calibrated.pt")
    with _store(project.root):
        run_id = tracking.start_run(tracking.ensure_experiment("oodgate", project.root), "by-hand", {})
        example = torch.rand((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
        uri = tracking.log_model(run_id, ServingModel(model, 0.9), example, list(model.spec.class_names))
        registered = mlflow.register_model(uri, MODEL)
        registry.record_files(MODEL, registered)  # what the registry records for every version it adds
        version = registered.version
    project.mlflow.set_registered_model_alias(MODEL, "champion", version)
    with pytest.raises(
        MonitorError, match=rf"{MODEL} v{version} carries no validation scores.*monitor.test: binomial"
    ):
        _monitor(project, project.batches["shifted"])
    s = _monitor(project, project.batches["shifted"], **{"monitor.test": "binomial"})
    assert s["champion_version"] == int(version) and s["test"]["method"] == "binomial"
    assert s["test"]["expected"] == pytest.approx(0.05)
    names = {a.path for a in project.mlflow.list_artifacts(s["mlflow_run_id"])}
    assert names == {"predictions.parquet", "report.md", "summary.json"}
