"""The scheduled deployments on a Prefect work pool, run by workers on any number of machines.

``python -m flows.workpool deploy`` (``make deploy``) registers the same deployments as ``make
serve`` (``oodgate-pipeline/scheduled`` and, when ``monitor.batch`` is set, ``oodgate-monitor/
scheduled``: the params.yaml cron schedules, the parameters ``params_path`` and ``root``, one run
at a time) on a work pool of type ``process``, created if the server has none of that name, then
exits. Nothing is built or pushed: each deployment tells its workers to take the code from the
project's directory on their own machine (``--checkout``, default this checkout's path), where
the flow is loaded from its entrypoint (``flows/pipeline.py:pipeline``).

``python -m flows.workpool worker`` (``make worker``) checks that the server answers, then becomes
``prefect worker start --pool <pool> --type process`` with telemetry off: it runs each due run of
the pool's deployments in a subprocess of its own, on the machine it was started on.

Both talk to ``PREFECT_API_URL`` (default http://127.0.0.1:4200/api, the server of ``make
server``). The pool is ``--pool``, else ``OODGATE_POOL``, else ``oodgate``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runner.storage import LocalStorage
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker
from pydantic import ValidationError

from flows.server import DEFAULT_API_URL, wait_healthy
from oodgate.base import numerics
from oodgate.base.config import ConfigError, load_config
from oodgate.base.project import PROJECT_ROOT, TELEMETRY_OFF, telemetry_off

POOL_ENV = "OODGATE_POOL"
DEFAULT_POOL = "oodgate"
POOL_TYPE = "process"
# Where a worker finds each flow, relative to the project's directory on its machine.
ENTRYPOINTS = {
    "oodgate-pipeline": "flows/pipeline.py:pipeline",
    "oodgate-monitor": "flows/monitor.py:monitor",
}


class PoolError(RuntimeError):
    """The work pool cannot be used as asked (a name taken by a pool of another type)."""


def ensure_pool(name: str) -> bool:
    """Create the process work pool ``name`` unless the server has it; True if it was created.
    A pool of that name but another type is refused: its workers would not run these flows."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type=POOL_TYPE,
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
                return True
            except ObjectAlreadyExists:  # another deploy created it meanwhile
                pool = client.read_work_pool(name)
    if pool.type != POOL_TYPE:
        raise PoolError(
            f"the server's work pool {name!r} is of type {pool.type!r}, not {POOL_TYPE!r}; "
            f"deploy to another pool (--pool NAME or {POOL_ENV}=NAME)"
        )
    return False


def deploy(
    params_path: str, root: str | None, pool: str, checkout: str | None = None
) -> tuple[list[str], str, bool]:
    """Register the scheduled deployments on ``pool`` (created if absent). The params file is read
    here, from ``root`` (default this checkout), and a bad one fails before anything is registered.
    Workers load the code from ``checkout`` (default this checkout's path) on their own machine,
    and the runs get ``root`` (default: ``checkout``). Returns the deployments' ids, what they are,
    and whether the pool was created."""
    # the flows' modules (torch, MLflow, the tasks): 3.5 s that `make worker` never needs
    from flows.deploy import deployments

    project = Path(root).resolve() if root else PROJECT_ROOT
    code = str(Path(checkout).expanduser()) if checkout else str(PROJECT_ROOT)
    if not Path(code).is_absolute():
        raise PoolError(f"--checkout must be an absolute path on the worker machines, got {checkout!r}")
    built, what = deployments(params_path, project, root_param=str(project) if root else code)
    numerics_env = numerics_environment(project / params_path)
    created = ensure_pool(pool)
    ids = []
    for d in built:
        # No image, no upload: a worker's run changes into `code` on its machine (the pull step of
        # LocalStorage) and loads the flow from its file there, as a flow run started there would.
        d.storage = LocalStorage(path=code)
        d.entrypoint = ENTRYPOINTS[d.flow_name]
        # also with a bare `prefect worker start`: nothing phones home, the params' numerics
        d.job_variables = {"env": {**TELEMETRY_OFF, **numerics_env}}
        ids.append(str(d.apply(work_pool_name=pool)))
    return ids, what, created


def numerics_environment(params: Path) -> dict[str, str]:
    """The variables that pin the numerics of ``params`` (:func:`oodgate.base.numerics.environment`)."""
    n = load_config(params).numerics
    return numerics.environment(n.mode, n.threads)


def _pool_name(value: str | None) -> str:
    return value or os.environ.get(POOL_ENV) or DEFAULT_POOL


def _bad_pool_name(pool: str) -> str | None:
    """Why Prefect would refuse ``pool`` as a work pool name, or None."""
    try:
        WorkPoolCreate(name=pool, type=POOL_TYPE)
    except ValidationError as e:
        reason = e.errors()[0]["msg"]
        return f"work pool name {pool!r} is not valid ({reason}); pass another --pool or {POOL_ENV}"
    return None


def _check_server(api: str, command: str) -> bool:
    try:
        wait_healthy(api, timeout=5)
        return True
    except TimeoutError:
        print(
            f"error: no Prefect server answers at {api}; start one with `make server` (or point "
            f"PREFECT_API_URL / --api-url at yours), then run `{command}` again",
            file=sys.stderr,
        )
        return False


def _deploy_main(args: argparse.Namespace) -> int:
    pool = _pool_name(args.pool)
    api = args.api_url.rstrip("/")
    try:  # the params first: a bad file is refused before any server is asked anything
        load_config((Path(args.root).resolve() if args.root else PROJECT_ROOT) / args.params)
    except ConfigError as e:
        print(f"error: {e}\nnothing was deployed", file=sys.stderr)
        return 2
    if args.checkout and not Path(args.checkout).expanduser().is_absolute():
        print(
            f"error: --checkout must be an absolute path on the worker machines, got {args.checkout!r}\n"
            "nothing was deployed",
            file=sys.stderr,
        )
        return 2
    if problem := _bad_pool_name(pool):
        print(f"error: {problem}\nnothing was deployed", file=sys.stderr)
        return 2
    if not _check_server(api, "make deploy"):
        return 1
    # Prefect read its settings at import; without this a client would start a temporary server.
    with temporary_settings(updates={PREFECT_API_URL: api}):
        try:
            _, what, created = deploy(args.params, args.root, pool, args.checkout)
        except PoolError as e:
            print(f"error: {e}\nnothing was deployed", file=sys.stderr)
            return 2
    code = args.checkout or str(PROJECT_ROOT)
    print(
        f"{'Created' if created else 'Using'} work pool '{pool}' (type {POOL_TYPE}) at {api}\n"
        f"Deployed {what} to it; workers take the code from {code} on their machine.\n"
        f"Start a worker on each machine that has the project there:  make worker POOL={pool}\n"
        f"                                                        or:  PREFECT_API_URL={api} "
        f"prefect worker start --pool {pool} --type {POOL_TYPE}\n"
        f"Trigger a run now:  PREFECT_API_URL={api} make trigger",
        flush=True,
    )
    return 0


def _worker_main(args: argparse.Namespace, extra: list[str]) -> int:
    pool = _pool_name(args.pool)
    api = args.api_url.rstrip("/")
    if not _check_server(api, "make worker"):
        return 1
    env = {**os.environ, **TELEMETRY_OFF, "PREFECT_API_URL": api}
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", POOL_TYPE, *extra]
    print(f"Worker for pool '{pool}' at {api}: {' '.join(cmd[1:])}", flush=True)
    # The worker stops on SIGTERM by sending itself SIGINT; a shell that starts it in the background
    # (`make worker &`, a script) leaves SIGINT ignored, and an ignored signal stays ignored across
    # exec: the worker would then never stop on SIGTERM. Restore the default first.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execve(sys.executable, cmd, env)  # the worker itself handles Ctrl-C and SIGTERM
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    telemetry_off()
    p = argparse.ArgumentParser(prog="python -m flows.workpool", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--pool", default=None, help=f"the work pool (default: ${POOL_ENV}, else {DEFAULT_POOL})"
    )
    common.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL)
    d = sub.add_parser("deploy", parents=[common], help="register the scheduled deployments on the pool")
    d.add_argument("--params", default="params.yaml", help="relative to --root, or absolute")
    d.add_argument("--root", default=None, help="the project directory of the runs (default: --checkout)")
    d.add_argument(
        "--checkout",
        default=None,
        help="absolute path of the project's directory on every worker machine (default: this checkout's)",
    )
    sub.add_parser(
        "worker",
        parents=[common],
        help="start a process worker on the pool (other options go to `prefect worker start`)",
    )
    args, extra = p.parse_known_args(argv)
    if args.command == "worker":
        return _worker_main(args, extra)
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return _deploy_main(args)


if __name__ == "__main__":
    sys.exit(main())
