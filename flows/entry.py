"""What every flow's command line shares: the arguments that name the params, the config loaded and
preflighted once, the one-line refusals, SIGINT and SIGTERM turned into a stop within a training
batch, and a deadline for the unwinding after it.

The numerics were pinned before this module loaded (:mod:`flows`, when a flow module runs as a
program); the config is parsed once per process (:func:`oodgate.base.config.load_config`), and the
preflight its entry point ran counts for the flow it then calls (:func:`preflight_once`).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal

from flows.server import PrefectUnavailableError, stop_temporary_prefect_server
from oodgate.base.config import Config, ConfigError, load_config, parse_overrides
from oodgate.base.files import is_no_space, no_space_error
from oodgate.base.numerics import NumericsError
from oodgate.base.project import PROJECT_ROOT, telemetry_off
from oodgate.learning.training.engine import STOP, stop
from oodgate.running.preflight import preflight
from oodgate_mlflow.tracking import TrackingUnavailableError
from oodgate_servers.prefect_temporary import ServerStartError

# what a user must fix: one line and exit status 2, before any run starts
REFUSALS: tuple[type[BaseException], ...] = (
    ConfigError,
    TrackingUnavailableError,
    NumericsError,
    PrefectUnavailableError,
    ServerStartError,
)
UNWIND_SECONDS = 15


def parser(prog: str, description: str, params_help: str) -> argparse.ArgumentParser:
    """A flow program's parser with the arguments every one takes: ``--params``, ``--root``, ``--set``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--params", default="params.yaml", help=params_help)
    p.add_argument("--root", default=None, help="the project directory (default: this repository)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a params key")
    return p


@dataclass(frozen=True)
class Params:
    """The params a program was started with: the file, the overrides, the config they give, and the
    project directory (``--root``, else this repository)."""

    path: Path
    overrides: dict[str, Any]
    cfg: Config
    project: Path
    root: str | None  # --root as given, resolved (None: this repository)


def load(args: argparse.Namespace, default_root: Path | None = None, **extra: Any) -> Params:
    """The config of ``args`` (``--params`` relative to ``--root``, else to ``default_root``, else to
    the working directory; ``--set`` and ``extra`` overrides); raises :class:`ConfigError`."""
    telemetry_off()
    root = str(Path(args.root).resolve()) if args.root else None
    path = (Path(root or default_root or Path.cwd()) / args.params).resolve()
    overrides = {**parse_overrides(args.set), **extra}
    project = Path(root) if root else PROJECT_ROOT
    return Params(path, overrides, load_config(path, overrides).in_project(project), project, root)


_VOUCHED: set[tuple[str, str, bool]] = set()


def _key(cfg: Config, project: Path, training: bool) -> tuple[str, str, bool]:
    return cfg.model_dump_json(), str(Path(project).resolve()), training


def vouch(cfg: Config, project: Path, training: bool = True) -> None:
    """Preflight ``cfg`` now (:func:`oodgate.running.preflight.preflight`), and let the next
    :func:`preflight_once` of the same config and project in this process take it as done."""
    preflight(cfg, training=training, project=project)
    checked(cfg, project, training)


def checked(cfg: Config, project: Path, training: bool = True) -> None:
    """Let the next :func:`preflight_once` of ``cfg`` in this process take it as done (the caller
    has just preflighted it)."""
    _VOUCHED.add(_key(cfg, project, training))


def preflight_once(cfg: Config, project: Path, training: bool = True) -> None:
    """Preflight ``cfg``, unless the entry point that called this flow has just done so (:func:`vouch`);
    a vouch counts once, so a later run of the flow in this process checks the disk again."""
    key = _key(cfg, project, training)
    if key in _VOUCHED:
        _VOUCHED.discard(key)
        return
    preflight(cfg, training=training, project=project)


def refuse(e: BaseException, then: str = "") -> int:
    """One line on stderr, exit status 2."""
    print(f"error: {e}{then}", file=sys.stderr, flush=True)
    return 2


def stop_on_signals() -> None:
    """SIGINT and SIGTERM stop the run within a training batch: every training loop checks
    :data:`oodgate.learning.training.engine.STOP`, and the main thread unwinds through the flow (its
    MLflow runs marked KILLED, the temporary Prefect server stopped) instead of dying with runs left
    RUNNING and the server orphaned. Inside a flow run Prefect's engine has its own SIGTERM handler
    (it raises ``TerminationSignal``, which the flow turns into STOP) and hands the signal back to
    this one once the flow run has ended. Also starts :func:`exit_if_stuck`'s watchdog."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if STOP.is_set():
            return  # one interrupt is enough; the unwinding is under way
        STOP.set(name)
        raise KeyboardInterrupt(f"{name} received")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    _exit_if_stuck()


def _exit_if_stuck() -> None:
    """A signal to the process group (Ctrl-C, ``kill -- -PGID``, ``timeout``, systemd) reaches the
    temporary Prefect server too; the flow then marks its MLflow runs KILLED at once, but Prefect
    retried reporting the crash to the dead server for minutes (SIGTERM: 217 s). From the moment STOP
    is set, the unwinding has UNWIND_SECONDS; past them, stop any temporary server and exit with
    status 130 (SIGINT and SIGTERM alike: the run was interrupted, and a caller tells it from a
    failure, 1, by one number)."""

    def watchdog() -> None:
        STOP.wait()
        time.sleep(UNWIND_SECONDS)
        stop_temporary_prefect_server()
        print(
            f"error: {STOP.reason}: stopped; the MLflow runs are marked KILLED (the Prefect server was "
            "gone, so the flow run's last state could not be reported)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(130)

    threading.Thread(target=watchdog, name="oodgate-unwind-watchdog", daemon=True).start()


def on_dask() -> bool:
    """Whether this flow run's tasks go to prefect-dask's runner (checked by name: prefect-dask is
    imported only by a run that uses it)."""
    ctx = FlowRunContext.get()
    return ctx is not None and type(ctx.task_runner).__name__ == "DaskTaskRunner"


def interrupted(e: BaseException) -> str | None:
    """Inside a flow run: the signal that interrupted it (``SIGTERM``), or None if ``e`` is a failure.
    On a signal, STOP is set here (which starts the unwind deadline) and in every Dask worker, whose
    trainings the signal never reaches (they would go on to their last epoch, and the cluster's close
    would wait for them). Prefect's TerminationSignal has no message: the name comes from its number."""
    name = STOP.reason or "SIGINT" if STOP.is_set() else _signal_in(e)
    if name is None:
        return None
    STOP.set(name)
    ctx = FlowRunContext.get()
    if ctx is not None and on_dask():
        quiet_closed_connections()  # this process's: the local cluster's scheduler and nannies
        try:
            ctx.task_runner.client.run(stop_dask_worker, name)  # type: ignore[attr-defined]
        except Exception as e:  # the workers or the scheduler are gone already (a signal to the group)
            get_run_logger().warning(f"could not stop the Dask workers' trainings: {type(e).__name__}: {e}")
    return name


def bare_signal(e: BaseException, name: str | None) -> BaseException | None:
    """What a flow re-raises instead of ``e`` when ``e`` wraps the signal ``name`` (Pydantic's
    PydanticSerializationError around TerminationSignal): the signal itself, so that Prefect records a
    crash by a termination signal in one line, rather than logging the wrapper's traceback as the
    run's failure. None when ``e`` is a failure or the signal already."""
    if name is None or isinstance(e, (TerminationSignal, KeyboardInterrupt)):
        return None
    if name == "SIGTERM":
        return TerminationSignal(signal.SIGTERM)
    return KeyboardInterrupt(f"{name} received")


def _signal_in(e: BaseException) -> str | None:
    """The signal behind ``e``, however it was wrapped: Prefect's TerminationSignal (SIGTERM, raised
    by Prefect's handler wherever the main thread was), a KeyboardInterrupt, or either in the chain
    of causes. When SIGTERM lands while Pydantic serialises the flow's context for a Dask task,
    Pydantic re-raises it as a PydanticSerializationError that keeps only the name in its message."""
    for cur in _chain(e):
        if isinstance(cur, TerminationSignal):
            return signal.Signals(cur.signal).name
        if isinstance(cur, KeyboardInterrupt):
            return "SIGINT"
        if type(cur).__name__ == "PydanticSerializationError" and "TerminationSignal" in str(cur):
            return "SIGTERM"  # the only signal Prefect turns into TerminationSignal
    return None


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e``, then what it was raised from or while handling, and so on (each once)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


# A connection that closed under its user: distributed's CommClosedError, raised from tornado's
# StreamClosedError. By name: this module does not import Dask, which only a Dask run loads.
CLOSED_CONNECTION = frozenset({"CommClosedError", "StreamClosedError"})


class _ClosedAfterStop(logging.Filter):
    """Drops a record whose exception is a closed connection once :data:`STOP` is set. The cluster's
    close after a signal cuts connections in use: a worker whose heartbeat was on its way logged
    "Failed to communicate with scheduler during heartbeat" as an ERROR with two tracebacks (1 SIGTERM
    in 25 during training). Before a stop, a closed connection is news, logged as distributed logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not STOP.is_set() or not record.exc_info or record.exc_info[1] is None:
            return True
        return not any(type(c).__name__ in CLOSED_CONNECTION for c in _chain(record.exc_info[1]))


_CLOSED_AFTER_STOP = _ClosedAfterStop()


def quiet_closed_connections() -> None:
    """:class:`_ClosedAfterStop` on every logger of distributed's in this process (a filter on a
    logger sees the records logged there, which is where distributed's modules log them)."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] == "distributed" and isinstance(logger, logging.Logger):
            logger.addFilter(_CLOSED_AFTER_STOP)  # once: addFilter skips a filter it has


def stop_dask_worker(reason: str) -> None:
    """Run in every Dask worker on a signal, which never reaches them (``Client.run``): their trainings
    stop within a batch (:data:`STOP`), and the cluster's close cutting their connections is quiet."""
    quiet_closed_connections()
    stop(reason)


def exit_status(e: BaseException, workdir: Path) -> int:
    """What a flow program says and returns when its flow raised ``e``: 130 and one line when it was
    interrupted (whatever the unwinding raised after, a temporary server already gone), 1 and one
    line for a failure (a full disk: where, which file, and that a re-run reuses the rest)."""
    name = _signal_in(e)  # raised outside the flow's body, which sets STOP
    if name is not None:
        STOP.set(name)
    if STOP.is_set():
        print(f"error: {STOP.reason}: stopped; the MLflow runs are marked KILLED", file=sys.stderr)
        return 130
    if not isinstance(e, Exception):
        raise e
    problem = no_space_error(e, workdir) if is_no_space(e) else f"{type(e).__name__}: {e}"
    print(f"error: {problem}", file=sys.stderr)
    return 1


def end(status: int) -> None:
    """End a flow program with ``status``: Prefect's logs sent while its server still runs, then the
    exit handlers (the temporary server stopped), without Python's teardown of every module after
    them. Run in the usual order, the handlers stopped the server first, and the logs' last flush
    then waited its whole 5 s timeout for a server that was gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()  # flushes Prefect's API log handler while the server answers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
