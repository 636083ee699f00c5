"""Beyond one machine: two flows that share a PostgreSQL-backed MLflow server and a Prefect server.

``tasks.mlflow_server`` (what ``make mlflow-server`` runs) starts a real PostgreSQL cluster in a
temporary directory and ``mlflow server`` on it with proxied artifacts; a real Prefect server runs
beside it. Two projects, each with its own work directory (so no file lock is shared between them,
as on two machines), run ``python -m flows.pipeline`` at the same moment against both servers. Both
promote their candidate (IsoMax+ beats SoftMax on the means: one seed, ``gate.confidence: null``);
the second project trains one epoch more, and its model beats the first's on accuracy, ECE and
mean FPR95. Then:

- both processes exit 0, both Prefect flow runs are Completed, no "database is locked";
- the runs are in PostgreSQL (counted there), their artifacts in the server's artifact directory,
  nothing in the projects' local stores; the champion loads through the server;
- the registry holds two versions, exactly one champion (the better model), both decisions;
- both registrations held the Prefect global concurrency limit, one after the other (its
  acquired/released events), and the limit exists on the server with one slot;
- Ctrl-C stops MLflow, then PostgreSQL.

Two quick tests check the refusals before anything starts: no PostgreSQL installed, and (as root)
a directory the cluster's user cannot enter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from stack import REPO, Stack, free_port, isolated_env, read_events, stop_process

from oodgate_servers.health import poll

MODEL = "oodgate-classifier"
LIMIT = f"oodgate-registry-{MODEL}"
# Seed 1, IsoMax+ against SoftMax: after 2 epochs accuracy 0.867 vs 0.817, ECE 0.038 vs 0.114,
# mean FPR95 0.867 vs 0.946; after 3 epochs 0.967, 0.013, 0.798 (CPU): both promote, the second wins.
EPOCHS = {"first": 2, "better": 3}


@dataclass
class TrackingServer:
    """``python -m oodgate_servers.mlflow_server`` (what ``make mlflow-server`` runs) as a subprocess."""

    root: Path
    port: int
    pg_port: int
    proc: subprocess.Popen
    log: Path
    seconds: float = 0.0  # from the start to the line that prints the address

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def start(self, timeout: float = 120) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if "Track on it:" in self.log.read_text():
                self.seconds = time.perf_counter() - t0
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"make mlflow-server did not come up (rc={self.proc.poll()}):\n{self.log.read_text()}")


@dataclass
class Shared:
    server: TrackingServer
    stack: Stack
    projects: dict[str, Path]
    procs: dict[str, subprocess.CompletedProcess]
    seconds: dict[str, float]

    @property
    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.server.url)

    def prefect(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.stack.api_url}):
            return get_client(sync_client=True)


def _project(template: Path, dst: Path, epochs: int) -> Path:
    shutil.copytree(template, dst, symlinks=True)
    params = yaml.safe_load((template / "params.yaml").read_text())
    params["seeds"] = [1]
    params["train"]["epochs"] = epochs
    params["losses"] = {"softmax": {"method": "softmax"}, "isomax_plus": {"method": "isomax_plus"}}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def _start_tracking_server(root: Path) -> TrackingServer:
    port, pg_port = free_port(), free_port()
    log = root.parent / "mlflow-server.out"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "oodgate_servers.mlflow_server", "--dir", str(root)),
                *("--port", str(port), "--pg-port", str(pg_port), "--workers", "1"),
            ],
            cwd=REPO,
            env=isolated_env(root.parent),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a terminal's foreground job: the test sends it Ctrl-C
        )
    return TrackingServer(root, port, pg_port, proc, log)


@pytest.fixture(scope="module")
def shared(project_template, tmp_path_factory):
    from flows.server import wait_healthy
    from oodgate_servers import mlflow_server

    if mlflow_server.postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH)")
    base = tmp_path_factory.mktemp("shared")
    projects = {k: _project(project_template, base / k, e) for k, e in EPOCHS.items()}
    # Started as root, the cluster runs as `nobody`, which cannot enter pytest's 0700 temporary tree.
    pg_root = Path(tempfile.mkdtemp(prefix="oodgate-mlflow-"))
    pg_root.chmod(0o755)
    home = base / "prefect-home"
    home.mkdir()
    stack = Stack(home=home, port=free_port(), env=isolated_env(home))
    server = None
    try:
        server = _start_tracking_server(pg_root / "server")
        stack.start_server()  # boots while PostgreSQL and MLflow start
        server.start()
        print(
            f"PostgreSQL-backed MLflow server up after {server.seconds:.1f} s (first start, initdb included)"
        )
        try:
            wait_healthy(stack.api_url, timeout=120)
        except TimeoutError:
            pytest.fail(f"Prefect server never became healthy\n{stack.diagnostics()}")
        env = dict(stack.env, PREFECT_API_URL=stack.api_url, MLFLOW_TRACKING_URI=server.url)
        started, running = {}, {}
        for name, project in projects.items():  # at the same moment
            started[name] = time.perf_counter()
            running[name] = subprocess.Popen(
                [sys.executable, "-m", "flows.pipeline", "--root", str(project)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        procs, seconds = {}, {}
        for name, proc in running.items():
            try:
                out, err = proc.communicate(timeout=400)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            seconds[name] = time.perf_counter() - started[name]
            procs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        yield Shared(server, stack, projects, procs, seconds)
    finally:
        stack.stop()
        if server is not None:
            stop_process(server.proc, timeout=30)
        shutil.rmtree(pg_root, ignore_errors=True)


def _parents(s: Shared) -> dict[str, object]:
    """The pipeline run of each project, by the project's name (its data lineage is the same, so
    tell them apart by the epochs they logged)."""
    exp = s.mlflow.get_experiment_by_name("oodgate")
    runs = s.mlflow.search_runs([exp.experiment_id], filter_string="tags.`oodgate.role` = 'pipeline'")
    by_epochs = {int(r.data.params["train.epochs"]): r for r in runs}
    assert len(runs) == 2 and sorted(by_epochs) == sorted(EPOCHS.values()), [r.data.params for r in runs]
    return {name: by_epochs[e] for name, e in EPOCHS.items()}


def _candidate(s: Shared, parent) -> object:
    exp = s.mlflow.get_experiment_by_name("oodgate")
    (child,) = s.mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.run_name = 'isomax_plus'",
    )
    return child


@pytest.mark.slow
def test_both_flows_complete_against_the_shared_servers(shared):
    for name, proc in shared.procs.items():
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, (
            f"{name}: rc={proc.returncode}\n{out[-6000:]}\n{shared.stack.diagnostics()}"
        )
        assert "database is locked" not in out, name
        assert "Traceback" not in out, f"{name}\n{out[-6000:]}"
        print(f"{name}: python -m flows.pipeline, {EPOCHS[name]} epochs, wall {shared.seconds[name]:.1f} s")
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with shared.prefect() as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["oodgate-pipeline"])))
    assert len(runs) == 2 and {r.state.type.value for r in runs} == {"COMPLETED"}, [r.state for r in runs]


@pytest.mark.slow
def test_runs_live_in_postgres_and_artifacts_in_the_served_directory(shared):
    import psycopg2

    from oodgate_servers import mlflow_server

    exp = shared.mlflow.get_experiment_by_name("oodgate")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location  # proxied
    runs = shared.mlflow.search_runs([exp.experiment_id])
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}  # 2 x (pipeline + 2 losses)
    password = (shared.server.root / "password").read_text().strip()
    with (
        psycopg2.connect(
            host="127.0.0.1",
            port=shared.server.pg_port,
            user=mlflow_server.DB_USER,
            password=password,
            dbname=mlflow_server.DB_NAME,
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert cur.fetchone()[0] == 6
    for parent in _parents(shared).values():
        stored = shared.server.artifacts / exp.experiment_id / parent.info.run_id / "artifacts"
        assert (stored / "comparison.md").read_text().startswith("# oodgate pipeline")
        assert "comparison.md" in {f.path for f in shared.mlflow.list_artifacts(parent.info.run_id)}
    assert any(shared.server.artifacts.rglob("MLmodel")), "the logged models went to the served directory"
    for project in shared.projects.values():  # nothing went to a project's local store
        assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()


@pytest.mark.slow
def test_exactly_one_champion_the_better_model_and_both_decisions(shared):
    from oodgate.base.config import GateConfig
    from oodgate.deciding.gate import compare_means

    parents = _parents(shared)
    children = {name: _candidate(shared, p) for name, p in parents.items()}
    for name, parent in parents.items():
        assert parent.data.tags["oodgate.promoted"] == "isomax_plus", name
        assert parent.data.tags["oodgate.registry"].startswith("isomax_plus: "), name
        assert children[name].data.tags["oodgate.gate"] == "promote"
        assert children[name].data.tags["oodgate.champion_reasons"]
    versions = shared.mlflow.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 2 and all(v.description for v in versions)
    assert {v.tags["oodgate.champion_decision"] for v in versions} <= {"promoted", "kept_champion"}
    champion = shared.mlflow.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == children["better"].info.run_id
    gate = GateConfig()
    m = {name: c.data.metrics for name, c in children.items()}
    assert compare_means(m["better"], m["first"], gate).promote  # the gate's rule picks it
    assert not compare_means(m["first"], m["better"], gate).promote
    tags = {name: c.data.tags for name, c in children.items()}
    assert tags["better"]["oodgate.champion"] == "true"
    # whichever registered first took the alias first; the first project's model keeps it only if
    # it came first and is then replaced, so its final tag says so or that it did not beat the champion
    assert tags["first"]["oodgate.champion"] == "true" or "did not" in next(
        v.description for v in versions if v.run_id == children["first"].info.run_id
    )


@pytest.mark.slow
def test_the_champion_loads_through_the_server(shared, monkeypatch):
    from oodgate_mlflow.champion import load_champion

    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared.server.url)
    model, version = load_champion()
    assert version == int(shared.mlflow.get_model_version_by_alias(MODEL, "champion").version)
    table = model.predict(np.random.default_rng(0).random((4, 1, 28, 28)))
    assert list(table.columns) == ["p_0", "p_1", "p_2", "predicted", "score", "in_distribution"]


def _limit_events(api_url: str, wait: float = 30.0) -> list[tuple[str, str]]:
    """(time, phase) of the limit's acquired/released events, once both of each reached the server
    (clients send them over a websocket; the server persists them shortly after)."""

    def fetch() -> list[tuple[str, str]]:
        events = []
        for phase in ("acquired", "released"):
            got = read_events(api_url, f"prefect.concurrency-limit.{phase}", wait=0)
            events += [
                (e["occurred"], phase) for e in got if e["resource"].get("prefect.resource.name") == LIMIT
            ]
        return events

    return sorted(poll(fetch, lambda events: len(events) >= 4, wait, interval=1))


@pytest.mark.slow
def test_registrations_held_the_prefect_limit_one_after_the_other(shared):
    with shared.prefect() as client:
        limit = client.read_global_concurrency_limit_by_name(LIMIT)
    assert limit.limit == 1 and limit.active and limit.active_slots == 0
    for v in shared.mlflow.search_model_versions(f"name='{MODEL}'"):
        how = v.tags["oodgate.registry_lock"]
        assert how.startswith(f"Prefect concurrency limit {LIMIT!r} at {shared.stack.api_url}"), how
    events = _limit_events(shared.stack.api_url)
    assert [phase for _, phase in events] == ["acquired", "released", "acquired", "released"], events


@pytest.mark.slow
def test_a_limit_widened_by_hand_is_refused(shared):
    """A limit someone set to two slots would no longer serialise: the registry refuses it and says
    how to restore it, instead of registering unprotected."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import registry

    with shared.prefect() as client:
        client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(limit=2))
    try:
        with temporary_settings({PREFECT_API_URL: shared.stack.api_url}):
            with pytest.raises(
                registry.RegistryBusyError, match=rf"prefect gcl update {LIMIT} --limit 1 --enable"
            ):
                registry.ensure_limit(LIMIT)
    finally:
        with shared.prefect() as client:
            client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(limit=1))


@pytest.mark.slow
def test_ctrl_c_stops_mlflow_then_postgres(shared):
    """Last: Ctrl-C (SIGINT to the foreground process) stops MLflow, then PostgreSQL's fast shutdown;
    nothing is left listening."""
    import signal
    import socket

    server = shared.server
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()
    assert "Stopped MLflow and PostgreSQL." in server.log.read_text()
    assert "database system is shut down" in (server.root / "postgres.log").read_text()
    assert not (server.root / "pgdata" / "postmaster.pid").exists()
    for port in (server.port, server.pg_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


# ------------------------------------------------------------------ refusals, before anything starts
def test_without_postgresql_the_server_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from oodgate_servers import mlflow_server

    monkeypatch.setenv("OODGATE_PG_BIN", str(tmp_path))  # no initdb there
    assert mlflow_server.main(["--dir", str(tmp_path / "server")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PostgreSQL is not installed") and "apt-get install postgresql" in err
    assert not (tmp_path / "server").exists()


def test_as_root_a_directory_the_cluster_user_cannot_enter_is_refused(tmp_path, capsys):
    import os

    from oodgate_servers import mlflow_server

    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to another user")
    if mlflow_server.postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    ports = ["--port", str(free_port()), "--pg-port", str(free_port())]
    assert mlflow_server.main(["--dir", str(closed / "server"), *ports]) == 2
    err = capsys.readouterr().err
    assert "runs as user 'nobody', which cannot enter" in err and "--dir" in err, err
    assert list((closed / "server").iterdir()) == []  # nothing written


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, capsys):
    import socket

    from oodgate_servers import mlflow_server

    if mlflow_server.postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--dir", str(tmp_path / "server"), "--port", str(port), "--pg-port", str(free_port())]
        assert mlflow_server.main(args) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err, err
    assert not (tmp_path / "server").exists()


def test_as_root_an_unknown_cluster_user_is_refused(tmp_path, capsys):
    import os

    from oodgate_servers import mlflow_server

    if os.geteuid() != 0 or mlflow_server.postgres_bin() is None:
        pytest.skip("only root hands the cluster to another user; needs PostgreSQL")
    ports = ["--port", str(free_port()), "--pg-port", str(free_port())]
    args = ["--dir", str(tmp_path / "server"), "--pg-user", "no-such-user-oodgate", *ports]
    assert mlflow_server.main(args) == 2
    err = capsys.readouterr().err
    assert "there is no OS user 'no-such-user-oodgate'" in err and "--pg-user" in err, err
    assert not (tmp_path / "server").exists()
