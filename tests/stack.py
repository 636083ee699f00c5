"""A real Prefect server and the serve process of ``flows.deploy``, as subprocesses (test helper).

Each process gets its own session (cleaned up as a group) and a log file; ``stop`` stops serve
before the server (a runner whose server is gone hangs while it shuts down).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import shell_env

from oodgate.base.project import TELEMETRY_OFF
from oodgate_servers import health
from oodgate_servers.health import poll, wait_until

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def stop_process(proc: subprocess.Popen | None, timeout: float) -> bool:
    """SIGTERM, wait, SIGKILL the process group if needed; True if it exited on its own."""
    if proc is None:
        return True
    graceful = True
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            graceful = False
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    try:  # anything the process left behind in its own group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return graceful


def read_events(api_url: str, name: str, wait: float = 30.0) -> list[dict]:
    """Events named ``name`` from a Prefect server's events API, waiting up to ``wait`` seconds for
    the first (a client sends them over a websocket; the server persists them shortly after)."""
    import json
    import urllib.request

    body = json.dumps({"filter": {"event": {"name": [name]}}, "limit": 50}).encode()

    def fetch() -> list[dict]:
        req = urllib.request.Request(
            f"{api_url}/events/filter", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["events"]

    return poll(fetch, bool, wait, interval=1)


def migrated_prefect_db() -> Path:
    """A Prefect database that one real ``prefect server start`` created and migrated, made once per
    test session (the xdist workers share it, under a lock). A server on a fresh PREFECT_HOME spends
    about 5 s of CPU creating its database (9.5 s against 4.3 s to healthy); tests whose subject is
    not that first start copy this one in (:func:`prefect_home`), as a user's second start finds it."""
    import fcntl
    import sqlite3
    import tempfile

    root = Path(os.environ.get("OODGATE_TEST_SHARED_TMP") or tempfile.gettempdir()) / "prefect-template"
    root.mkdir(parents=True, exist_ok=True)
    db = root / "prefect.db"
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            home = root / "home"
            home.mkdir(exist_ok=True)
            port = free_port()
            env = dict(shell_env(), **TELEMETRY_OFF, PREFECT_HOME=str(home))
            env = {k: v for k, v in env.items() if not k.startswith("PREFECT_API")}
            cmd = [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def healthy() -> bool:
                if server.poll() is not None:
                    raise RuntimeError(
                        f"prefect server start exited ({server.returncode}) making the template"
                    )
                return health.healthy(f"http://127.0.0.1:{port}/api")

            try:
                wait_until(healthy, 120, what="the template's Prefect server was not healthy")
            finally:
                stop_process(server, timeout=20)
            with sqlite3.connect(home / "prefect.db") as src, sqlite3.connect(root / "prefect.db.tmp") as dst:
                src.backup(dst)  # one consistent file, the write-ahead log folded in
            os.replace(root / "prefect.db.tmp", db)
    return db


def prefect_home(home: Path) -> Path:
    """``home`` made a PREFECT_HOME holding a copy of :func:`migrated_prefect_db` (unless it has one)."""
    import shutil

    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(migrated_prefect_db(), home / "prefect.db")
    return home


def isolated_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell with a private PREFECT_HOME (a migrated database in it, see
    :func:`prefect_home`) and no tracking URI set."""
    prefect_home(home)
    env = {k: v for k, v in shell_env().items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(TELEMETRY_OFF)
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(home),
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    return env


@dataclass
class Stack:
    home: Path
    port: int
    env: dict[str, str]
    server: subprocess.Popen | None = None
    serve: subprocess.Popen | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    graceful: dict[str, bool] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _popen(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs[name] = log
        with log.open("w") as fh:
            return subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: cleaned up as a whole, no stray Ctrl-C
            )

    def start_server(self) -> None:
        self.server = self._popen(
            "server",
            ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            dict(self.env),
        )

    def start_serve(self, params: Path | str, root: Path | None = None) -> None:
        env = dict(self.env, PREFECT_API_URL=self.api_url)
        args = ["-m", "flows.deploy", "--params", str(params)]
        if root is not None:
            args += ["--root", str(root)]
        self.serve = self._popen("serve", args, env)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name} log (tail) ---\n{tail(path)}" for name, path in self.logs.items())

    def stop(self) -> dict[str, bool]:
        if "serve" not in self.graceful:
            self.graceful["serve"] = stop_process(self.serve, timeout=20)
        if "server" not in self.graceful:
            self.graceful["server"] = stop_process(self.server, timeout=20)
        return self.graceful
