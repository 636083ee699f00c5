"""The Prefect API a flow process talks to: ``PREFECT_API_URL``, checked before anything starts, or a
temporary server of this process, started early (it boots while the flow module imports the rest)
and named to the process's Prefect clients as ``PREFECT_API_URL`` while its flows run; and the names
under which the deployments are found on a server.

Imports neither NumPy nor torch: :mod:`flows` starts the server from here before the numerics-
dependent modules load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from oodgate.base.project import telemetry_off
from oodgate_servers import health
from oodgate_servers.prefect_temporary import TemporaryServer

DEFAULT_API_URL = "http://127.0.0.1:4200/api"  # what the trigger and Prefect's clients use unless told
DEPLOYMENT_NAME = "scheduled"
FULL_NAME = f"oodgate-pipeline/{DEPLOYMENT_NAME}"
MONITOR_NAME = f"oodgate-monitor/{DEPLOYMENT_NAME}"  # served too when params.yaml sets monitor.batch

_server: TemporaryServer | None = None  # this process's temporary server, once started


def start_temporary_prefect_server() -> None:
    """Start a temporary Prefect server for this process (:mod:`oodgate_servers.prefect_temporary`:
    Prefect's app, which ends with this process even after a SIGKILL) and return at once: it boots
    while the flow module imports the rest; :func:`temporary_api` waits for it. Does nothing when a
    server is configured (``PREFECT_API_URL``), when Prefect's temporary servers are switched off,
    or when it was started already."""
    global _server
    if _server is not None:
        return
    telemetry_off()
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    _server = TemporaryServer()
    _server.start()


@contextmanager
def temporary_api() -> Iterator[None]:
    """The flow runs called inside talk to this process's temporary server, once it answers (Prefect's
    startup timeout, ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``), or, with none started, to
    the server ``PREFECT_API_URL`` names."""
    if _server is None:
        yield
        return
    _server.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with temporary_settings(updates={PREFECT_API_URL: _server.api_url}):
        yield


def stop_temporary_prefect_server() -> None:
    """Stop this process's temporary server now, if it runs (it is stopped at exit anyway)."""
    if _server is not None:
        _server.stop()


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to: ``PREFECT_API_URL``, else the URL of its running
    temporary server (None before one runs). Processes it starts that run Prefect tasks (local Dask
    workers) get it, or each would start a temporary server of its own."""
    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    return _server.api_url if _server is not None and _server.running else None


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
