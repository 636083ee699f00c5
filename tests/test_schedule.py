"""``python -m flows.deploy`` (``make serve``): a bad schedule fails before anything is registered,
serve talks to the server it started, and that server is stopped on every exit (with a stand-in
server); with a real one on another port, its UI and the printed hints name that port. The served
deployment's runs (triggered and fired by the cron) are in ``test_deployment.py``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml
from stack import free_port as _free_port

from oodgate_servers.health import wait_until

REPO = Path(__file__).resolve().parents[1]


def _write_params(path: Path, cron: str) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["schedule"] = {"cron": cron, "timezone": "UTC"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_bad_cron_fails_before_registering(tmp_path, monkeypatch):
    import flows.deploy
    from flows.pipeline import pipeline
    from oodgate.base.config import ConfigError

    bad = _write_params(tmp_path / "bad.yaml", "every day")
    # Nothing listens there: a call to the API would fail with a connection error, not ConfigError.
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_free_port()}/api")
    served = []
    monkeypatch.setattr(pipeline, "serve", lambda *a, **k: served.append((a, k)))

    with pytest.raises(ConfigError, match=r"schedule\.cron") as err:
        flows.deploy.main(["--params", str(bad)])
    assert "every day" in str(err.value)
    assert served == []


class _FakeServer:
    returncode = None

    def __init__(self) -> None:
        self.calls: list[str] = []

    def poll(self) -> int | None:
        return None  # running

    def terminate(self) -> None:
        self.calls.append("terminate")

    def wait(self, timeout: float | None = None) -> int:
        self.calls.append("wait")
        return 0

    def kill(self) -> None:
        self.calls.append("kill")


def _interrupt_in_wait(*args, **kwargs) -> None:
    raise KeyboardInterrupt


def _unhealthy(*args, **kwargs) -> None:
    raise TimeoutError("not healthy")


def _sigterm_in_serve(*args) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this
    raise AssertionError("SIGTERM did not interrupt serve()")


@pytest.fixture
def own_server(monkeypatch):
    """``flows.deploy.main`` as ``make serve`` runs it (no PREFECT_API_URL), with a stand-in server."""
    import flows.deploy

    monkeypatch.setenv("PREFECT_API_URL", "")  # unset for main(); restored afterwards
    server = _FakeServer()
    monkeypatch.setattr(flows.deploy, "start_server", lambda host, port, log_path: server)
    monkeypatch.setattr(flows.deploy, "wait_started", lambda *args, **kwargs: None)
    return flows.deploy, server, monkeypatch


def test_serve_talks_to_the_server_it_started(own_server):
    deploy, server, monkeypatch = own_server
    from prefect.settings import PREFECT_API_URL

    seen = []
    monkeypatch.setattr(deploy, "serve", lambda *a: seen.append(PREFECT_API_URL.value()))
    assert deploy.main(["--port", "4999"]) == 0
    # Prefect settings were loaded at import: serve() must still see the server just started.
    assert seen == ["http://127.0.0.1:4999/api"]
    assert server.calls[:2] == ["terminate", "wait"]


def test_a_server_that_dies_while_starting_is_said_at_once_not_after_the_timeout(monkeypatch, capsys):
    """Killed or crashed before it answered: one line as soon as it has exited (it used to wait
    out its 120 s in silence, then say only that the server was not healthy)."""
    import flows.deploy

    class Died(_FakeServer):
        returncode = -9

        def poll(self) -> int | None:
            return self.returncode

    monkeypatch.setenv("PREFECT_API_URL", "")
    monkeypatch.setattr(flows.deploy, "start_server", lambda host, port, log_path: Died())
    asked: list[str] = []
    monkeypatch.setattr(flows.deploy.health, "healthy", lambda url: asked.append(url) or False)
    assert flows.deploy.main(["--port", str(_free_port())]) == 1
    assert asked == []  # the exit is seen before any health check, not after the 120 s of them
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: the Prefect server this command started exited while starting (status -9)")
    assert "run `make serve` again" in line


class _UnhandledSigterm(Exception):
    pass


def _raise_unhandled(signum, frame):
    raise _UnhandledSigterm


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (("wait_started", _interrupt_in_wait), 0),
        (("wait_started", _unhealthy), 1),
        (("serve", _sigterm_in_serve), 128 + signal.SIGTERM),
    ],
    ids=["ctrl-c-while-starting", "never-healthy", "sigterm-while-serving"],
)
def test_started_server_is_stopped_on_every_exit(own_server, patch, expected):
    deploy, server, monkeypatch = own_server
    monkeypatch.setattr(deploy, *patch)
    # Stands for the default action (exit without cleanup) without ending the test session.
    previous = signal.signal(signal.SIGTERM, _raise_unhandled)
    try:
        result = deploy.main(["--port", "4999"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() before the server was stopped")
    except _UnhandledSigterm:
        pytest.fail("SIGTERM was not handled by main(): the server would be left running")
    except SystemExit as e:
        result = e.code
    finally:
        handler_after = signal.signal(signal.SIGTERM, previous)
    assert result == expected
    assert server.calls[:2] == ["terminate", "wait"]
    assert handler_after is _raise_unhandled  # main() restores the handler it replaced


@pytest.mark.slow
def test_on_another_port_the_ui_talks_to_that_port_and_the_hints_name_it(project, tmp_path):
    """`python -m flows.deploy --port P` used to serve a UI that called port 4200 ("Can't connect to
    Server API") until PREFECT_UI_API_URL was set by hand, and its `make trigger` hint talked to 4200."""
    import json
    import subprocess
    import sys
    import urllib.request

    from stack import isolated_env, stop_process

    from flows.server import wait_healthy

    port = _free_port()
    home = tmp_path / "prefect-home"
    home.mkdir()
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.deploy", "--root", str(project), "--port", str(port)],
            cwd=REPO,
            env=isolated_env(home),  # no PREFECT_API_URL: it starts its own server, as `make serve`
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def serving() -> bool:
            assert serve.poll() is None, log.read_text()[-3000:]
            return "Serving deployment" in log.read_text()

        try:
            wait_until(serving, 240)
        except TimeoutError:
            pytest.fail(log.read_text()[-3000:])
        api = f"http://127.0.0.1:{port}/api"
        wait_healthy(api, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as r:
            settings = json.loads(r.read())
        assert settings["api_url"] == api, settings  # what the UI in the browser calls
        printed = log.read_text()
        assert f"Prefect UI: http://127.0.0.1:{port}" in printed
        assert f"Trigger a run now:  PREFECT_API_URL={api} make trigger\n" in printed
        assert f"PREFECT_API_URL={api} python -m flows.trigger" in printed
        assert ":4200/" not in printed and ":4200 " not in printed
        # its server killed, `make serve` does not stay up printing tracebacks: one line, and it stops
        (server,) = [
            p for p in psutil.Process(serve.pid).children(recursive=True) if "server" in " ".join(p.cmdline())
        ]
        server.kill()
        serve.wait(timeout=60)
        assert serve.returncode == 1, log.read_text()[-3000:]
        after = log.read_text().split("error: the Prefect server this command started exited (status -9;")
        assert len(after) == 2, log.read_text()[-3000:]
        assert "Traceback" not in after[1] and "never awaited" not in after[1], after[1][-3000:]
    finally:
        if serve.poll() is None:
            assert stop_process(serve, timeout=30), log.read_text()[
                -3000:
            ]  # SIGTERM stops serve, then its server
