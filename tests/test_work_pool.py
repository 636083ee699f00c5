"""The deployments on a Prefect work pool, the way a team runs them: real parts only.

A real Prefect server (its own PREFECT_HOME), ``python -m flows.workpool deploy`` (``make deploy``)
against a small project, one real worker (``python -m flows.workpool worker``, which becomes
``prefect worker start --pool <pool> --type process``), and ``python -m flows.trigger``
(``make trigger``) twice at once: both runs must reach Completed on the server, executed by the
worker one after the other (the deployment's concurrency limit of 1, as served), with their MLflow
runs in the tracking store the worker was given and the later run reusing what the earlier one
trained. Then the worker and the server stop, in that order, without being killed. The fast test: a bad params file is refused before the server
is asked anything.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from mlflow.tracking import MlflowClient
from stack import REPO, Stack, free_port, isolated_env, stop_process

from oodgate_servers.health import poll, wait_until

POOL = "test-pool"
FULL_NAME = "oodgate-pipeline/scheduled"
MONITOR_NAME = "oodgate-monitor/scheduled"
SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"


def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


def _wait_for_worker(stack: Stack, worker: subprocess.Popen, timeout: float = 60) -> None:
    """Until the pool has an ONLINE worker (it polls, so a run it misses waits for the next poll)."""
    with _client(stack.api_url) as client:

        def online() -> bool:
            if worker.poll() is not None:
                pytest.fail(f"the worker exited (rc={worker.returncode})\n{stack.diagnostics()}")
            return any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(POOL))

        try:
            wait_until(online, timeout)
        except TimeoutError:
            pytest.fail(f"no worker came online in pool {POOL!r}\n{stack.diagnostics()}")


def _trigger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``python -m flows.trigger ARGS`` (what ``make trigger ARGS=...`` runs)."""
    return subprocess.run(
        [sys.executable, "-m", "flows.trigger", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _run_id(trigger_output: str) -> str:
    return trigger_output.split("/runs/flow-run/", 1)[1].split()[0]


def _final(stack: Stack, flow_run_id: str, timeout: float = 240):
    """The flow run once its state is final."""
    with _client(stack.api_url) as client:
        return poll(lambda: client.read_flow_run(flow_run_id), lambda run: run.state.is_final(), timeout)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
def test_a_worker_runs_the_pool_deployment_to_completed(project, mlflow_template, tmp_path):
    from prefect.client.schemas.objects import StateType

    from flows.server import wait_healthy

    t_start = time.perf_counter()
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["schedule"] = {"cron": "30 4 * * 1", "timezone": "Europe/Berlin"}  # never due in the test
    raw["monitor"] = {"batch": "incoming/batch.npz", "schedule": {"cron": "0 0 1 1 *"}}
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    db = tmp_path / "tracking" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    tracking_uri = f"sqlite:///{db}"

    home = tmp_path / "prefect-home"
    home.mkdir()
    env = isolated_env(home)
    env.update(
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_HEARTBEAT_SECONDS="5",
        # a run held back by the concurrency limit is retried after this (default 30 s)
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2",
    )
    stack = Stack(home=home, port=free_port(), env=env)
    api_env = dict(env, PREFECT_API_URL=stack.api_url)
    worker = None
    seconds = {}
    try:
        stack.start_server()
        try:
            wait_healthy(stack.api_url, timeout=120)
        except TimeoutError:
            pytest.fail(f"Prefect server never became healthy\n{stack.diagnostics()}")

        # make deploy: the pool does not exist yet, so it is created
        t0 = time.perf_counter()
        deployed = subprocess.run(
            [sys.executable, "-m", "flows.workpool", "deploy", "--pool", POOL, "--root", str(project)],
            cwd=REPO,
            env=api_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds["deploy"] = time.perf_counter() - t0
        assert deployed.returncode == 0, f"{deployed.stdout}\n{deployed.stderr}\n{stack.diagnostics()}"
        assert f"Created work pool '{POOL}' (type process)" in deployed.stdout
        assert f"workers take the code from {REPO} on their machine" in deployed.stdout

        parameters = {"params_path": "params.yaml", "root": str(project)}
        with _client(stack.api_url) as client:
            assert client.read_work_pool(POOL).type == "process"
            pipeline_d = client.read_deployment_by_name(FULL_NAME)
            monitor_d = client.read_deployment_by_name(MONITOR_NAME)
        for d, entrypoint, cron, tz in (
            (pipeline_d, "flows/pipeline.py:pipeline", "30 4 * * 1", "Europe/Berlin"),
            (monitor_d, "flows/monitor.py:monitor", "0 0 1 1 *", "UTC"),
        ):
            assert d.work_pool_name == POOL
            assert d.entrypoint == entrypoint
            assert d.pull_steps == [{SET_WORKING_DIRECTORY: {"directory": str(REPO)}}]
            assert d.parameters == parameters
            assert d.global_concurrency_limit.limit == 1  # one run at a time, as served
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules] == [
                (cron, tz, True)
            ]

        # a pool of that name but another type is refused, not used
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.settings import PREFECT_API_URL, temporary_settings

        import flows.workpool

        with _client(stack.api_url) as client:
            client.create_work_pool(WorkPoolCreate(name="other", type="kubernetes", base_job_template={}))
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            with pytest.raises(
                flows.workpool.PoolError, match="'other' is of type 'kubernetes', not 'process'"
            ):
                flows.workpool.ensure_pool("other")

        # make worker: one process worker, with the tracking store it hands to its runs
        worker_log = home / "worker.log"
        stack.logs["worker"] = worker_log
        t0 = time.perf_counter()
        with worker_log.open("w") as fh:
            worker = subprocess.Popen(
                [sys.executable, "-m", "flows.workpool", "worker", "--pool", POOL],
                cwd=tmp_path,  # not the project: the run must change into --checkout by itself
                env=dict(api_env, MLFLOW_TRACKING_URI=tracking_uri),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # as a shell starts `make worker &`: SIGINT ignored, which the worker's own SIGTERM
                # handling relies on; it must stop on SIGTERM all the same
                preexec_fn=_ignore_sigint,
            )
        _wait_for_worker(stack, worker)
        seconds["worker online"] = time.perf_counter() - t0

        # make trigger, twice at once: one worker takes both runs, the deployment's concurrency limit
        # (held by the server, whichever workers there are) runs them one after the other
        t0 = time.perf_counter()
        first = _trigger(api_env)
        assert first.returncode == 0, f"{first.stdout}\n{first.stderr}\n{stack.diagnostics()}"
        second = _trigger(api_env, "--wait")
        assert second.returncode == 0, f"{second.stdout}\n{second.stderr}\n{stack.diagnostics()}"
        assert "ended Completed" in second.stdout
        ids = [_run_id(first.stdout), _run_id(second.stdout)]
        runs = [_final(stack, run_id) for run_id in ids]
        seconds["two triggers to both Completed"] = time.perf_counter() - t0

        for run in runs:
            assert run.state.type == StateType.COMPLETED, f"{run.state}\n{stack.diagnostics()}"
            assert run.deployment_id == pipeline_d.id
            assert run.work_pool_name == POOL  # a worker of the pool ran it, not a serve process
            assert run.parameters == parameters
            assert f"submitting flow run '{run.id}'" in worker_log.read_text()
        earlier, later = sorted(runs, key=lambda r: r.start_time)
        assert earlier.end_time <= later.start_time  # one at a time
        with _client(stack.api_url) as client:
            waited = {s.name for s in client.read_flow_run_states(later.id)}
        assert "AwaitingConcurrencySlot" in waited, waited

        # the MLflow runs where the worker's tracking URI says, none in the project; the later run
        # trained nothing: it reused the earlier run's child runs
        mlflow = MlflowClient(tracking_uri=tracking_uri)
        exp = mlflow.get_experiment_by_name("oodgate")
        parents = {
            run.id: mlflow.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`oodgate.prefect_flow_run_id` = '{run.id}' "
                "and tags.`oodgate.role` = 'pipeline'",
            )
            for run in runs
        }
        assert all(len(p) == 1 and p[0].info.status == "FINISHED" for p in parents.values()), parents
        children = mlflow.search_runs([exp.experiment_id], filter_string="tags.`oodgate.role` != 'pipeline'")
        assert sorted(c.info.run_name for c in children) == sorted(raw["losses"])  # each trained once
        assert all(c.info.status == "FINISHED" for c in children)
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[earlier.id][0].info.run_id}
        reused = parents[later.id][0].data.tags["oodgate.reused_runs"]
        assert {item.split("=")[0] for item in reused.split(",")} == set(raw["losses"])
        assert not (project / "mlflow.db").exists()
        assert list((project / "artifacts" / "cache").glob("train-*"))  # the project's workdir

        t0 = time.perf_counter()
        graceful = {"worker": stop_process(worker, timeout=30)}
        graceful.update(stack.stop())
        seconds["stop"] = time.perf_counter() - t0
        assert graceful == {"worker": True, "serve": True, "server": True}, (
            f"{graceful}\n{stack.diagnostics()}"
        )
    finally:
        stop_process(worker, timeout=30)
        stack.stop()
    seconds["total"] = time.perf_counter() - t_start
    print("work pool: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with 200 and an empty JSON object, and remembers it."""

    requests: ClassVar[list[str]] = []

    def _answer(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        body = json.dumps({}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder():
    _Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api", _Recorder.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "change, key, value",
    [
        ({"train": {"epochs": 0}}, "train.epochs", "0"),
        ({"schedule": {"cron": "every day", "timezone": "UTC"}}, "schedule.cron", "every day"),
    ],
)
def test_invalid_params_fail_before_anything_is_registered(tmp_path, capsys, recorder, change, key, value):
    import flows.workpool

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    bad: Path = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    api_url, requests = recorder

    rc = flows.workpool.main(["deploy", "--params", str(bad), "--api-url", api_url, "--pool", POOL])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert key in err and value in err and "nothing was deployed" in err
    assert "Traceback" not in err
    assert requests == []  # the server was not asked anything: no pool, no deployment


@pytest.mark.parametrize("command", ["deploy", "worker"])
def test_without_a_server_deploy_and_worker_say_how_to_start_one(command, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    out = subprocess.run(
        [sys.executable, "-m", "flows.workpool", command, "--api-url", url],
        cwd=REPO,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"no Prefect server answers at {url}" in out.stderr and "make server" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkout", "relative/path"], "--checkout must be an absolute path on the worker machines"),
        (["--pool", "a/b"], "work pool name 'a/b' is not valid"),
    ],
)
def test_bad_deploy_options_fail_before_anything_is_registered(capsys, recorder, args, message):
    import flows.workpool

    api_url, requests = recorder
    rc = flows.workpool.main(["deploy", "--api-url", api_url, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "nothing was deployed" in err
    assert requests == []
