"""The temporary Prefect server of ``python -m flows.pipeline`` without ``PREFECT_API_URL``.

Prefect's own :class:`SubprocessASGIServer` (its start, health check, port choice and stop; Prefect's
clients find it because it is registered as the process's one server), with one difference: the
server process ends when the flow process that started it is gone. Prefect's server outlives a
SIGKILL of the flow process (nothing runs in the flow any more to stop it) and stayed up, about
230 MB, for good.

How: the server runs a thread that compares ``os.getppid()`` with the flow's pid once a second; when
the flow dies, the server is re-parented (to init or a subreaper) and SIGTERMs itself, which uvicorn
answers with its graceful shutdown. Not ``prctl(PR_SET_PDEATHSIG)``: Linux sends that signal when the
*thread* that started the child exits, and the server is started from a short-lived thread (it boots
while the flow imports the rest), so it would be killed the moment it answered.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from prefect.server.api.server import SubprocessASGIServer

from oodgate.base.project import PROJECT_ROOT

PARENT_VARIABLE = "OODGATE_SERVER_PARENT"  # the pid of the flow process the server belongs to
POLL_SECONDS = 1.0
# uvicorn's graceful shutdown (Prefect's lifespan, the database) took under 2 s; a server that hangs
# in it is ended anyway
SHUTDOWN_SECONDS = 20.0


class TemporaryServer(SubprocessASGIServer):
    """Prefect's temporary server, started with :func:`create_app` as its app factory."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        from prefect.settings import get_current_settings

        # Prefect's command and environment (SubprocessASGIServer._run_uvicorn_command of the pinned
        # Prefect), but this module's factory, found on --app-dir, and the parent's pid
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
            PARENT_VARIABLE: str(os.getpid()),
        }
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(PROJECT_ROOT)]
        cmd += ["--factory", f"{__name__}:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--log-level", "error", "--lifespan", "on"]
        return subprocess.Popen(cmd, env=env)


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


def running_api_url() -> str | None:
    """The API URL of this process's running temporary server (Prefect's or ours), if any."""
    server = SubprocessASGIServer._instances.get(None)
    return server.api_url if server is not None and server.running else None
