"""The Prefect API a flow process talks to: ``PREFECT_API_URL``, checked before anything starts, or a
temporary server of this process, started early (it boots while the flow module imports the rest);
and the names under which the deployments are found on a server.

Imports neither NumPy nor torch: :mod:`flows` starts the server from here before the numerics-
dependent modules load.
"""

from __future__ import annotations

import logging
import threading
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

from oodgate.base.project import telemetry_off
from oodgate_servers import health
from oodgate_servers.prefect_temporary import TemporaryServer, running_api_url

DEFAULT_API_URL = "http://127.0.0.1:4200/api"  # what the trigger and Prefect's clients use unless told
DEPLOYMENT_NAME = "scheduled"
FULL_NAME = f"oodgate-pipeline/{DEPLOYMENT_NAME}"
MONITOR_NAME = f"oodgate-monitor/{DEPLOYMENT_NAME}"  # served too when params.yaml sets monitor.batch

_server_start: threading.Thread | None = None  # the thread bringing up the temporary server, if started


def start_temporary_prefect_server() -> None:
    """Start Prefect's temporary server (the one a flow run starts itself when no ``PREFECT_API_URL``
    is set; here :mod:`oodgate_servers.prefect_temporary`'s, which ends with this process even after
    a SIGKILL) in a background thread; :func:`wait_for_temporary_prefect_server` joins it before the
    first flow call, which then finds it running (Prefect keeps one such server per process). Does
    nothing when a server is configured, or when it was started already."""
    global _server_start
    if _server_start is not None:
        return
    telemetry_off()
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    server = TemporaryServer()  # Prefect's clients find it as the process's temporary server

    def start() -> None:
        try:
            server.start()
        except Exception:  # the flow call starts it again and reports why it fails
            pass

    _server_start = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    _server_start.start()


def quiet_exit() -> None:
    """For a program that refuses to run: the temporary server it started early is stopped at exit
    without Prefect's line saying so, so that the program's one line of error stays the only one."""
    logging.getLogger("prefect").setLevel(logging.WARNING)


def wait_for_temporary_prefect_server() -> None:
    """Return once the server of :func:`start_temporary_prefect_server` answers (at once if none)."""
    if _server_start is not None:
        _server_start.join()


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to: ``PREFECT_API_URL``, else the URL of its running
    temporary server (None before one runs). Processes it starts that run Prefect tasks (local Dask
    workers) get it, or each would start a temporary server of its own."""
    return PREFECT_API_URL.value() or running_api_url()


class PrefectUnavailableError(RuntimeError):
    """``PREFECT_API_URL`` names a server that does not answer."""


def check_prefect_api() -> None:
    """Before anything starts: the server ``PREFECT_API_URL`` names answers its health check; else
    one line with the two ways on (Prefect's own error said only "Failed to reach API")."""
    url = PREFECT_API_URL.value()
    if url and not health.healthy(url.rstrip("/")):
        raise PrefectUnavailableError(
            f"PREFECT_API_URL={url} does not answer ({url.rstrip('/')}/health): start that server (make server "
            "starts one on 127.0.0.1:4200), or unset PREFECT_API_URL to run on a temporary server of this process"
        )


def wait_healthy(api_url: str, timeout: float = 60.0) -> None:
    """Until the Prefect server at ``api_url`` answers its health check (TimeoutError otherwise)."""
    health.wait_healthy(api_url, timeout, name="Prefect server")


def task_window_ms(task_run_ids: list[UUID]) -> tuple[int | None, int | None]:
    """When the first of these task runs started and the last one ended (the server's records)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=task_run_ids)))
    starts = [t for r in runs if (t := r.start_time or r.expected_start_time) is not None]
    ends = [r.end_time for r in runs if r.end_time is not None]
    return (
        int(min(starts).timestamp() * 1000) if starts else None,
        int(max(ends).timestamp() * 1000) if ends else None,
    )
