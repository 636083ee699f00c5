"""The (loss, seed) fan-out on a Dask cluster: ``orchestration.task_runner: dask``.

The user's path: ``python -m flows.pipeline --set orchestration.task_runner=dask`` in its own
process (prefect-dask's runner on a real local cluster of 2 worker processes, a temporary Prefect
server, its own SQLite MLflow store) against the same project run by the thread runner in this
process (Prefect test server): every evaluation file is byte-identical. The workers report to the
flow's temporary Prefect server (they start none of their own) and the cluster closes them without
killing them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import shell_env
from stack import isolated_env

from oodgate.base.config import ConfigError, parse_config


def _evaluations(project: Path) -> dict[str, bytes]:
    files = sorted((project / "artifacts" / "cache").glob("evaluate-*/metrics.json"))
    return {f.parent.name: f.read_bytes() for f in files}


def _watch_servers(proc: subprocess.Popen, prefect_home: str) -> dict[int, int]:
    """Every Prefect server (uvicorn) process that runs with this PREFECT_HOME while ``proc`` runs,
    pid -> parent pid, filled in by a thread that polls until ``proc`` ends."""
    found: dict[int, int] = {}

    def poll() -> None:
        while proc.poll() is None:
            for p in psutil.process_iter():
                try:
                    if p.pid not in found and p.environ().get("PREFECT_HOME") == prefect_home:
                        if "uvicorn" in " ".join(p.cmdline()):
                            found[p.pid] = p.ppid()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.5)

    threading.Thread(target=poll, daemon=True).start()
    return found


@pytest.mark.slow
def test_a_local_dask_cluster_gives_the_thread_runner_s_metrics(
    prefect_harness, project_template, mlflow_template, mlflow_db, tmp_path
):
    from flows.pipeline import pipeline

    threads, dask = tmp_path / "threads", tmp_path / "dask"
    shutil.copytree(project_template, threads, symlinks=True)
    shutil.copytree(project_template, dask, symlinks=True)

    result = pipeline(root=str(threads))
    assert not result.failed

    shutil.copy(mlflow_template, tmp_path / "dask.db")
    env = isolated_env(tmp_path / "prefect-home")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'dask.db'}"
    cmd = [sys.executable, "-m", "flows.pipeline", "--root", str(dask)]
    cmd += ["--set", "orchestration.task_runner=dask", "--set", "orchestration.workers=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    servers = _watch_servers(proc, str(tmp_path / "prefect-home"))
    out, _ = proc.communicate(timeout=600)
    print(out[-6000:])
    assert proc.returncode == 0, out[-4000:]
    assert "DaskTaskRunner" in out or "dask" in out.lower()
    # the workers report to the flow's temporary server instead of each starting one, and closing the
    # cluster ends them without a kill
    assert list(servers.values()) == [proc.pid], servers
    assert "Worker process still alive after" not in out, out[-4000:]  # then: "..., killing"

    a, b = _evaluations(threads), _evaluations(dask)
    assert len(a) == 2 and a.keys() == b.keys()  # 2 losses, the same fingerprints
    for name in a:
        assert a[name] == b[name], name


def test_the_runner_is_chosen_in_params_and_an_address_needs_dask():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.dask_cluster import task_runner_for

    base = {
        "losses": {"softmax": {"method": "softmax"}},
        "gate": {"confidence": None},
        "data": {"ood": ["gaussian_noise"]},
    }
    assert isinstance(task_runner_for(parse_config(base)), ThreadPoolTaskRunner)
    local = task_runner_for(parse_config({**base, "orchestration": {"task_runner": "dask", "workers": 3}}))
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["host"] == "127.0.0.1"
    import dask.config
    import torch

    environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())  # the thread runner's, not 1
    assert "MALLOC_TRIM_THRESHOLD_" not in environ  # made every training 3.2x slower
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"  # 3 workers share the cores
    from flows.server import prefect_api_url

    # the API this process uses (here the test server), or each worker starts a server of its own
    assert environ.get("PREFECT_API_URL") == prefect_api_url()
    from distributed import Nanny

    assert issubclass(local.cluster_kwargs["worker_class"], Nanny)  # a closing worker gets 16 s
    # a connection closed by the cluster's close is not logged with its traceback: not by the
    # scheduler in this process, nor by a worker process started with the workers' environment
    import logging
    import os
    import subprocess
    import sys

    assert logging.getLogger("distributed.batched").getEffectiveLevel() == logging.WARNING
    level = "import logging, distributed; print(logging.getLogger('distributed.batched').getEffectiveLevel())"
    worker = subprocess.run(
        [sys.executable, "-c", level],
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        check=True,
    )
    assert worker.stdout.strip() == str(logging.WARNING)
    remote = {"task_runner": "dask", "address": "tcp://10.0.0.5:8786"}
    assert task_runner_for(parse_config({**base, "orchestration": remote})).address == "tcp://10.0.0.5:8786"
    with pytest.raises(ConfigError, match=r"orchestration.address='tcp://x:1' is a Dask scheduler"):
        parse_config({**base, "orchestration": {"address": "tcp://x:1"}})


_HEARTBEAT = """
import logging, sys
import distributed.worker
from distributed.comm.core import CommClosedError
from tornado.iostream import StreamClosedError
from flows import entry

def heartbeat_fails():  # what a worker's heartbeat logs when its connection closed under it
    try:
        try:
            raise StreamClosedError()
        except StreamClosedError as e:
            raise CommClosedError("in <TCP (closed) ConnectionPool.heartbeat_worker>: Stream is closed") from e
    except OSError:
        logging.getLogger("distributed.worker").exception("Failed to communicate with scheduler during heartbeat.")

heartbeat_fails()
print("STOPPED", file=sys.stderr, flush=True)
entry.stop_dask_worker("SIGTERM")  # what the flow runs in every worker on a signal
heartbeat_fails()
logging.getLogger("distributed.worker").error("a worker's own error", exc_info=ValueError("kept"))
"""


def test_after_a_stop_a_worker_s_closed_connection_is_not_logged_with_its_traceback():
    """The cluster's close after a signal cuts a worker's heartbeat on its way (1 SIGTERM in 25 during
    training printed distributed's ERROR with two tracebacks): once the flow has stopped the worker,
    a closed connection is dropped from its logs; before, and any other error, logged as before."""
    done = subprocess.run(
        [sys.executable, "-c", _HEARTBEAT],
        capture_output=True,
        text=True,
        env={**shell_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    running, stopped = done.stderr.split("STOPPED\n")
    assert "Failed to communicate with scheduler during heartbeat" in running and "CommClosedError" in running
    assert "heartbeat" not in stopped and "CommClosedError" not in stopped, stopped
    assert "ValueError: kept" in stopped  # the worker's other errors keep their tracebacks
