"""The scheduled deployments: the pipeline flow on the cron schedule of ``params.yaml`` and, when
``monitor.batch`` is set, the monitoring flow on ``monitor.schedule`` (``flows/monitor.py``).

``python -m flows.deploy`` starts a local Prefect server on 127.0.0.1 (unless ``PREFECT_API_URL``
points at one already), waits until it is healthy, prints the UI address, and serves the
deployments (each runs one run at a time) until interrupted; then it stops serving before it stops the server (the other order
hangs while the deployment is paused). Scheduled runs with unchanged data, code and params reuse
cached task results and the MLflow baseline instead of retraining.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from prefect import serve as serve_all
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.monitor import monitor
from flows.pipeline import pipeline
from flows.server import DEFAULT_API_URL, DEPLOYMENT_NAME, FULL_NAME, MONITOR_NAME
from oodgate.base import numerics
from oodgate.base.config import load_config
from oodgate.base.project import PROJECT_ROOT, telemetry_off
from oodgate.running.preflight import check_names
from oodgate_servers import health


def server_environment(host: str, port: int) -> dict[str, str]:
    """The environment of the server started on ``host:port``. Its UI asks ``/ui-settings`` where the
    API is, and Prefect answers from the UI's API URL setting, else the default port: on another
    ``--port`` the UI called port 4200 ("Can't connect to Server API") until the user set it."""
    env = os.environ.copy()
    if not (env.get("PREFECT_SERVER_UI_API_URL") or env.get("PREFECT_UI_API_URL")):  # a proxy's stays
        api = f"http://{host}:{port}/api"
        env["PREFECT_SERVER_UI_API_URL"] = api  # the name in Prefect 3.8; PREFECT_UI_API_URL before
        env["PREFECT_UI_API_URL"] = api
    return env


def start_server(host: str, port: int, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return subprocess.Popen(
        cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=server_environment(host, port)
    )


def trigger_hint(api_url: str) -> str:
    """The commands that trigger a run of this deployment against the server at ``api_url``: `make
    trigger` alone talks to the default address, so any other one goes in front of it."""
    api_url = api_url.rstrip("/")
    make = "make trigger" if api_url == DEFAULT_API_URL else f"PREFECT_API_URL={api_url} make trigger"
    return (
        f"Trigger a run now:  {make}\n"
        f"            or:  PREFECT_API_URL={api_url} python -m flows.trigger\n"
        f"            or:  PREFECT_API_URL={api_url} prefect deployment run '{FULL_NAME}'"
    )


def deployments(params_path: str, project: Path, root_param: str | None = None) -> tuple[list, str]:
    """The pipeline's deployment and, when ``monitor.batch`` is set, the monitoring one (each one
    run at a time, on its cron schedule, with the parameters ``params_path`` and ``root``), plus a
    line that says what they are. ``project`` is where this machine reads the params file; a bad
    one fails here, before anything is registered. ``root_param`` is the ``root`` the runs get
    (default: ``project``)."""
    cfg = load_config(project / params_path)  # a bad params.yaml fails here, before registering
    check_names(cfg)
    parameters = {"params_path": params_path, "root": root_param or str(project)}
    built = [
        pipeline.to_deployment(
            name=DEPLOYMENT_NAME,
            schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)],
            parameters=parameters,
            description="Train, calibrate, evaluate, gate and register on the params.yaml schedule.",
            tags=["oodgate"],
            # one run at a time: a cron run due while another runs waits, then reuses its results
            concurrency_limit=1,
        )
    ]
    what = f"'{FULL_NAME}' (cron '{cfg.schedule.cron}' {cfg.schedule.timezone})"
    if cfg.monitor.batch:
        schedule = cfg.monitor.schedule
        built.append(
            monitor.to_deployment(
                name=DEPLOYMENT_NAME,
                schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
                parameters=parameters,
                description="Score monitor.batch with the champion; alert when its OOD rate moves.",
                tags=["oodgate"],
                concurrency_limit=1,
            )
        )
        what += (
            f" and '{MONITOR_NAME}' (cron '{schedule.cron}' {schedule.timezone}, batch {cfg.monitor.batch})"
        )
    return built, what


def serve(params_path: str, root: str | None = None, api_url: str = "") -> None:
    project = Path(root).resolve() if root else PROJECT_ROOT
    # every run (a subprocess of this one) inherits the numerics: pinned when this program started
    # (flows/__init__.py), or here when serve() is called otherwise; NumericsError if torch loaded
    # under others
    numerics.apply_from_params(project / params_path)
    built, what = deployments(params_path, project)
    served = f"Serving deployment {what}"
    print(f"{served}, params {project / params_path}; Ctrl-C stops it.\n{trigger_hint(api_url)}", flush=True)
    serve_all(
        *built,
        pause_on_shutdown=False,
        print_starting_message=False,  # its hint omits PREFECT_API_URL, and fails without it
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class ServerExitedError(RuntimeError):
    """The Prefect server this command started exited before it answered."""


def wait_started(server: subprocess.Popen, api_url: str, timeout: float = 120.0) -> None:
    """Until the server this command started answers its health check; at once if it exits first
    (killed or crashed while starting: waiting out the timeout said nothing for 120 s)."""

    def answers() -> bool:
        if server.poll() is not None:
            raise ServerExitedError(
                f"the Prefect server this command started exited while starting (status {server.returncode})"
            )
        return health.healthy(api_url)

    health.wait_until(answers, timeout, 0.5, f"Prefect server at {api_url} was not healthy")


def _stop_when_server_exits(server: subprocess.Popen, log: Path, gone: threading.Event) -> None:
    """A thread that watches the server this command started: once it exits (killed, crashed), serving
    cannot go on (the runner printed a traceback a second against the dead API); one line, and this
    process stops itself as a SIGTERM would stop it."""

    def watch() -> None:
        while server.poll() is None:
            time.sleep(1.0)
        if gone.is_set():  # stopped by main's own cleanup
            return
        gone.set()
        logging.getLogger("prefect").setLevel(logging.CRITICAL)  # its runner's errors against the dead API
        # the runner's stop, called from its signal handler, leaves a coroutine never awaited
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
        print(
            f"error: the Prefect server this command started exited (status {server.returncode}; see {log}): "
            "stopping; run `make serve` again",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="oodgate-server-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    telemetry_off()
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="relative to --root, or absolute")
    p.add_argument("--root", default=None, help="the project directory (default: this repository)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    args = p.parse_args(argv)
    server = None
    gone = threading.Event()  # set once the server this command started has exited, or is stopped
    api_settings = nullcontext()
    # `kill` (SIGTERM) goes through the finally below too, so the server is not left behind.
    previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if not os.environ.get("PREFECT_API_URL"):
            api = f"http://{args.host}:{args.port}/api"
            log = PROJECT_ROOT / "logs" / "prefect-server.log"
            server = start_server(args.host, args.port, log)
            os.environ["PREFECT_API_URL"] = api
            try:
                wait_started(server, api, timeout=120)
            except (TimeoutError, ServerExitedError) as e:
                print(
                    f"error: {e}; see logs/prefect-server.log, then run `make serve` again", file=sys.stderr
                )
                return 1
            print(
                f"Prefect UI: http://{args.host}:{args.port}  (server log: logs/prefect-server.log)",
                flush=True,
            )
            # Prefect read its settings when it was imported, so the variable set here is not
            # seen in this process: without this, serve() would register with a temporary server of its own.
            api_settings = temporary_settings(updates={PREFECT_API_URL: api})
            _stop_when_server_exits(server, log, gone)
        with api_settings:
            serve(args.params, args.root, os.environ["PREFECT_API_URL"])
    except KeyboardInterrupt:
        pass
    except BaseException:
        if not gone.is_set():
            raise
        # The server it started exited, and the watch thread said so in one line. What the runner's
        # unwinding raised against the dead API (an exception group with the SIGTERM and its
        # cancellation observer's websocket errors) is not news.
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        exited = gone.is_set()
        gone.set()  # the watch thread says nothing of the stop below
        if server is not None and not exited:
            health.end_process(server, timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
