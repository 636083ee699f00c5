"""Trigger one run of the scheduled deployment now and print where to watch it.

``python -m flows.trigger`` (``make trigger``) talks to ``PREFECT_API_URL``, by default the server
that ``make serve`` or ``make server`` starts (http://127.0.0.1:4200/api); the deployment is the
one ``make serve`` serves or ``make deploy`` put on a work pool (same name). It prints the run's name, id and UI address;
``--wait`` follows it to its final state (exit 0 only if it Completed). ``--set KEY=VALUE`` passes
params overrides to this run only (``--set train.epochs=2``). ``--monitor`` triggers the monitoring
deployment instead (served when ``monitor.batch`` is set), ``--batch PATH`` scores another batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.server import DEFAULT_API_URL, FULL_NAME, MONITOR_NAME, wait_healthy
from oodgate.base.config import ConfigError, load_config, parse_overrides
from oodgate.base.project import PROJECT_ROOT, telemetry_off


def ui_url(api_url: str, flow_run_id: object) -> str:
    return f"{api_url.rstrip('/').removesuffix('/api')}/runs/flow-run/{flow_run_id}"


def check_overrides(overrides: dict, deployment: str = FULL_NAME) -> None:
    """Validate ``overrides`` against the deployment's params file when this machine has it, so a
    bad value fails here, with the key and the rule, before a run is created on the server."""
    # the registries of the names (methods, models, data sets) import torch: 2.3 s that a trigger
    # without --set never pays
    from oodgate.running.preflight import check_names

    fixed = sorted(k for k in overrides if k == "numerics" or k.startswith("numerics."))
    if fixed:
        raise ConfigError(
            f"{', '.join(fixed)}: the numerics of a deployment's runs are fixed when `make serve` or `make "
            "deploy` starts (they are in force before torch loads); set them in params.yaml and restart it"
        )

    with get_client(sync_client=True) as client:
        params = client.read_deployment_by_name(deployment).parameters or {}
    path = Path(params.get("root") or PROJECT_ROOT) / params.get("params_path", "params.yaml")
    if path.is_file():
        check_names(load_config(path, overrides))  # raises ConfigError


def trigger(
    api_url: str, overrides: dict | None = None, deployment: str = FULL_NAME, batch: str | None = None
):
    """Create a run of the deployment now; returns the flow run (state SCHEDULED, due now)."""
    if overrides:
        check_overrides(overrides, deployment)
    parameters = {"overrides": overrides} if overrides else {}
    if batch:
        parameters["batch"] = str(Path(batch).resolve())
    return run_deployment(deployment, parameters=parameters or None, timeout=0, poll_interval=1)


def follow(flow_run_id: object, poll: float = 2.0):
    """Poll until the run reaches a final state; print each new state; return the final one."""
    seen = None
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.name != seen:
                seen = state.name
                print(f"  {time.strftime('%H:%M:%S')} {state.name}", flush=True)
            if state is not None and state.is_final():
                return state
            time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    telemetry_off()
    p = argparse.ArgumentParser(prog="python -m flows.trigger", description=__doc__.splitlines()[0])
    p.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL)
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a params key")
    p.add_argument("--monitor", action="store_true", help=f"trigger '{MONITOR_NAME}' instead")
    p.add_argument(
        "--batch", default=None, help="with --monitor: the batch to score (default: monitor.batch)"
    )
    args = p.parse_args(argv)
    if args.batch and not args.monitor:
        p.error("--batch needs --monitor")
    deployment = MONITOR_NAME if args.monitor else FULL_NAME
    try:
        overrides = parse_overrides(args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    api = args.api_url.rstrip("/")
    try:
        wait_healthy(api, timeout=5)
    except TimeoutError:
        print(
            f"error: no Prefect server answers at {api}; start it with `make serve` (or `make server`) "
            "(or point PREFECT_API_URL / --api-url at yours)",
            file=sys.stderr,
        )
        return 1
    # Prefect read its settings at import; without this a client would start a temporary server.
    with temporary_settings(updates={PREFECT_API_URL: api}):
        try:
            run = trigger(api, overrides, deployment, args.batch)
        except ConfigError as e:
            print(f"error: {e}\nnothing was triggered", file=sys.stderr)
            return 2
        except ObjectNotFound:
            print(
                f"error: the Prefect server at {api} has no deployment '{deployment}'; register it with "
                "`make serve` or `make deploy`"
                + (
                    " (they register the monitoring one only when params.yaml sets monitor.batch)"
                    if args.monitor
                    else ""
                ),
                file=sys.stderr,
            )
            return 1
        print(f"Triggered flow run '{run.name}' ({run.id}) of '{deployment}'")
        print(f"Watch it: {ui_url(api, run.id)}", flush=True)
        if not args.wait:
            return 0
        final = follow(run.id)
    print(f"Flow run '{run.name}' ended {final.name}: {final.message or ''}".rstrip(": "))
    return 0 if final.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
