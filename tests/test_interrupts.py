"""Signals sent to a real ``python -m flows.pipeline`` process in the middle of training.

SIGTERM to the process (``kill``), SIGTERM to its process group (``timeout``, systemd, ``kill --
-PGID``) and SIGINT to the group (Ctrl-C in a terminal) stop it within a batch: the MLflow parent
run ends KILLED with the signal's name as the reason, no run stays RUNNING, and the temporary Prefect
server it started is gone. After a SIGKILL, which nothing can catch, the next run closes the runs the
killed one left open, with a tag saying why, and the temporary server ends by itself. With the Dask
runner, the workers use the flow's temporary server rather than each starting one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import shell_env
from mlflow.tracking import MlflowClient
from stack import prefect_home

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


_started: list[FlowProcess] = []


@pytest.fixture(autouse=True)
def _nothing_left_running(project):
    """A failed test leaves no flow, worker or server of its own running (they train for minutes)."""
    yield
    for flow in _started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow.proc.pid, signal.SIGKILL)
    _started.clear()
    for p in _of_project(project):  # re-parented out of the group
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


class FlowProcess:
    """``python -m flows.pipeline`` in its own session (its own process group, as in a terminal)."""

    def __init__(self, project: Path, *overrides: str) -> None:
        env = {k: v for k, v in shell_env().items() if not k.startswith("PREFECT_API")}
        env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(prefect_home(project / ".prefect")))
        cmd = [sys.executable, "-m", "flows.pipeline", "--root", str(project)]
        for o in overrides:
            cmd += ["--set", o]
        self.proc = subprocess.Popen(
            cmd,
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        _started.append(self)
        self.lines: list[str] = []
        self.training = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        epochs = 0
        for line in self.proc.stdout:
            self.lines.append(line)
            epochs += " - epoch " in line
            if epochs == 2:  # training is under way (a resumed run starts past epoch 1)
                self.training.set()

    def wait_for_training(self) -> list[psutil.Process]:
        """Block until two epochs were logged; return the processes it started (the Prefect server)."""
        assert self.training.wait(180), "".join(self.lines)
        return psutil.Process(self.proc.pid).children(recursive=True)

    def finish(self) -> int:
        try:
            return self.proc.wait(90)  # a hang, not a speed target: SIGINT used to take 148 s
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the flow did not stop:\n" + "".join(self.lines)) from None


def _runs(status: str | None = None):
    c = MlflowClient()
    exp = c.get_experiment_by_name("oodgate")
    runs = c.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if status is None or r.info.status == status]


def _gone(processes: list[psutil.Process]) -> bool:
    def dead(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(dead(p) for p in processes)


def _of_project(project: Path) -> list[psutil.Process]:
    """The live processes started for this project's flow, wherever they were re-parented: they all
    inherit its PREFECT_HOME."""
    home = str(project / ".prefect")
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("PREFECT_HOME") == home and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _servers(project: Path) -> list[psutil.Process]:
    """This project's live Prefect servers (uvicorn processes, Prefect's or flows.temporary_server's)."""
    found = []
    for p in _of_project(project):
        try:
            if "uvicorn" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _wait_until_gone(processes: list[psutil.Process], seconds: float) -> float:
    """Seconds until every process has ended (at most ``seconds``; the caller asserts)."""
    t0 = time.monotonic()
    while not _gone(processes) and time.monotonic() - t0 < seconds:
        time.sleep(0.2)
    return time.monotonic() - t0


def _sigkilled_run(project: Path):
    """A run whose flow process alone was killed with SIGKILL in the middle of training: nothing
    could mark its MLflow run or stop its temporary server, which must end by itself."""
    flow = FlowProcess(project, "train.epochs=300")
    flow.wait_for_training()
    (server,) = _servers(project)
    assert server.ppid() == flow.proc.pid
    os.kill(flow.proc.pid, signal.SIGKILL)  # the process alone: its server is not signalled
    flow.proc.wait(30)
    seconds = _wait_until_gone([server], 30)
    print(f"the temporary server ended {seconds:.1f} s after the flow's SIGKILL")
    assert _gone([server]), server.cmdline()
    assert _of_project(project) == []
    (left,) = _runs("RUNNING")
    return left


@pytest.mark.parametrize("how", ["SIGTERM", "SIGTERM to the group", "SIGINT to the group"])
def test_an_interrupt_stops_the_run_marks_it_killed_and_stops_the_server(project, mlflow_db, how):
    # after a SIGKILL (SIGTERM case only, to keep the suite short) the temporary server ends by
    # itself, and the next run closes what the killed one left open
    left = _sigkilled_run(project) if how == "SIGTERM" else None
    flow = FlowProcess(project, "train.epochs=300")
    children = flow.wait_for_training()
    assert children, "the temporary Prefect server should be a child process"
    name = how.split()[0]
    t0 = time.monotonic()
    if how == "SIGTERM":
        os.kill(flow.proc.pid, signal.SIGTERM)
    else:  # Ctrl-C, timeout, systemd, kill -- -PGID: every process of the group, the server too
        os.killpg(flow.proc.pid, signal.Signals[name])
    assert flow.finish() == 130, "".join(flow.lines)
    print(f"{how}: the flow exited {time.monotonic() - t0:.1f} s after the signal")
    out = "".join(flow.lines)
    assert f"error: {name}: stopped; the MLflow runs are marked KILLED" in out, out[-3000:]
    assert "ConnectError" not in out.splitlines()[-1]
    assert _runs("RUNNING") == []
    (parent,) = [
        r
        for r in _runs()
        if r.data.tags.get("oodgate.role") == "pipeline"
        and (left is None or r.info.run_id != left.info.run_id)
    ]
    assert parent.info.status == "KILLED"
    assert parent.data.tags["oodgate.failure"] == f"interrupted: {name} received"
    assert _gone(children), [p.pid for p in children]
    # the checkpoint of the last finished epoch is there to resume from
    assert list((project / "artifacts" / "cache").glob("train-*/last.pt"))
    if left is not None:
        closed = MlflowClient().get_run(left.info.run_id)
        assert closed.info.status == "KILLED"
        assert f"process {left.data.tags['oodgate.pid']} had died" in closed.data.tags["oodgate.closed_by"]


def test_dask_workers_use_the_flow_s_server_and_sigterm_leaves_no_process(project, mlflow_db):
    flow = FlowProcess(
        project, "train.epochs=300", "orchestration.task_runner=dask", "orchestration.workers=2"
    )
    flow.wait_for_training()
    workers = [p for p in psutil.Process(flow.proc.pid).children() if "uvicorn" not in " ".join(p.cmdline())]
    assert len(workers) >= 2, [p.cmdline() for p in workers]  # the local cluster's worker processes
    servers = _servers(project)
    # one server, the flow's own: without the flow's PREFECT_API_URL each worker started its own
    assert [p.ppid() for p in servers] == [flow.proc.pid], [(p.pid, p.ppid(), p.cmdline()) for p in servers]
    t0 = time.monotonic()
    os.kill(flow.proc.pid, signal.SIGTERM)
    assert flow.finish() == 130, "".join(flow.lines)
    print(f"Dask, SIGTERM: the flow exited {time.monotonic() - t0:.1f} s after the signal")
    out = "".join(flow.lines)
    assert "error: SIGTERM: stopped; the MLflow runs are marked KILLED" in out, out[-3000:]
    # the workers' trainings stopped within a batch, and the cluster closed them without a kill
    assert "TrainingInterrupted: training interrupted at epoch" in out, out[-3000:]
    assert "Worker process still alive after" not in out, out[-3000:]
    # quietly: no closed-connection tracebacks, no second cluster started after the signal, no
    # semaphores left for the resource tracker to report
    assert "CommClosedError" not in out and "Traceback" not in out, out[-3000:]
    assert out.count("Creating a new Dask cluster") == 1, out[-3000:]
    assert "leaked semaphore" not in out, out[-3000:]
    left = _of_project(project)
    _wait_until_gone(left, 30)  # a worker notices its nanny is gone within a second or two
    assert _of_project(project) == [], [(p.pid, p.cmdline()) for p in _of_project(project)]
