"""The flow's Dask side (``orchestration.task_runner: dask``): prefect-dask's task runner on a
scheduler's address or on a local cluster, and the nanny of that cluster's workers. Imported only by
a run that uses Dask: prefect-dask and distributed take 1.0 s to import."""

from __future__ import annotations

import logging

import dask.config
import distributed
import torch
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.server import prefect_api_url
from oodgate.base import numerics
from oodgate.base.config import Config

# Dask's nanny gives a closing worker 4 s (of its 5 s close timeout) to exit, then kills it. A
# worker's exit took 2 s on quiet cores and over 4 s on busy ones, nearly all of it the interpreter
# tearing down what torch, Prefect and pydantic created, so the cluster's close killed workers that
# were shutting down normally. A hung worker is still killed, after 16 s.
CLOSE_SECONDS = 20


class Nanny(distributed.Nanny):
    """:class:`distributed.Nanny` with :data:`CLOSE_SECONDS` as its close timeout."""

    async def close(self, timeout: float = CLOSE_SECONDS, reason: str = "nanny-close"):  # type: ignore[override]
        return await super().close(timeout=timeout, reason=reason)


def task_runner_for(cfg: Config) -> TaskRunner:
    """The task runner ``orchestration`` names: one thread (one training at a time: a CPU training
    already keeps every core busy), or prefect-dask's runner on the scheduler at
    ``orchestration.address`` or on a local cluster of ``orchestration.workers`` processes (one
    task at a time each, bound to 127.0.0.1, no dashboard). Every task's inputs are paths, configs
    and fingerprints, so they travel to any worker that sees the work directory."""
    o = cfg.orchestration
    if o.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=1)
    if o.address is not None:  # its workers were started with `python -m oodgate numerics`'s variables
        return DaskTaskRunner(address=o.address)
    # Dask starts its workers with OMP_NUM_THREADS=1; a CPU result depends on the thread count and
    # the kernels, so the workers get the params' numerics (or, with numerics.threads: null, this
    # process's count), and a Dask run gives the thread runner's metrics.
    # And without MALLOC_TRIM_THRESHOLD_=65536: returning freed memory at once made each training
    # step allocate anew, and a training took 3.2x as long in a worker (2.35 s against 0.74 s).
    n = cfg.numerics
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.update(numerics.environment(n.mode, n.threads or torch.get_num_threads()))
    # Without PREFECT_API_URL each worker process started a temporary Prefect server of its own
    # (about 220 MB each), left running when the workers were killed; they report to the flow's.
    api_url = prefect_api_url()
    if api_url:
        environ["PREFECT_API_URL"] = api_url
    else:
        environ.pop("PREFECT_API_URL", None)
    # A signal closes the cluster while the workers and the scheduler may be sending to each other;
    # distributed logs each such closed connection at INFO with its traceback ("Batched Comm Closed",
    # 1 in 7 SIGTERMs during training): the workers (through their config) and the scheduler (in
    # this process) log it only from WARNING up
    quiet = {**dict(dask.config.get("logging", default={}) or {}), "distributed.batched": "warning"}
    environ["DASK_LOGGING"] = repr(quiet)
    logging.getLogger("distributed.batched").setLevel(logging.WARNING)
    if o.workers > 1:
        # Several workers with this many threads each share the cores: OpenMP threads that spin while
        # they wait took the cores from each other (4 trainings on 2 workers of 2 threads on 2 cores:
        # 19.8 s; waiting passively: 3.6 s; the same numbers either way)
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": o.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            "worker_class": Nanny,  # time for the workers to exit
        }
    )
