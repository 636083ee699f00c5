"""The Prefect flow end to end on a tiny budget, the tasks through ``.fn``, the registry and every fault.

Real parts throughout: a Prefect test server (one per session), a temporary SQLite MLflow
database per test, DVC on a temporary project, the embedded data.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params
from mlflow.tracking import MlflowClient

from oodgate.base.config import ConfigError, load_config
from oodgate.learning import methods
from oodgate.learning.methods.softmax import SoftMaxHead
from oodgate.running import steps
from oodgate_mlflow import registry, tracking
from tasks.caching import Job
from tasks.data import DataVersionError, check_data
from tasks.registry import serialised
from tasks.train import train_model

pytestmark = pytest.mark.slow


def _runs(name: str | None = None, status: str | None = None):
    c = MlflowClient()
    exp = c.get_experiment_by_name("oodgate")
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], max_results=500)
    return [
        r
        for r in runs
        if (name is None or r.info.run_name == name) and (status is None or r.info.status == status)
    ]


def _pipeline(project: Path, **overrides):
    from flows.pipeline import pipeline

    return pipeline(root=str(project), overrides=overrides or None)


@pytest.fixture
def first_run(prefect_harness, project, mlflow_db):
    t0 = time.perf_counter()
    result = _pipeline(project)
    return project, result, time.perf_counter() - t0


# ------------------------------------------------------------------ end to end
def test_flow_end_to_end_logs_gates_and_registers_and_a_second_run_reuses_it(first_run):
    project, result, _ = first_run
    parent = MlflowClient().get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    for tag in ("git_commit", "code_version", "data_version", "prefect_flow_run_id"):
        assert parent.data.tags[f"oodgate.{tag}"]
    assert parent.data.tags["oodgate.data_version"].endswith(".dir")
    assert parent.data.params["train.epochs"] == "1" and parent.data.params["gate.baseline"] == "softmax"
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison_table.md"} <= artifacts

    children = {
        r.info.run_name: r for r in _runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"softmax", "dismax_fpr"}
    for loss_id, run in children.items():
        m, tags = run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED"
        for key in (
            "test/accuracy",
            "test/ece",
            "test/ece_uncalibrated",
            "test/nll",
            "test/brier",
            "ood/mnist_unseen/fpr95",
            "ood/gaussian_noise/auroc",
            "ood/mean/fpr95",
            "calibration/temperature",
        ):
            assert np.isfinite(m[key]), key
        assert tags["oodgate.loss"] == loss_id and tags["oodgate.device"] == "cpu"
        # score: auto: the method's score with the lowest FPR95 on the validation OOD set, and why
        assert (
            tags["oodgate.score"]
            in {
                "softmax": ("mps", "max_logit", "energy", "entropic"),
                "dismax_fpr": ("mmles", "mps", "entropic", "mds", "energy"),
            }[loss_id]
        )
        assert tags["oodgate.score_choice"].startswith(f"{tags['oodgate.score']} (auto: ")
        assert tags["oodgate.score_choice"].endswith(" on glyphs)")
        for candidate in {"softmax": ("mps", "entropic"), "dismax_fpr": ("mmles", "mps")}[loss_id]:
            assert np.isfinite(m[f"seed0/selection/{candidate}/fpr95"])  # the validation evidence
            assert np.isfinite(m[f"scores/{candidate}/ood/mean/fpr95"])  # and each score's test figure
        if loss_id == "dismax_fpr":  # the prototypes' training, per epoch
            norms = MlflowClient().get_metric_history(run.info.run_id, "history/seed0/prototype_norm")
            assert [h.step for h in norms] == [1] and norms[0].value > 0
            assert "history/seed0/prototype_cosine_min" in m
        assert float(tags["oodgate.threshold"]) == pytest.approx(m["ood/threshold"], rel=1e-5)
        history = MlflowClient().get_metric_history(run.info.run_id, "history/seed0/val_accuracy")
        assert [h.step for h in history] == [1]
        plots = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots/seed0")}
        assert {"plots/seed0/reliability.png", "plots/seed0/roc.png", "plots/seed0/scores.png"} <= plots
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flow_run_id = UUID(parent.data.tags["oodgate.prefect_flow_run_id"])  # this run's, not another test's
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["gate-decision"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert (
        "on the deployable models' metrics only (gate.confidence: null)" in artifact.data
        and "dismax_fpr" in artifact.data
    )
    tags = children["dismax_fpr"].data.tags
    decision = tags["oodgate.gate"]
    assert decision in ("promote", "reject") and tags["oodgate.gate_reasons"]
    assert json.loads(tags["oodgate.gate_tests"]) == {
        "test/accuracy": "noninferior > -0.005",
        "test/ece": "noninferior > -0.01",
        "ood/mean/fpr95": "superior > +0",
    }
    assert tags["oodgate.model_seed"] == "0" and "chosen on validation data" in tags["oodgate.seed_choice"]
    # the logged model's page shows its own seed's figures, not the means over the seeds
    logged = MlflowClient().get_logged_model(tags["oodgate.model_uri"].removeprefix("models:/"))
    assert logged.metrics and {m.key.split("/")[0] for m in logged.metrics} == {"seed0"}
    assert tags["oodgate.gate_compared"].startswith("dismax_fpr seed 0 against softmax seed 0")

    # the run's best candidate (the only one) is registered whatever the decision: the challenger
    (version,) = MlflowClient().search_model_versions("name='oodgate-classifier'")
    challenger = MlflowClient().get_model_version_by_alias("oodgate-classifier", "challenger")
    assert challenger.version == version.version and challenger.run_id == children["dismax_fpr"].info.run_id
    assert version.tags["oodgate.gate"] == decision and version.tags["oodgate.registered_seed"] == "0"
    assert "| test/accuracy | noninferior > -0.005 |" in version.description
    assert result.registration.loss == "dismax_fpr" and result.registration.new_version
    assert result.registration.champion == (decision == "promote")
    if decision == "promote":  # the first champion of this registry
        champ = MlflowClient().get_model_version_by_alias("oodgate-classifier", "champion")
        assert champ.version == version.version and "PROMOTED" in champ.description
    else:
        assert "challenger" in parent.data.tags["oodgate.registry"]

    # a second run with the same data, code and params reuses every finished child run (in this
    # test: each first run is a flow of its own)
    first = result
    second = _pipeline(project)
    parent = MlflowClient().get_run(second.parent_run_id)
    assert second.reused == ["dismax_fpr", "softmax"]
    assert parent.data.tags["oodgate.reused_runs"].count("=") == 2
    names = [r.info.run_name for r in _runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert names == []  # no new child run: nothing was trained, calibrated, evaluated or logged
    assert second.report.means == first.report.means
    # a changed evaluation-side param makes new child runs (the trainings come from Prefect's cache)
    third = _pipeline(project, **{"calibration.objective": "ece"})
    assert third.reused == []

    # Two runs at once: the one that logs second finds, under the loss's lock, the child run the
    # other logged while it computed, and reuses it, though that child's start (its first task's)
    # is earlier than its own start (a filter on it logged the first loss of two runs twice)
    from prefect import flow, task

    from flows.losses import Context, LossRun, log_when_done
    from oodgate_mlflow.runs import PipelineRun

    cfg = load_config(project / "params.yaml").in_project(project)
    (child,) = [r for r in _runs("softmax") if r.data.tags["mlflow.parentRunId"] == first.parent_run_id]

    @task
    def computed() -> None:
        return None

    @flow
    def started_later():
        run = PipelineRun.start(cfg, project, "data", "later", None)
        assert run.lineage and child.info.start_time < int(time.time() * 1000)
        lr = LossRun("softmax", child.data.tags["oodgate.fingerprint"], trained=[computed.submit()])
        return log_when_done(Context(cfg, run, (project / cfg.workdir).resolve()), lr)

    found = started_later()
    assert found.reused and found.run_id == child.info.run_id


def test_flow_weighs_the_evidence_and_logs_it(prefect_harness, project, mlflow_db):
    """Two seeds and gate.confidence, model-level evidence (the default): every reason states the
    gain, its lower bound, the p-value and the paired test on the same images; the seed-level
    evidence is reported beside it; the same figures are metrics of the child run and of the parent;
    near- and far-OOD summaries are logged beside the overall mean."""
    overrides = {"seeds": [0, 1], "gate.confidence": 0.95, "gate.samples": 200, "gate.fpr95.over": "groups"}
    result = _pipeline(project, **overrides)
    decision = result.report.decisions["dismax_fpr"]
    reasons = decision.reasons
    assert [r.split(" ")[0] for r in reasons] == ["accuracy", "calibrated", "near-OOD", "far-OOD"]
    assert re.search(
        r"p = \S+, (McNemar's exact test|Tango's paired score test \(McNemar-type\)), ", reasons[0]
    )
    assert all(
        re.search(
            r"gain [+-]\d\.\d{4}, 95% lower bound [+-]\d\.\d{4}, p = \S+, paired bootstrap, 200 resamples ", r
        )
        for r in reasons[1:]
    )
    seeds = {loss: result.report.models[loss].seed for loss in ("softmax", "dismax_fpr")}
    assert decision.compared.startswith(
        f"dismax_fpr seed {seeds['dismax_fpr']} against softmax seed {seeds['softmax']}, on the same "
    )
    assert [r.split(" ")[1] for r in decision.seed_level[:4]] == [
        "accuracy",
        "calibrated",
        "near-OOD",
        "far-OOD",
    ]
    assert all("2 vs 2 seeds: " in r for r in decision.seed_level[:4])
    child = next(
        r for r in _runs("dismax_fpr") if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id
    )
    m, parent = child.data.metrics, MlflowClient().get_run(result.parent_run_id).data.metrics
    evidence = result.report.decisions["dismax_fpr"].evidence
    for key in ("test/accuracy", "test/ece", "ood/near/fpr95", "ood/far/fpr95"):
        for stat in ("gain", "bound", "lower", "p_value"):
            assert m[f"gate/{key}/{stat}"] == pytest.approx(evidence[f"gate/{key}/{stat}"])
            assert parent[f"gate/dismax_fpr/{key}/{stat}"] == pytest.approx(evidence[f"gate/{key}/{stat}"])
    assert m["ood/near/fpr95"] == pytest.approx(m["ood/mnist_unseen/fpr95"])  # one set per group here
    assert m["ood/far/fpr95"] == pytest.approx(m["ood/gaussian_noise/fpr95"])
    assert m["ood/worst/fpr95"] == pytest.approx(
        max(m["ood/mnist_unseen/fpr95"], m["ood/gaussian_noise/fpr95"])
    )
    assert child.data.tags["oodgate.gate_reasons"] == "; ".join(reasons)


def test_a_run_whose_artifacts_are_gone_is_logged_again_not_reused(first_run, caplog):
    """``mlartifacts/`` deleted, ``mlflow.db`` kept: the finished child runs still match by fingerprint,
    but their per-seed results and models are gone; the next run logs them again (from the cached
    trainings) instead of failing on ``metrics_by_seed.json`` forever."""
    from oodgate_mlflow.champion import load_champion

    project, first, _ = first_run
    assert first.registration.version == 1
    shutil.rmtree(project / "mlartifacts")
    again = _pipeline(project)
    assert again.reused == [] and not again.failed
    assert again.report.means == first.report.means
    assert "metrics_by_seed.json of run " in caplog.text and "cannot be read" in caplog.text
    # version 1 holds the same weights but its files are gone: registered again, the aliases moved
    r = again.registration
    assert (r.version, r.new_version) == (2, True), r
    assert re.match(
        r"registered again as version 2: version 1 has the same weights, but (its files cannot be read|"
        r"version 1: MLmodel is missing from the artifact store)",
        r.reasons[0],
    ), r.reasons
    v1 = MlflowClient().get_model_version("oodgate-classifier", "1")
    assert v1.tags["oodgate.superseded"].startswith("by version 2: ")
    model, version = load_champion(alias="challenger")  # loadable again
    assert version == 2 and len(model.predict(np.zeros((1, 1, 28, 28), np.float32))) == 1
    reused = _pipeline(project)  # and now they are there again: reused
    assert reused.reused == ["dismax_fpr", "softmax"]
    assert reused.registration.line().startswith("dismax_fpr: already registered as version 2")


def test_a_reused_run_whose_artifacts_were_changed_is_recomputed_never_gated(first_run, caplog):
    """Whoever can write only the artifact store forges a finished run's per-seed metrics (accuracy
    0.999, ECE 0.001, every FPR95 0): the next run finds the run by its fingerprint, but the file is
    not the one whose digest the tracking store recorded; it warns naming the file, computes and
    logs the loss again, and the gate decides on the real figures."""
    project, first, _ = first_run
    (stored,) = [
        p for p in (project / "mlartifacts").rglob("metrics_by_seed.json") if _loss_of(p) == "dismax_fpr"
    ]
    forged = [
        {k: (0.999 if "accuracy" in k else 0.001 if "ece" in k else 0.0) for k in m}
        for m in json.loads(stored.read_text())
    ]
    stored.write_text(json.dumps(forged, indent=1))
    again = _pipeline(project)
    assert again.reused == ["softmax"]  # the untouched run is reused; the forged one never is
    assert f"metrics_by_seed.json of run {_run_id_of(stored)} is not the file logged" in caplog.text
    assert again.report.decisions == first.report.decisions and again.report.means == first.report.means
    # the forged bytes are never read: a third run reuses the run logged again, verified
    assert sorted(_pipeline(project).reused) == ["dismax_fpr", "softmax"]


def _run_id_of(artifact: Path) -> str:
    """The run id in an artifact's path in the local artifact store (``<exp>/<run id>/artifacts/...``)."""
    parts = artifact.parts
    return parts[parts.index("artifacts") - 1]


def _loss_of(artifact: Path) -> str:
    return MlflowClient().get_run(_run_id_of(artifact)).data.tags["oodgate.loss"]


def test_a_deleted_work_directory_is_recomputed_not_returned_from_cache(first_run):
    """`make clean` (or a deleted artifacts/) after a run: Prefect's cache records still exist, but
    the files they name do not; the next run must recompute them, not fail on a missing file."""
    project, _, _ = first_run
    shutil.rmtree(project / "artifacts")
    third = _pipeline(project, **{"calibration.objective": "ece"})  # new child runs: no MLflow reuse
    assert third.reused == [] and not third.failed
    assert list((project / "artifacts" / "cache").glob("train-*/best.pt"))


def test_a_copy_of_the_project_never_gets_results_that_name_the_original_s_files(first_run, tmp_path):
    """Prefect's result store is shared by every project of a user (~/.prefect): a clone with the
    same inputs must not be handed a stored result whose paths are the other project's."""
    project, _, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    shutil.rmtree(project / "artifacts")  # the original's files are gone
    for r in _runs():  # no MLflow reuse: every task goes to its cache
        MlflowClient().delete_run(r.info.run_id)
    result = _pipeline(copy)
    assert not result.failed and result.reused == []


def test_a_corrupt_cached_file_is_reported_and_recomputed_never_reused(first_run, caplog):
    """Truncate each kind of cached output in turn (checkpoint, calibrated model, metrics, samples,
    prepared data): the next run notices it by its digest, recomputes it and gives the same metrics
    as the clean run; nothing is trained or registered from a broken file."""
    project, _, _ = first_run
    cache = project / "artifacts" / "cache"

    def child_metrics() -> dict[str, dict]:
        runs = [r for r in _runs(status="FINISHED") if r.data.tags.get("oodgate.role") != "pipeline"]
        return {
            r.data.tags["oodgate.loss"]: {
                k: v for k, v in r.data.metrics.items() if not k.startswith("time/")
            }
            for r in runs
        }

    def record_of(d: Path) -> dict:
        name = next(
            n for n in ("train.json", "calibration.json", "evaluation.json", "data.json") if (d / n).is_file()
        )
        return steps.read_json(d / name)

    def victim(prefix: str, loss: str | None, name: str) -> Path:
        for d in sorted(cache.glob(f"{prefix}-*")):
            if loss is None or record_of(d).get("loss") == loss:
                return d / name
        raise AssertionError((prefix, loss))

    clean = child_metrics()
    first = [("train", "softmax", "best.pt"), ("evaluate", "dismax_fpr", "samples.pt")]
    for round_ in (
        first,
        [
            ("calibrate", "softmax", "calibrated.pt"),
            ("evaluate", "dismax_fpr", "metrics.json"),
            ("prepared", None, "id.pt"),
        ],
        first,  # the same damage again: a cache keyed on the damaged bytes would return the last repair
    ):
        broken = [victim(*v) for v in round_]
        for path in broken:
            path.write_bytes(path.read_bytes()[:100])
        for r in _runs():  # no MLflow reuse: every loss goes to its files
            MlflowClient().delete_run(r.info.run_id)
        caplog.clear()
        with caplog.at_level("WARNING", logger="oodgate"):
            result = _pipeline(project)
        assert not result.failed and result.reused == []
        assert child_metrics() == clean
        for path in broken:
            outputs = record_of(path.parent)["outputs"]
            assert steps.file_digest(path) == outputs[path.name], path  # repaired in place
            if path.name != "id.pt":  # prepare rewrites its files whenever its task runs
                assert any(str(path.parent) in m and "recomputing" in m for m in caplog.messages), (
                    path,
                    caplog.messages,
                )


# ------------------------------------------------------------------ faults
class _NaNHead(SoftMaxHead):
    """A head whose loss is NaN, to exercise the NaN path of the real flow."""

    def loss(self, logits, y):
        return super().loss(logits, y) * float("nan")


@pytest.fixture
def nan_method():
    methods.METHODS.register("nan_for_tests")(_NaNHead)
    yield "nan_for_tests"
    methods.METHODS.unregister("nan_for_tests")


def test_nan_loss_marks_the_run_failed_and_registers_nothing(prefect_harness, project, mlflow_db, nan_method):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["losses"] = {"softmax": {"method": "softmax"}, "broken": {"method": nan_method}}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = _pipeline(project)
    assert "broken" in result.failed and "NonFiniteLossError" in result.failed["broken"]
    (run,) = _runs("broken")
    assert run.info.status == "FAILED"
    assert "non-finite training loss" in run.data.tags["oodgate.failure"]
    assert MlflowClient().search_model_versions("name='oodgate-classifier'") == []


def test_sigterm_wrapped_by_pydantic_while_submitting_is_a_crash_by_the_signal_not_a_failure(
    prefect_harness, project, mlflow_db, monkeypatch, caplog
):
    """SIGTERM landing while a task is submitted to Dask comes back from Pydantic (which serialises
    the flow's context) as a PydanticSerializationError. The flow marks its runs KILLED and re-raises
    the signal itself: Prefect logs one "Crash detected" line, not the wrapper's traceback as a
    failure, and the program exits 130."""
    import signal

    import pydantic
    from prefect.exceptions import TerminationSignal

    import flows.pipeline
    from flows import entry
    from oodgate.learning.training.engine import Stop

    class Context(pydantic.BaseModel):
        value: int = 0

        @pydantic.field_serializer("value")
        def _ser(self, v: int) -> int:
            raise TerminationSignal(signal.SIGTERM)

    def submit(*args, **kwargs):
        Context().model_dump()  # what prefect-dask's submit does with the flow's context

    monkeypatch.setattr(entry, "STOP", Stop())
    monkeypatch.setattr(flows.pipeline, "_submit", submit)
    handed_back: list[int] = []  # Prefect hands the signal back to the program's handler after the run
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handed_back.append(signum))
    try:
        with pytest.raises(TerminationSignal):
            _pipeline(project)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert handed_back == [signal.SIGTERM]  # where flows.entry's handler turns it into exit 130
    logged = caplog.text
    assert "Crash detected! Execution was aborted by a termination signal" in logged, logged
    assert "PydanticSerializationError" not in logged and "Encountered exception" not in logged, logged
    (parent,) = _runs()
    assert parent.info.status == "KILLED" and "SIGTERM" in parent.data.tags["oodgate.failure"]


def test_crash_mid_training_resumes_from_the_checkpoint(project, prepared_dir, tmp_path):
    from conftest import interrupted_after

    cfg = load_config(project / "params.yaml", {"train.epochs": 2})
    out = tmp_path / "train"
    # "crash" after epoch 1
    interrupted_after(
        1, lambda hooks: steps.train(cfg, "softmax", 0, prepared_dir, out, hooks, fingerprint="fp")
    )
    assert (out / "last.pt").is_file() and not (out / "train.json").exists()
    from prefect.logging import disable_run_logger

    with disable_run_logger():
        resumed = train_model.fn(cfg, Job("fp", str(out), "softmax", 0), str(prepared_dir))
    assert resumed.resumed_from_epoch == 1 and resumed.epochs == 2
    fresh = steps.train(cfg, "softmax", 0, prepared_dir, tmp_path / "fresh")
    assert fresh.best_val_accuracy == resumed.best_val_accuracy


def test_bad_params_fail_before_any_work(prefect_harness, project, mlflow_db, capsys):
    from flows.pipeline import main, pipeline

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["epochs"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        pipeline(params_path="params.yaml", root=str(project))
    # a deployment run with a bad override fails the same way, before any work
    raw["train"]["epochs"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        pipeline(root=str(project), overrides={"train.epochs": 0})
    raw["train"]["epochs"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--params", str(project / "params.yaml")]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert _runs() == [] and not (project / "artifacts").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_server_fails_fast_with_the_uri(prefect_harness, project, monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.TrackingUnavailableError, match=uri.replace(".", r"\.")):
        _pipeline(project)  # fails on the first request: `connect` checks /health once, no retry loop
    assert not (project / "artifacts").exists()


def test_missing_or_changed_data_names_the_fix(project):
    from prefect.logging import disable_run_logger

    with disable_run_logger():
        assert check_data.fn(str(project)).endswith(".dir")
        # a fresh clone after `make data`: right bytes, empty DVC cache -> not a change
        shutil.rmtree(project / ".dvc" / "cache", ignore_errors=True)
        assert check_data.fn(str(project)).endswith(".dir")
        arr = project / "data" / "embedded" / "photo_patches.npy"
        original = arr.read_bytes()
        arr.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        # the advice is a command that works here (a fresh clone's empty cache) and deletes nothing
        with pytest.raises(
            DataVersionError, match=r"differs from data\.dvc \(.*embedded/photo_patches\.npy.*materialize"
        ) as e:
            check_data.fn(str(project))
        command = re.search(r"`(python -m oodgate materialize --root data)`", str(e.value)).group(1)
        subprocess.run([sys.executable, *command.split()[1:]], cwd=project, check=True, capture_output=True)
        assert arr.read_bytes() == original and check_data.fn(str(project)).endswith(".dir")
        # data of the user's own: version it as it is now
        (project / "data" / "mine").mkdir()
        (project / "data" / "mine" / "x.txt").write_text("my data")
        with pytest.raises(
            DataVersionError,
            match=r"differs from data\.dvc \(.* and 1 more\); run `dvc add data`.*nothing was deleted",
        ) as e:
            check_data.fn(str(project))
        command = re.search(r"`(dvc add data)`", str(e.value)).group(1)
        subprocess.run([sys.executable, "-m", *command.split()], cwd=project, check=True, capture_output=True)
        assert (project / "data" / "mine" / "x.txt").read_text() == "my data"
        assert check_data.fn(str(project)).endswith(".dir")
        shutil.rmtree(project / "data")
        with pytest.raises(DataVersionError, match=r"missing; run `make data`.*`dvc pull`"):
            check_data.fn(str(project))
        (project / "data.dvc").unlink()
        with pytest.raises(DataVersionError, match=r"dvc add data"):
            check_data.fn(str(project))


# ------------------------------------------------------------------ registry
def _logged_model(exp_id: str, name: str, metrics: dict, prepared_dir: Path) -> tuple[str, str]:
    from oodgate.learning.classifier import ModelSpec, build_classifier
    from oodgate.learning.serving import ServingModel

    bundle = steps.load_prepared(prepared_dir, with_ood=False)
    spec = ModelSpec(
        "small_cnn", "softmax", bundle.num_classes, 1, 28, bundle.mean, bundle.std, "mps", {"width": 8}
    )
    run_id = tracking.start_run(exp_id, name, {"oodgate.loss": name})
    tracking.log_metrics(run_id, metrics)
    model_uri = tracking.log_model(
        run_id, ServingModel(build_classifier(spec, 0), 0.5), torch.rand(2, 1, 28, 28), bundle.class_names
    )
    return run_id, model_uri


GOOD = {"test/accuracy": 0.95, "test/ece": 0.01, "ood/mean/fpr95": 0.2}
WORSE = {"test/accuracy": 0.93, "test/ece": 0.02, "ood/mean/fpr95": 0.3}


def _candidate(name, run_id, uri, metrics=None, promote=True, fingerprint=None):
    return registry.Candidate(
        loss=name,
        model_uri=uri,
        run_id=run_id,
        fingerprint=fingerprint,
        promote=promote,
        reasons=("beat baseline",),
        tests={"test/accuracy": "noninferior > -0.005"},
        by_metric={"test/accuracy": "beat baseline"},
        seed=0,
        seed_choice="chosen on validation data",
        compared=f"{name} seed 0 against softmax seed 0, on the same 600 test and 5,000 OOD images",
    )


def _by_fpr95(metrics_of_run: dict[str, dict], candidate_metrics: dict) -> registry.Judge:
    """A judge standing for the gate's comparison: the candidate replaces the champion when its
    FPR95 is lower (the registry only calls it and moves the aliases)."""

    def judge(champion):
        theirs = metrics_of_run[champion.run_id]["ood/mean/fpr95"]
        take = candidate_metrics["ood/mean/fpr95"] < theirs
        return take, (
            f"FPR95 {candidate_metrics['ood/mean/fpr95']} vs champion v{champion.version} {theirs}",
        )

    return judge


def test_champion_moves_only_to_a_better_model_and_loads_from_the_registry(mlflow_db, prepared_dir, tmp_path):
    exp = tracking.ensure_experiment("oodgate", tmp_path)
    lock = tmp_path / "lock"
    run_a, uri_a = _logged_model(exp, "a", WORSE, prepared_dir)
    run_b, uri_b = _logged_model(exp, "b", GOOD, prepared_dir)
    run_c, uri_c = _logged_model(exp, "c", WORSE, prepared_dir)
    by_run = {run_a: WORSE, run_b: GOOD, run_c: WORSE}
    ra = registry.register(
        "m", _candidate("a", run_a, uri_a), serialised("m", lock), _by_fpr95(by_run, WORSE)
    )
    rb = registry.register("m", _candidate("b", run_b, uri_b), serialised("m", lock), _by_fpr95(by_run, GOOD))
    rc = registry.register(
        "m", _candidate("c", run_c, uri_c), serialised("m", lock), _by_fpr95(by_run, WORSE)
    )
    assert (ra.promoted_now, rb.promoted_now, rc.promoted_now) == (True, True, False)
    assert ra.reasons == ("no current champion",)
    assert rc.reasons == ("FPR95 0.3 vs champion v2 0.2",)
    # without a judge nothing compares the two: the champion stays
    rd = registry.register("m", _candidate("d", run_c, uri_c, fingerprint="d"), serialised("m", lock))
    assert not rd.promoted_now and rd.reasons == ("the champion v2 stays: nothing compared the two",)
    champ = MlflowClient().get_model_version_by_alias("m", "champion")
    assert str(champ.version) == "2"
    assert str(MlflowClient().get_model_version_by_alias("m", "challenger").version) == "4"  # the last run's
    v3 = MlflowClient().get_model_version("m", "3")
    assert (
        "did not replace the current champion" in v3.description
        and "FPR95 0.3 vs champion v2" in v3.description
    )
    assert "Compared: c seed 0 against softmax seed 0" in v3.description
    assert v3.tags["oodgate.champion_decision"] == "kept_champion"
    assert MlflowClient().get_run(run_c).data.tags["oodgate.champion"] == "false"

    model = mlflow.pyfunc.load_model("models:/m@champion")
    images = np.random.default_rng(0).random((4, 1, 28, 28))  # float64: any float dtype is accepted
    table = model.predict(images)
    assert list(table.columns) == ["p_0", "p_1", "p_2", "predicted", "score", "in_distribution"]
    np.testing.assert_allclose(table[["p_0", "p_1", "p_2"]].sum(axis=1), 1.0, rtol=1e-5)
    assert table["in_distribution"].dtype == bool and set(table["predicted"]) <= {"0", "1", "2"}
    as_uint8 = model.predict((images * 255).round().astype(np.uint8))
    assert as_uint8.shape == table.shape
    # integers of any dtype are pixel values 0-255, as uint8 holds them (JSON integers arrive as int64)
    as_int64 = model.predict((images * 255).round().astype(np.int64))
    assert as_int64.equals(as_uint8)
    from mlflow.exceptions import MlflowException

    for bad, got in (
        (images[:, 0], r"got shape \(4, 28, 28\)"),
        (images * 300, r"got values in \[[\d.]+, 299"),
        (np.array([["a"]]), "got dtype <U1"),
        (np.full((1, 1, 28, 28), 256), r"got integers in \[256, 256\], outside the pixel values 0-255"),
        (np.full((1, 1, 28, 28), -1), r"got integers in \[-1, -1\], outside the pixel values 0-255"),
    ):
        with pytest.raises(
            MlflowException,
            match=r"expected images of shape \(batch, 1, 28, 28\), float in \[0, 1\] or integers 0-255 \(uint8\); "
            + got,
        ) as e:
            model.predict(bad)
        assert len(str(e.value)) < 200


def test_a_candidate_not_promoted_is_the_challenger_and_never_the_champion(mlflow_db, prepared_dir, tmp_path):
    exp = tracking.ensure_experiment("oodgate", tmp_path)
    run_id, uri = _logged_model(exp, "x", GOOD, prepared_dir)
    r = registry.register("m4", _candidate("x", run_id, uri, promote=False), serialised("m4", tmp_path / "l"))
    assert (r.version, r.new_version, r.champion, r.promoted_now) == (1, True, False, False)
    assert r.reasons == ("not promoted: the gate did not show it better than the baseline",)
    assert str(MlflowClient().get_model_version_by_alias("m4", "challenger").version) == "1"
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_model_version_by_alias("m4", "champion")
    v = MlflowClient().get_model_version("m4", "1")
    assert v.tags["oodgate.champion_decision"] == "challenger" and "not promoted" in v.description
    assert "challenger" in r.line()


def test_two_flows_gating_at_once_leave_exactly_one_champion(mlflow_db, prepared_dir, tmp_path):
    exp = tracking.ensure_experiment("oodgate", tmp_path)
    lock = tmp_path / "lock"
    entries = [(*_logged_model(exp, n, m, prepared_dir), n, m) for n, m in (("x", WORSE), ("y", GOOD))]
    by_run = {e[0]: e[3] for e in entries}
    results: dict[str, registry.Registration] = {}
    barrier = threading.Barrier(2)

    def gate_one(run_id, uri, name, metrics):
        barrier.wait()
        results[name] = registry.register(
            "m2", _candidate(name, run_id, uri), serialised("m2", lock), _by_fpr95(by_run, metrics)
        )

    threads = [threading.Thread(target=gate_one, args=e) for e in entries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = MlflowClient().search_model_versions("name='m2'")
    assert len(versions) == 2 and all(v.description for v in versions)  # both decisions recorded
    champ = MlflowClient().get_model_version_by_alias("m2", "champion")
    assert champ.run_id == entries[1][0]  # the better one holds the alias, whatever the order
    assert {r.champion for r in results.values()} <= {True, False}
    for run_id, *_ in entries:
        assert MlflowClient().get_run(run_id).data.tags["oodgate.champion_reasons"]


def _scored(name: str, version, prepared_dir: Path):
    """A registered model's per-image arrays on the prepared test and OOD images."""
    from oodgate.deciding import gate
    from oodgate_mlflow.scoring import score_version

    bundle = steps.load_prepared(prepared_dir)
    images = {"": bundle.test.x.numpy(), **{k: v.x.numpy() for k, v in bundle.ood.items()}}
    scored = score_version(name, version, images, list(bundle.class_names), 256)
    p, s = scored.pop("")
    return gate.samples_from_probabilities(
        p, bundle.test.y.numpy(), s, {k: v for k, (_, v) in scored.items()}, bundle.ood_groups
    )


def test_the_champion_is_scored_on_this_runs_images_and_replaced_only_by_the_gates_evidence(
    mlflow_db, prepared_dir, embedded_root, tmp_path
):
    """The judge the flow passes to the registry: the current champion, verified, scored on the run's
    prepared test and OOD images, against the candidate's arrays on the same images, by the gate's
    rule and model-level evidence; a champion of other classes stays, one whose files fail
    verification is replaced."""
    from oodgate.base.config import parse_config
    from oodgate_mlflow.integrity import ModelIntegrityError
    from tasks.registry import champion_judge

    exp = tracking.ensure_experiment("oodgate", tmp_path)
    lock = tmp_path / "lock"
    run_a, uri_a = _logged_model(exp, "a", WORSE, prepared_dir)
    registry.register(
        "j", _candidate("a", run_a, uri_a, fingerprint="a"), serialised("j", lock)
    )  # the champion, v1
    champion = MlflowClient().get_model_version_by_alias("j", "champion")
    itself = _scored("j", champion, prepared_dir)
    raw = tiny_params(embedded_root, tmp_path / "w")
    cfg = parse_config({**raw, "registry": {"model_name": "j"}, "gate": {"samples": 200}})
    take, reasons = champion_judge(cfg, "b", 3, itself, str(prepared_dir))(champion)
    assert not take  # the same model: no gain, nothing shown
    assert reasons[0].startswith("b seed 3 against the champion v1 (a seed 0), on the same ")
    assert " test and " in reasons[0] and any("McNemar" in r or "Tango" in r for r in reasons)
    means_only = parse_config({**raw, "registry": {"model_name": "j"}, "gate": {"confidence": None}})
    take, reasons = champion_judge(means_only, "b", 3, itself, str(prepared_dir))(champion)
    assert not take and "fails" in " ".join(reasons)

    # a champion of other classes cannot be scored on these images: it stays, and one line says why
    others = parse_config({**raw, "data": {**raw["data"], "classes": [3, 4, 5]}})
    steps.prepare(others, tmp_path / "other")
    take, reasons = champion_judge(cfg, "b", 3, itself, str(tmp_path / "other"))(champion)
    assert not take and len(reasons) == 1
    assert reasons[0].startswith(
        "the champion v1 (a seed 0) stays: it cannot be scored on this run's images (it has the classes "
        "['0', '1', '2'], these images ['3', '4', '5'])"
    )

    # a champion whose files fail verification cannot be served: it is replaced
    MlflowClient().set_model_version_tag("j", "1", "oodgate.model_files", "{}")
    take, reasons = champion_judge(cfg, "b", 3, itself, str(prepared_dir))(
        MlflowClient().get_model_version("j", "1")
    )
    assert take and "is replaced: its files fail verification" in reasons[0]
    with pytest.raises(ModelIntegrityError):
        _scored("j", MlflowClient().get_model_version("j", "1"), prepared_dir)


def test_retry_only_where_it_helps():
    from prefect.states import Completed, Failed

    from oodgate.learning.training.engine import NonFiniteLossError
    from tasks.train import _retry_helps

    assert _retry_helps(None, None, Failed(data=OSError("disk full"))) is True  # I/O: a retry may pass
    assert _retry_helps(None, None, Failed(data=NonFiniteLossError("nan"))) is False  # repeats identically
    assert _retry_helps(None, None, Failed(data=ValueError("bad value"))) is False
    assert _retry_helps(None, None, Completed(data=1)) is False


def test_logged_model_has_signature_example_and_explicit_requirements(mlflow_db, prepared_dir, tmp_path):
    exp = tracking.ensure_experiment("oodgate", tmp_path)
    _, uri = _logged_model(exp, "m", GOOD, prepared_dir)
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs is None  # the model checks its input itself, with a short message
    assert info.signature.outputs.input_names() == [
        "p_0",
        "p_1",
        "p_2",
        "predicted",
        "score",
        "in_distribution",
    ]
    assert info.metadata["input_shape"] == [-1, 1, 28, 28]
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "m")))
    requirements = (local / "requirements.txt").read_text().split()
    # exactly our explicit list (MLflow adds its own pin), nothing inferred
    assert [r for r in requirements if not r.startswith("mlflow==")] == tracking.pip_requirements()
    assert tracking.pip_requirements()[0].startswith("torch==")


def test_registering_the_same_weights_again_adds_no_version(mlflow_db, prepared_dir, tmp_path):
    exp = tracking.ensure_experiment("oodgate", tmp_path)
    lock = tmp_path / "lock"
    run_a, uri_a = _logged_model(exp, "a", GOOD, prepared_dir)
    run_b, uri_b = _logged_model(exp, "b", GOOD, prepared_dir)  # a re-run: same weights, new run
    first = registry.register("m3", _candidate("a", run_a, uri_a, fingerprint="f1"), serialised("m3", lock))
    again = registry.register("m3", _candidate("a", run_b, uri_b, fingerprint="f1"), serialised("m3", lock))
    assert (first.version, first.champion, first.new_version) == (1, True, True)
    assert again == registry.Registration(
        "a", 1, False, True, False, ("unchanged: same fingerprint as version 1 (the champion)",)
    )
    assert len(MlflowClient().search_model_versions("name='m3'")) == 1
    other = registry.register("m3", _candidate("a", run_b, uri_b, fingerprint="f2"), serialised("m3", lock))
    assert other.version == 2 and other.new_version


def test_model_fingerprint_is_the_weights():
    from oodgate.learning.serving import fingerprint

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.bias[0] += 1e-7
    assert fingerprint(a) != fingerprint(b)
    c = torch.nn.Linear(3, 2).double()
    c.load_state_dict({k: v.double() for k, v in a.state_dict().items()})
    assert fingerprint(c) != fingerprint(a)  # same values, other dtype: another model


class _Payload:
    """A pickle that creates a file when it is unpickled (stands for `os.system(...)`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_champion_is_refused_without_running_its_payload(mlflow_db, prepared_dir, tmp_path):
    """The attack of a writable artifact store: the sample inputs inside the registered program
    archive replaced by a pickle. `load_champion` refuses it and the payload never runs."""
    import pickle
    import zipfile

    from mlflow.exceptions import MlflowException

    from oodgate_mlflow.champion import load_champion

    exp = tracking.ensure_experiment("oodgate", tmp_path)
    run_id, uri = _logged_model(exp, "t", GOOD, prepared_dir)
    registry.register("tampered", _candidate("t", run_id, uri), serialised("tampered", tmp_path / "lock"))
    model, version = load_champion("tampered", uri=mlflow_db)  # intact: loads
    assert version == 1 and len(model.predict(np.zeros((1, 1, 28, 28), np.float32))) == 1

    stored = [p for p in (tmp_path / "mlartifacts").rglob("model.pt2") if "torch_model" in p.parts]
    assert stored
    marker = tmp_path / "payload-ran"
    for archive in stored:
        with zipfile.ZipFile(archive) as z:
            entries = {i.filename: z.read(i) for i in z.infolist()}
        (name,) = [n for n in entries if n.endswith("sample_inputs/model.pt")]
        entries[name] = pickle.dumps(_Payload(marker))
        with zipfile.ZipFile(archive, "w") as z:
            for n, data in entries.items():
                z.writestr(n, data)
    from oodgate_mlflow.integrity import ModelIntegrityError

    # refused by the registry's record of the files first (tests/test_integrity.py) ...
    with pytest.raises(ModelIntegrityError, match=r"model\.pt2 is not the file registered"):
        load_champion("tampered", uri=mlflow_db)
    # ... and, should the record be changed too (who can write the registry), by MLflow refusing to
    # unpickle anything
    from mlflow.tracking import MlflowClient

    from oodgate_mlflow import integrity

    files = integrity.manifest(tracking.download_model("models:/tampered/1", tmp_path / "copy"))
    MlflowClient().set_model_version_tag("tampered", "1", integrity.TAG, integrity.encode(files))
    with pytest.raises(MlflowException, match="pickle"):
        load_champion("tampered", uri=mlflow_db)
    assert not marker.exists()
