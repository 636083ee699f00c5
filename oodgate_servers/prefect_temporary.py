"""The temporary Prefect server of ``python -m flows.pipeline`` without ``PREFECT_API_URL``.

Prefect's own server app and command (what its ``SubprocessASGIServer`` runs: uvicorn on 127.0.0.1,
no UI, the ephemeral server's services), started and stopped here, with two differences:

- The flow process never imports Prefect's server code. Prefect's client manages its temporary
  server through ``prefect.server.api.server``, which brings FastAPI and the server's models: 1.0 s
  of imports before the first task, in a process that only talks to the server over HTTP. Here the
  server is one ``subprocess.Popen``; the flow's clients are pointed at it with ``PREFECT_API_URL``
  (``flows.server.temporary_api``).
- The server process ends when the flow process that started it is gone. Prefect's server outlives
  a SIGKILL of the flow process (nothing runs in the flow any more to stop it) and stayed up, about
  230 MB, for good. The server runs a thread that compares ``os.getppid()`` with the flow's pid once
  a second; when the flow dies, the server is re-parented (to init or a subreaper) and SIGTERMs
  itself, which uvicorn answers with its graceful shutdown. Not ``prctl(PR_SET_PDEATHSIG)``: Linux
  sends that signal when the *thread* that started the child exits.

Imports nothing of Prefect, NumPy or torch: :mod:`flows` starts the server before they load.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from oodgate.base.project import PROJECT_ROOT
from oodgate_servers import health

PARENT_VARIABLE = "OODGATE_SERVER_PARENT"  # the pid of the flow process the server belongs to
POLL_SECONDS = 1.0
# uvicorn's graceful shutdown (Prefect's lifespan, the database) took under 2 s; a server that hangs
# in it is ended anyway
SHUTDOWN_SECONDS = 20.0
STARTUP_FAILURE = 3  # uvicorn's exit status when it cannot start (the port taken meanwhile): retried


class ServerStartError(RuntimeError):
    """The temporary server exited, or did not answer its health check in time."""


class TemporaryServer:
    """One temporary Prefect server on a free port of 127.0.0.1, stopped at this process's exit."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Start the server process and return at once (it boots while the caller goes on)."""
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",  # the ephemeral server's services, as Prefect's own
            "PREFECT__SERVER_FINAL": "1",
            PARENT_VARIABLE: str(os.getpid()),
        }
        env.pop("PREFECT_API_URL", None)  # this server is the API; it must not look for another
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(PROJECT_ROOT)]
        cmd += ["--factory", f"{__name__}:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(cmd, env=env)
        atexit.register(self.stop)

    def wait(self, timeout: float) -> None:
        """Until the server answers its health check; ServerStartError if it exits or times out.
        A server whose port was taken between the choice and its start is started again elsewhere."""

        def answers() -> bool:
            if self.process is None:
                raise ServerStartError("the temporary Prefect server was stopped")
            status = self.process.poll()
            if status == STARTUP_FAILURE:
                self.port = _free_port()
                self.start()
                return False
            if status is not None:
                raise ServerStartError(f"the temporary Prefect server exited with status {status}")
            return health.healthy(self.api_url)

        try:
            health.wait_until(
                answers, timeout, 0.1, f"the temporary Prefect server at {self.api_url} did not answer"
            )
        except TimeoutError as e:
            raise ServerStartError(str(e)) from None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the server (its graceful shutdown, then a kill); quietly, at most once."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        health.end_process(process, timeout=5)


def _free_port() -> int:
    """A port of 127.0.0.1 that no one listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_app():  # -> FastAPI, in the server process
    """Prefect's server app; the server process ends when the flow process that started it is gone."""
    from prefect.server.api.server import create_app as prefect_app

    parent = os.environ.get(PARENT_VARIABLE, "")
    if parent.isdigit():
        threading.Thread(
            target=_end_with_parent, args=(int(parent),), name="oodgate-parent", daemon=True
        ).start()
    return prefect_app()


def _end_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(SHUTDOWN_SECONDS)
    os._exit(1)
