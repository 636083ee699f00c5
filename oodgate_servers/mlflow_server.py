"""A shared MLflow tracking server: PostgreSQL for the runs and the registry, artifacts proxied by
the server into one directory.

``python -m oodgate_servers.mlflow_server`` (``make mlflow-server``) initialises a PostgreSQL cluster in a
project-local directory on its first start (``.mlflow-server/`` by default: the cluster, its socket,
the artifacts, the logs), starts ``postgres`` on 127.0.0.1, then ``mlflow server`` on 127.0.0.1 with
``--serve-artifacts``, prints the address to put in ``MLFLOW_TRACKING_URI``, and runs until Ctrl-C
or SIGTERM, which stop MLflow first, then PostgreSQL (a fast shutdown: open transactions roll back,
nothing is lost). Nothing system-wide is touched: no system service, no cluster of the OS.

PostgreSQL refuses to run as root; started as root, the cluster is owned and run by an unprivileged
user (``nobody`` unless ``--pg-user`` says otherwise), which must be able to enter the directory.
The database password is generated on the first start and kept in ``<dir>/password`` (mode 0600);
it reaches MLflow through its environment, not its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from oodgate.base.project import PROJECT_ROOT, telemetry_off
from oodgate_servers import health

DB_USER = "oodgate"
DB_NAME = "mlflow"
DEFAULT_DIR = PROJECT_ROOT / ".mlflow-server"


class ServerError(RuntimeError):
    """The PostgreSQL cluster or the MLflow server could not be started."""


def postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: ``$OODGATE_PG_BIN``, Debian's
    ``/usr/lib/postgresql/<version>/bin`` (the newest), or ``initdb`` on PATH; None if absent."""
    env = os.environ.get("OODGATE_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    debian = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1]
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class Postgres:
    """A cluster in ``root`` (``pgdata/``, socket in ``pgrun/``), serving on 127.0.0.1:``port``."""

    root: Path
    port: int
    bin: Path
    run_as: str | None  # the OS user that owns and runs the cluster (when started as root)
    proc: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        return self.root / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.root / "pgrun"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def _user_kwargs(self) -> dict:
        if self.run_as is None:
            return {}
        pw = pwd.getpwnam(self.run_as)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _own(self, path: Path) -> None:
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def check_reachable(self) -> None:
        """As root, the cluster's user must be able to enter every parent of the directory."""
        if self.run_as is None:
            return
        probe = subprocess.run(["test", "-x", str(self.root)], **self._user_kwargs(), check=False)
        if probe.returncode != 0:
            raise ServerError(
                f"PostgreSQL refuses to run as root, so its cluster runs as user {self.run_as!r}, which "
                f"cannot enter {self.root} (a parent directory is closed to other users, e.g. /root or a "
                "0700 temporary directory); pass --dir a directory that others can enter "
                "(e.g. --dir /var/tmp/oodgate-mlflow), or start the server as an unprivileged user"
            )

    def _env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "HOME": str(self.root)}

    def init(self, password: str) -> bool:
        """Create the cluster unless it exists; True if it was created."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.check_reachable()
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.socket_dir)
        if (self.data / "PG_VERSION").exists():
            return False
        if self.data.exists() and any(self.data.iterdir()):
            raise ServerError(
                f"{self.data} exists but holds no PostgreSQL cluster (no PG_VERSION); move it away or pass another --dir"
            )
        self.data.mkdir(mode=0o700, exist_ok=True)
        self._own(self.data)
        pwfile = self.root / ".initdb-password"
        pwfile.unlink(missing_ok=True)  # left by an initdb that was killed: written anew, 0600 from the start
        write_secret(pwfile, password + "\n")
        self._own(pwfile)
        try:
            proc = subprocess.run(
                [
                    str(self.bin / "initdb"),
                    "--pgdata",
                    str(self.data),
                    "--username",
                    DB_USER,
                    "--pwfile",
                    str(pwfile),
                    "--auth",
                    "scram-sha-256",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-instructions",
                ],
                env=self._env(),
                cwd=self.root,
                capture_output=True,
                text=True,
                check=False,
                **self._user_kwargs(),
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise ServerError(f"initdb failed for {self.data}:\n{proc.stdout}\n{proc.stderr}")
        return True

    def start(self, timeout: float = 60.0) -> None:
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = pid_file.read_text().split("\n", 1)[0].strip()
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.kill(int(pid), 0)
                raise ServerError(
                    f"a PostgreSQL server (pid {pid}) already runs on {self.data}; stop it "
                    f"({self.bin / 'pg_ctl'} -D {self.data} stop -m fast) or stop the make mlflow-server that started it"
                )
        log = self.log.open("a")
        self._own(self.log)
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"port={self.port}",
                "-c",
                f"unix_socket_directories={self.socket_dir}",
            ],
            env=self._env(),
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this process only; it stops postgres after MLflow
            **self._user_kwargs(),
        )
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"PostgreSQL exited at start (code {self.proc.returncode}; port {self.port} in use? "
                    f"pass --pg-port); log {self.log}:\n{_tail(self.log)}"
                )
            probe = subprocess.run(
                [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                env=self._env(),
                check=False,
            )
            return probe.returncode == 0

        try:
            health.wait_until(ready, timeout, 0.2, "PostgreSQL was not ready")
        except TimeoutError as e:
            raise ServerError(f"{e}; log {self.log}:\n{_tail(self.log)}") from None

    def stop(self, timeout: float = 30.0) -> None:
        """A fast shutdown (SIGINT): sessions end, open transactions roll back, the data is kept."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown; recovery on the next start
            self.proc.wait(timeout=10)

    def uri(self, password: str) -> str:
        return f"postgresql://{DB_USER}:{password}@127.0.0.1:{self.port}/{DB_NAME}"

    def ensure_database(self, password: str) -> None:
        try:
            import psycopg2
        except ImportError:
            raise ServerError(
                "psycopg2 is not installed; install the pipeline extra: "
                "pip install -c constraints.txt -e '.[pipeline]' (make setup)"
            ) from None
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=DB_USER, password=password, dbname="postgres"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DB_NAME}")
        finally:
            conn.close()


@dataclass
class Server:
    """A running PostgreSQL-backed MLflow server (see :func:`running`)."""

    url: str
    artifacts: Path
    backend_uri: str
    postgres: Postgres
    mlflow: subprocess.Popen
    log: Path
    seconds: float  # from the call to a healthy server


def write_secret(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from its first byte: written with the umask's mode and then
    chmodded, it was readable by other users in between. O_EXCL: never through an existing file
    or a link someone placed there."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _password(root: Path) -> str:
    path = root / "password"
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(24)
    write_secret(path, password + "\n")
    return password


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise ServerError(
                f"mlflow server exited at start (code {proc.returncode}); log {log}:\n{_tail(log)}"
            )
        return health.healthy(url)

    try:
        health.wait_until(ready, timeout, 0.5, f"mlflow server at {url} was not healthy")
    except TimeoutError as e:
        raise ServerError(f"{e}; log {log}:\n{_tail(log)}") from None


def _stop_mlflow(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):  # its workers, if any outlived it
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _check_free(port: int, flag: str) -> None:
    with socket.socket() as s:
        s.settimeout(2)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise ServerError(
                f"port {port} on 127.0.0.1 is already in use (a make mlflow-server killed with SIGKILL "
                f"leaves its servers running; see the logs in its directory); stop what listens there or pass {flag}"
            )


def default_pg_user() -> str | None:
    """None when not root (the cluster runs as the caller); else ``nobody``."""
    return "nobody" if os.geteuid() == 0 else None


@contextlib.contextmanager
def running(
    root: Path = DEFAULT_DIR,
    port: int = 5050,
    pg_port: int = 5433,
    host: str = "127.0.0.1",
    workers: int = 2,
    pg_user: str | None = None,
    timeout: float = 120.0,
) -> Iterator[Server]:
    """Start PostgreSQL, then MLflow on it; on leaving, stop MLflow, then PostgreSQL."""
    telemetry_off()
    t0 = time.perf_counter()
    pg_bin = postgres_bin()
    if pg_bin is None:
        raise ServerError(
            "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH); "
            "install it (Debian/Ubuntu: apt-get install postgresql) or set OODGATE_PG_BIN to its bin directory"
        )
    _check_free(pg_port, "--pg-port")
    _check_free(port, "--port")  # else an old server's /health would pass for the new one's
    if os.geteuid() == 0:
        pg_user = pg_user or default_pg_user()
        try:
            pwd.getpwnam(pg_user)
        except KeyError:
            raise ServerError(
                f"PostgreSQL refuses to run as root, and there is no OS user {pg_user!r} to run it as; "
                "pass --pg-user an existing unprivileged user (make mlflow-server ARGS='--pg-user ...')"
            ) from None
    else:
        pg_user = None
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    pg = Postgres(root, pg_port, pg_bin, pg_user)
    pg.check_reachable()  # before anything is written there
    password = _password(root)
    pg.init(password)
    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    log_path = root / "mlflow.log"
    proc = None
    try:
        pg.start()
        pg.ensure_database(password)
        env = dict(os.environ)
        env.update(
            MLFLOW_BACKEND_STORE_URI=pg.uri(password),  # the password stays off the command line
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # 2 processes instead of 9
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        url = f"http://{host}:{port}"
        with log_path.open("a") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--workers",
                    str(workers),
                    "--artifacts-destination",
                    str(artifacts),
                    "--serve-artifacts",
                ],
                env=env,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_healthy(url, proc, log_path, timeout)
        yield Server(url, artifacts, pg.uri("***"), pg, proc, log_path, time.perf_counter() - t0)
    finally:
        if proc is not None:
            _stop_mlflow(proc)
        pg.stop()


_stopping = False


def _stop(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: unwind into the shutdown once; a second signal does not cut it short."""
    global _stopping
    if not _stopping:
        _stopping = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m oodgate_servers.mlflow_server", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--dir", default=str(DEFAULT_DIR), help="the cluster, artifacts and logs (default: %(default)s)"
    )
    p.add_argument("--host", default="127.0.0.1", help="MLflow's address (default: %(default)s)")
    p.add_argument("--port", type=int, default=5050, help="MLflow's port (default: %(default)s)")
    p.add_argument(
        "--pg-port", type=int, default=5433, help="PostgreSQL's port on 127.0.0.1 (default: %(default)s)"
    )
    p.add_argument("--workers", type=int, default=2, help="MLflow's worker processes (default: %(default)s)")
    p.add_argument(
        "--pg-user", default=None, help="when started as root: the OS user of the cluster (default: nobody)"
    )
    args = p.parse_args(argv)
    # Ctrl-C, and `kill` (SIGTERM), stop MLflow then PostgreSQL (SIGINT is set explicitly: a shell
    # that starts this in the background leaves it ignored).
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with running(
            Path(args.dir), args.port, args.pg_port, args.host, args.workers, args.pg_user
        ) as server:
            print(
                f"MLflow tracking server: {server.url}  (PostgreSQL on 127.0.0.1:{args.pg_port}, "
                f"artifacts in {server.artifacts}; started in {server.seconds:.1f} s)\n"
                f"Track on it:  export MLFLOW_TRACKING_URI={server.url}\n"
                f"Logs: {server.log}, {server.postgres.log}. Ctrl-C stops MLflow, then PostgreSQL.",
                flush=True,
            )
            while server.mlflow.poll() is None and server.postgres.proc.poll() is None:
                time.sleep(1)
            which = "mlflow server" if server.mlflow.poll() is not None else "PostgreSQL"
            print(
                f"error: {which} stopped on its own; see {server.log} and {server.postgres.log}",
                file=sys.stderr,
            )
            return 1
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Stopped MLflow and PostgreSQL.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
