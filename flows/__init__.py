"""Prefect flows: compose the tasks in ``tasks/``; no ML logic here.

Here: the temporary Prefect server a ``python -m flows.pipeline`` run starts early (it boots while
the rest imports) and the API URL the flow's processes share.
"""

from oodgate.project import telemetry_off

_server_start = None  # the thread bringing up Prefect's temporary server, if one was started early


def start_temporary_prefect_server() -> None:
    """Start Prefect's temporary server (the one a flow run starts itself when no
    ``PREFECT_API_URL`` is set; here :mod:`oodgate_servers.prefect_temporary`'s, which ends with this process
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
    from oodgate_servers.prefect_temporary import TemporaryServer  # imported here, not in the thread

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
    from oodgate_servers.prefect_temporary import running_api_url

    return running_api_url()


class PrefectUnavailableError(RuntimeError):
    """``PREFECT_API_URL`` names a server that does not answer."""


def check_prefect_api() -> None:
    """Before anything starts: the server ``PREFECT_API_URL`` names answers its health check; else
    one line with the two ways on (Prefect's own error said only "Failed to reach API")."""
    from prefect.settings import PREFECT_API_URL

    from oodgate_servers.health import healthy

    url = PREFECT_API_URL.value()
    if url and not healthy(url.rstrip("/")):
        raise PrefectUnavailableError(
            f"PREFECT_API_URL={url} does not answer ({url.rstrip('/')}/health): start that server (make server "
            "starts one on 127.0.0.1:4200), or unset PREFECT_API_URL to run on a temporary server of this process"
        )
