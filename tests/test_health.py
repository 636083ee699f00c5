"""The one wait-with-a-deadline loop (oodgate_servers.health): what it returns, how it gives up."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oodgate_servers.health import healthy, poll, wait_healthy, wait_until


def test_wait_until_returns_the_first_true_value():
    values = iter([0, None, "ready"])
    assert wait_until(lambda: next(values), timeout=5, interval=0.01) == "ready"


def test_wait_until_says_what_did_not_happen_and_for_how_long():
    with pytest.raises(TimeoutError, match=r"^the thing was not there after 0 s$"):
        wait_until(lambda: False, timeout=0.05, interval=0.01, what="the thing was not there")


def test_a_predicate_that_raises_stops_the_wait():
    def exited() -> bool:
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="exited"):
        wait_until(exited, timeout=5)


def test_poll_returns_the_last_value_when_time_runs_out():
    calls = []
    assert poll(lambda: calls.append(1) or len(calls), lambda n: False, timeout=0.05, interval=0.01) >= 1
    assert poll(lambda: 7, lambda n: n == 7, timeout=0) == 7


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_healthy_waits_for_200_on_health():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert healthy(url)
        wait_healthy(url, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert not healthy(url)
    with pytest.raises(TimeoutError, match=rf"^Prefect server at {url} was not healthy after 0 s$"):
        wait_healthy(url, timeout=0.1, name="Prefect server")


def test_the_temporary_prefect_server_starts_elsewhere_when_its_port_is_taken_and_stops():
    """Prefect's app in its own process: a port taken between the choice and uvicorn's bind (uvicorn
    exits with status 3) is replaced by another; the server answers, then stop() ends the process."""
    import socket

    from oodgate_servers import prefect_temporary

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    server = prefect_temporary.TemporaryServer()
    server.port = taken.getsockname()[1]
    try:
        server.start()
        server.wait(timeout=90)
        process = server.process
        assert server.port != taken.getsockname()[1] and healthy(server.api_url)
    finally:
        server.stop()
        taken.close()
    assert process is not None and process.poll() is not None and not server.running


def test_a_flow_program_does_not_load_prefects_server_code():
    """The flow process only talks to its temporary server over HTTP: Prefect's server module (FastAPI,
    the server's models: 1.0 s of imports) is loaded by the server's own process alone."""
    import subprocess
    import sys

    code = "import sys, flows.pipeline, flows.monitor; print('prefect.server.api.server' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
