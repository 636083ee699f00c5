"""Prefect flows: compose the tasks in ``tasks/``; no ML logic here.

The constants every entry point needs live here, so that ``flows.deploy`` and ``flows.trigger``
start without importing the pipeline (Prefect, torch) until they need it.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Nothing phones home: set by every entry point (the Makefile exports the same).
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
}


# The temporary Prefect server of a run without PREFECT_API_URL creates its database on the first
# start; on 2 busy cores that took over Prefect's default 20 s, and the run failed before its first task.
RUNTIME_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def telemetry_off() -> None:
    """Set :data:`TELEMETRY_OFF` and :data:`RUNTIME_DEFAULTS` where the environment does not already
    say otherwise."""
    import os

    for key, value in {**TELEMETRY_OFF, **RUNTIME_DEFAULTS}.items():
        os.environ.setdefault(key, value)


_server_start = None  # the thread bringing up Prefect's temporary server, if one was started early


def start_temporary_prefect_server() -> None:
    """Start Prefect's temporary server (the one a flow run starts itself when no
    ``PREFECT_API_URL`` is set; here :mod:`flows.temporary_server`'s, which ends with this process
    even after a SIGKILL) in a background thread, so that it boots while the caller imports the
    rest; :func:`wait_for_temporary_prefect_server` joins it before the first flow call, which then
    finds it running (Prefect keeps one such server per process). Does nothing when a server is
    configured."""
    global _server_start
    import threading

    if _server_start is not None:  # started already (by the program's preamble)
        return
    telemetry_off()
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from flows.temporary_server import TemporaryServer  # imported here, not in the thread

    server = TemporaryServer()  # Prefect's clients find it as the process's temporary server

    def start() -> None:
        try:
            server.start()
        except Exception:  # the flow call starts it again and reports why it fails
            pass

    _server_start = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    _server_start.start()


def wait_for_temporary_prefect_server() -> None:
    """Return once the server of :func:`start_temporary_prefect_server` answers (at once if none)."""
    if _server_start is not None:
        _server_start.join()


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to: ``PREFECT_API_URL``, else the URL of its running
    temporary server (None before one runs). Processes it starts that run Prefect tasks (local Dask
    workers) get it, or each would start a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    from flows.temporary_server import running_api_url

    return running_api_url()
