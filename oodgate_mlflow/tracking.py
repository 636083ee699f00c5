"""MLflow at the edge: runs, metrics, artifacts and the logged model (registry.py, champion.py and
pyfunc_model.py are the other modules that import mlflow).

Runs are addressed by id through ``MlflowClient`` (thread-safe, and MLflow's active run is
thread-local, so tasks submitted to the flow's thread pool must not rely on it). The default
tracking store is SQLite at the project root; ``MLFLOW_TRACKING_URI`` points at any server.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shlex
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oodgate.base.project import telemetry_off
from oodgate_mlflow import integrity

if TYPE_CHECKING:  # imported where used: MLflow and torch cost seconds at start-up
    import torch
    from mlflow.entities import Run
    from mlflow.types import Schema

    from oodgate.learning.serving import ServingModel

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TAG = "oodgate."  # prefix of every tag this project sets


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def default_tracking_uri(root: Path = PROJECT_ROOT) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root) / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _damaged(path: Path, problem: str) -> TrackingUnavailableError:
    return TrackingUnavailableError(
        f"the MLflow tracking database {str(path)!r} is damaged ({problem}); restore it from a backup, or "
        f"move it aside (mv {shlex.quote(str(path))} {shlex.quote(str(path) + '.damaged')}) to start a new "
        "one; nothing was changed or deleted"
    )


def _check_sqlite_database(uri: str) -> None:
    """A truncated or garbled ``mlflow.db`` used to surface as SQLAlchemy's text, naming neither the
    file nor a fix, once work had begun. SQLite's own check reads every page (milliseconds for a few
    MB), read-only: nothing is repaired, moved or deleted here."""
    import sqlite3

    path = _sqlite_path(uri)
    if not path.is_file() or path.stat().st_size == 0:  # none yet, or empty: MLflow creates the tables
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            result = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        if "locked" in str(e):  # busy, not damaged: MLflow waits for it as usual
            return
        raise _damaged(path, f"SQLite: {e}") from None
    if result != ["ok"]:
        raise _damaged(path, f"SQLite's quick_check: {'; '.join(map(str, result[:3]))}")


def _check_writable_sqlite(uri: str) -> None:
    path = _sqlite_path(uri)
    target = path if path.exists() else path.parent
    if target.exists() and not os.access(target, os.W_OK):  # also EROFS, for root too
        raise TrackingUnavailableError(
            f"the MLflow tracking database {str(path)!r} is not writable (a read-only file, directory or "
            "file system); make it writable, or point MLFLOW_TRACKING_URI at a writable database or server"
        )


def connect(
    uri: str | None = None, root: Path = PROJECT_ROOT, timeout: float = 5.0, write: bool = True
) -> str:
    """Set the tracking URI; for a server, fail fast (no retry loop) if it does not answer; for a
    SQLite file that will be written (``write``), fail at once if it cannot be."""
    import mlflow

    telemetry_off()
    # One progress bar per downloaded artifact floods the flow logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = uri or default_tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingUnavailableError(f"MLflow server at {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingUnavailableError(
                f"cannot reach the MLflow tracking server at {uri} ({e}); start it, fix MLFLOW_TRACKING_URI, "
                "or unset it to use the local SQLite store"
            ) from None
    if uri.startswith("sqlite:///"):
        _check_sqlite_database(uri)
        if write:
            _check_writable_sqlite(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def client():
    """A client of the tracking URI set. For a SQLite store, under the store's lock: MLflow creates
    and migrates the database when this process first opens it, and two processes creating a new
    ``mlflow.db`` at once (two ``make run`` on a fresh clone) raced in Alembic; the loser's
    ``table _alembic_tmp_experiments already exists`` read as a damaged database."""
    import mlflow
    from mlflow.tracking import MlflowClient

    with _store_lock(mlflow.get_tracking_uri()):
        return MlflowClient()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` beside a SQLite store; nothing for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = _sqlite_path(uri)
    try:
        lock = open(path.parent / f".{path.name}.lock", "a")  # closed by the with below
    except OSError:  # a read-only directory: this process creates nothing there, so nothing races
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(name: str, root: Path = PROJECT_ROOT) -> str:
    """The experiment's id, creating it with an absolute artifact location (``<root>/mlartifacts``)
    for a local store; a server keeps its own artifact root."""
    import mlflow
    from sqlalchemy.exc import DatabaseError

    try:
        c = client()  # MLflow opens the store (and reads its schema) here
        exp = c.get_experiment_by_name(name)
    except DatabaseError as e:  # the first queries: a store damaged after connect() looked at it
        uri = mlflow.get_tracking_uri()
        problem = str(e.orig if e.orig is not None else e).splitlines()[0]
        if uri.startswith("sqlite:///"):
            raise _damaged(_sqlite_path(uri), f"SQLite: {problem}") from None
        raise TrackingUnavailableError(f"the MLflow tracking store at {uri} failed: {problem}") from None
    if exp is not None:
        return exp.experiment_id
    location = None
    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        location = (Path(root) / "mlartifacts").resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another flow
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, object], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def numerics_tags(provenance: Mapping[str, Any]) -> dict[str, str]:
    """``oodgate.base.numerics.*`` tags from :func:`oodgate.base.numerics.provenance`: the mode, the threads,
    what was in force, the CPU and the software that computed."""
    cpu = provenance.get("cpu", {})
    return {
        "oodgate.base.numerics.mode": str(provenance.get("mode")),
        "oodgate.base.numerics.threads": str(provenance.get("threads")),
        "oodgate.base.numerics.in_force": json.dumps(provenance.get("in_force", {}), sort_keys=True),
        "oodgate.base.numerics.cpu": f"{cpu.get('model', '?')} ({cpu.get('architecture', '?')}; "
        f"{' '.join(cpu.get('flags', []))})",
        "oodgate.base.numerics.software": json.dumps(provenance.get("software", {}), sort_keys=True),
    }


def start_run(
    experiment_id: str,
    name: str,
    tags: Mapping[str, str],
    parent_id: str | None = None,
    start_time_ms: int | None = None,
) -> str:
    t = dict(tags)
    if parent_id:
        t["mlflow.parentRunId"] = parent_id
    return client().create_run(experiment_id, start_time=start_time_ms, run_name=name, tags=t).info.run_id


def log_params(run_id: str, params: Mapping[str, object]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client().log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = _now_ms()
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
    for i in range(0, len(items), 500):
        client().log_batch(run_id, metrics=items[i : i + 500])


def log_history(run_id: str, history: list[Mapping[str, float]], prefix: str = "") -> None:
    from mlflow.entities import Metric

    now = _now_ms()
    items = [
        Metric(f"{prefix}{k}", float(v), now, int(h["epoch"]))
        for h in history
        for k, v in h.items()
        if k != "epoch"
    ]
    for i in range(0, len(items), 500):
        client().log_batch(run_id, metrics=items[i : i + 500])


def set_tags(run_id: str, tags: Mapping[str, object]) -> None:
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_artifacts(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        client().log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client().log_artifact(run_id, str(path), artifact_path)


def log_text(run_id: str, text: str, file_name: str) -> None:
    client().log_text(run_id, text, file_name)


def end_run(run_id: str, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
    client().set_terminated(run_id, status=status, end_time=end_time_ms)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def close_open_children(parent_id: str, status: str, reason: str) -> list[str]:
    """Mark the still-RUNNING child runs of ``parent_id`` (an interrupted flow) with ``status``."""
    runs = client().search_runs(
        [client().get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    for r in runs:
        set_tags(r.info.run_id, {"oodgate.failure": reason})
        end_run(r.info.run_id, status)
    return [r.info.run_id for r in runs]


def close_orphans(experiment_id: str, closed_by: str) -> list[str]:
    """Runs left RUNNING by a flow process on this machine that no longer exists (SIGKILL, a power
    cut): marked KILLED with a tag saying why. Runs of live processes, or of other machines, are
    left alone."""
    import socket

    import psutil

    runs = client().search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`oodgate.host` = '{socket.gethostname()}'",
    )
    closed = []
    for r in runs:
        pid = r.data.tags.get("oodgate.pid", "")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            set_tags(
                r.info.run_id,
                {"oodgate.closed_by": f"{closed_by}: found RUNNING after its process {pid} had died"},
            )
            end_run(r.info.run_id, "KILLED")
            closed.append(r.info.run_id)
    return closed


def find_finished_run(experiment_id: str, tags: Mapping[str, str]) -> Run | None:
    """The newest FINISHED run carrying all these tags, or None."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = client().search_runs(
        [experiment_id],
        filter_string=" and ".join([*clauses, "attributes.status = 'FINISHED'"]),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


ARTIFACT_DIGESTS = "oodgate.artifact_digests"  # on a child run: {artifact: sha256} of what reuse reads
MODEL_DIGEST = "model"  # the key of the logged model's files (the sha256 of their manifest)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files_digest(model_dir: Path) -> str:
    """One digest of a model's files: the SHA-256 of their manifest (:func:`integrity.manifest`),
    without what MLflow adds to a registered copy (``registered_model_meta``)."""

    files = {k: v for k, v in integrity.manifest(model_dir).items() if k != "registered_model_meta"}
    return text_digest(integrity.encode(files))


def record_artifact_digests(run_id: str, digests: Mapping[str, str]) -> None:
    """Record, in the tracking store, the digest of every artifact a later run may reuse from this
    one (:func:`verified_artifacts` checks them): whoever can write only the artifact store cannot
    change what a reused run offers unnoticed."""
    set_tags(run_id, {ARTIFACT_DIGESTS: json.dumps(dict(digests), sort_keys=True, separators=(",", ":"))})


@dataclass(frozen=True)
class VerifiedArtifacts:
    """A reused run's artifacts, downloaded into ``dir`` and checked against the digests recorded
    when they were logged: what the gate and the registry read of it, and nothing else."""

    metrics_by_seed: list[dict[str, float]]
    sample_dirs: list[str]


class UnverifiedArtifactError(RuntimeError):
    """A reused run's artifact is missing, changed or was never recorded: recompute it."""


def verified_artifacts(run: Run, seeds: list[int], dst: Path) -> VerifiedArtifacts:
    """Download what a finished child run offers for reuse (``metrics_by_seed.json``, every seed's
    ``samples.pt``, the model's files) into ``dst`` (replaced) and compare each with the digest
    recorded in the tracking store when it was logged (:data:`ARTIFACT_DIGESTS`). Raises
    :class:`UnverifiedArtifactError` naming the first file that is missing, differs, or has no
    record; the local copies are what the caller then reads."""
    import shutil

    run_id = run.info.run_id
    raw = run.data.tags.get(ARTIFACT_DIGESTS)
    if not raw:
        raise UnverifiedArtifactError(
            f"run {run_id} has no record of its artifacts' digests ({ARTIFACT_DIGESTS}): it was logged by an "
            "earlier version, so what it offers cannot be verified"
        )
    want = json.loads(raw)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    names = ["metrics_by_seed.json", *(f"samples/seed{s}/samples.pt" for s in seeds)]
    local: dict[str, Path] = {}
    for name in names:
        try:
            local[name] = download_dir(run_id, name, dst / Path(name).parent)
        except Exception as e:  # missing, or an unreadable artifact location
            raise UnverifiedArtifactError(
                f"{name} of run {run_id} cannot be read ({type(e).__name__})"
            ) from None
        if name not in want:
            raise UnverifiedArtifactError(f"{name} of run {run_id} was not recorded when the run was logged")
        if file_sha256(local[name]) != want[name]:
            raise UnverifiedArtifactError(
                f"{name} of run {run_id} is not the file logged (its digest differs)"
            )
    model_uri = run.data.tags.get("oodgate.model_uri", "")
    try:
        model_dir = download_model(model_uri, dst / "model") if model_uri else None
    except Exception as e:
        raise UnverifiedArtifactError(
            f"the model of run {run_id} cannot be read ({type(e).__name__})"
        ) from None
    if model_dir is None or model_files_digest(model_dir) != want.get(MODEL_DIGEST):
        raise UnverifiedArtifactError(
            f"the model of run {run_id} ({model_uri or 'no URI'}) is not the one logged"
        )
    return VerifiedArtifacts(
        metrics_by_seed=json.loads(local["metrics_by_seed.json"].read_text()),
        sample_dirs=[str(local[f"samples/seed{s}/samples.pt"].parent) for s in seeds],
    )


def missing_artifacts(run: Run, seeds: list[int]) -> list[str]:
    """What a finished child run must hold to be reused (its per-seed metrics and samples, its model)
    and does not: a run whose artifact store lost them is recomputed, never reused."""
    import mlflow

    c, run_id = client(), run.info.run_id
    missing = []
    try:
        top = {f.path for f in c.list_artifacts(run_id)}
        if "metrics_by_seed.json" not in top:
            missing.append("metrics_by_seed.json")
        for s in seeds:
            if f"samples/seed{s}/samples.pt" not in {
                f.path for f in c.list_artifacts(run_id, f"samples/seed{s}")
            }:
                missing.append(f"samples/seed{s}/samples.pt")
        model_uri = run.data.tags.get("oodgate.model_uri", "")
        files = (
            {f.path for f in mlflow.artifacts.list_artifacts(artifact_uri=model_uri)} if model_uri else set()
        )
        if "MLmodel" not in files:
            missing.append(f"the model ({model_uri or 'no oodgate.model_uri tag'})")
    except Exception as e:  # an unreadable artifact location is as good as missing
        missing.append(f"the artifact store ({type(e).__name__}: {e})")
    return missing


def download_json(run_id: str, artifact: str) -> Any:
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        p = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=d)
        return json.loads(Path(p).read_text())


def download_dir(run_id: str, artifact: str, dst: Path) -> Path:
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst)))


def download_model(model_uri: str, dst: Path) -> Path:
    """The logged or registered model's files in ``dst`` (a local copy, loaded from there)."""
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


@contextlib.contextmanager
def no_pickle() -> Iterator[None]:
    """MLflow refuses pickle deserialisation inside this block (its default allows it)."""
    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous


def pip_requirements() -> list[str]:
    """Explicit requirements (MLflow's inference takes seconds): the model needs torch and pandas."""
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"pandas=={version('pandas')}"]


PYFUNC_CODE = Path(__file__).resolve().parent / "pyfunc_model.py"


def output_schema(class_names: list[str]) -> Schema:
    from mlflow.types import ColSpec, Schema

    return Schema(
        [ColSpec("float", f"p_{c}") for c in class_names]
        + [ColSpec("string", "predicted"), ColSpec("float", "score"), ColSpec("boolean", "in_distribution")]
    )


def export_model(
    out_dir: Path,
    serving_model: ServingModel,
    example: torch.Tensor,
    class_names: list[str],
    reference: Mapping[str, Any] | None = None,
    preprocessing: str = "exact",
) -> Path:
    """Write what :func:`log_exported_model` logs into ``out_dir`` (replaced): ``torch_model/`` (the
    ``torch.export`` program, MLflow's pt2 format, with a signature inferred from ``example``),
    ``meta.json`` (input shape, class names, how image files are brought to that shape) and ``reference.json`` (the OOD score's name, threshold,
    its TPR and the validation ID scores it was set on: the monitoring flow tests incoming batches
    against it). All the torch work of logging a model happens here."""
    import shutil

    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    example_np = example.numpy()
    out = serving_model(example).detach().numpy()
    mlflow.pytorch.save_model(
        serving_model,
        str(out_dir / "torch_model"),
        serialization_format="pt2",
        signature=infer_signature(example_np, np.asarray(out)),
        input_example=example_np,
        pip_requirements=pip_requirements(),
    )
    meta = {
        "input_shape": list(example_np.shape[1:]),
        "class_names": list(class_names),
        "preprocessing": preprocessing,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta))
    if reference is not None:
        (out_dir / "reference.json").write_text(json.dumps(dict(reference)))
    return out_dir


def log_exported_model(run_id: str, exported: Path, name: str = "model", finish: bool = True) -> str:
    """Log the serving model that :func:`export_model` wrote: a pyfunc from code
    (``oodgate_mlflow/pyfunc_model.py``, no pickle) around the exported program, with the named output
    columns as its signature and the input shape in its metadata. Runs no torch code. Re-attaches to
    the run by id (this may run in a worker thread) and finishes it, or, with ``finish=False``, leaves
    it running for the caller to end. Returns the model URI to register (``models:/<model id>``).

    MLflow links the run's metrics of step 0 to the model as it logs it, reading the whole history of
    every metric the run has: 2.2 s of the 3.0 s this took per loss once a child run held its
    per-epoch curves. Logged before them, the model costs 0.8 s (:func:`link_metrics` links the
    metrics afterwards)."""
    import mlflow
    from mlflow.models import ModelSignature

    exported = Path(exported)
    meta = json.loads((exported / "meta.json").read_text())
    shape = meta["input_shape"]
    artifacts = {"torch_model": str(exported / "torch_model"), "meta": str(exported / "meta.json")}
    if (exported / "reference.json").is_file():
        artifacts["reference"] = str(exported / "reference.json")
    mlflow.start_run(run_id=run_id)
    try:
        with warnings.catch_warnings():
            # MLflow suggests type hints and an input example; this model checks its input itself.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.pyfunc")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_CODE),
                artifacts=artifacts,
                signature=ModelSignature(outputs=output_schema(list(meta["class_names"]))),
                metadata={
                    "input": f"images (batch, {shape[0]}, {shape[1]}, {shape[2]}): float in [0, 1] or integers 0-255 (uint8)",
                    "input_shape": [-1, *shape],
                    # image files of any size: oodgate.data.folder.decode_image (shorter side, centre crop)
                    "preprocessing": meta.get("preprocessing", "exact"),
                },
                pip_requirements=pip_requirements(),
            )
    finally:
        mlflow.end_run(status="FINISHED" if finish else "RUNNING")  # detached from this thread either way
    return str(info.model_uri)


def link_metrics(run_id: str, model_uri: str, metrics: Mapping[str, float]) -> None:
    """Link ``metrics`` (step 0) of the run to the model it logged, as MLflow links a run's metrics
    to a model logged after them (shown on the model's page)."""
    from mlflow.entities import Metric

    model_id = model_uri.removeprefix("models:/")
    now = _now_ms()
    items = [
        Metric(k, float(v), now, 0, model_id=model_id, run_id=run_id)
        for k, v in metrics.items()
        if v is not None and math.isfinite(v)
    ]
    for i in range(0, len(items), 500):
        client().log_batch(run_id, metrics=items[i : i + 500])


def log_model(
    run_id: str,
    serving_model: ServingModel,
    example: torch.Tensor,
    class_names: list[str],
    reference: Mapping[str, Any] | None = None,
    name: str = "model",
) -> str:
    """:func:`export_model` then :func:`log_exported_model`, through a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(Path(tmp) / "model", serving_model, example, class_names, reference)
        return log_exported_model(run_id, exported, name)
