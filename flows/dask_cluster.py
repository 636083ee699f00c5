"""The nanny of the flow's local Dask cluster (``orchestration.task_runner: dask`` without an
address): Dask's own, with more time for a closing worker to exit."""

from __future__ import annotations

import distributed

# Dask's nanny gives a closing worker 4 s (of its 5 s close timeout) to exit, then kills it. A
# worker's exit took 2 s on quiet cores and over 4 s on busy ones, nearly all of it the interpreter
# tearing down what torch, Prefect and pydantic created, so the cluster's close killed workers that
# were shutting down normally. A hung worker is still killed, after 16 s.
CLOSE_SECONDS = 20


class Nanny(distributed.Nanny):
    """:class:`distributed.Nanny` with :data:`CLOSE_SECONDS` as its close timeout."""

    async def close(self, timeout: float = CLOSE_SECONDS, reason: str = "nanny-close"):
        return await super().close(timeout=timeout, reason=reason)


def stop_training(reason: str) -> None:
    """Set :data:`oodgate.engine.STOP` in this process: run on every worker (``Client.run``) when the
    flow is interrupted, so that their trainings, in processes the flow's signal never reaches,
    stop within a batch too and the cluster closes at once."""
    from oodgate import engine

    engine.STOP.set(reason)
