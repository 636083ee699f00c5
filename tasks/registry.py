"""The MLflow model registry: register a promoted candidate, move the ``champion`` alias if it wins.

The read-compare-move of the alias is serialised, so two flows gating at once end with exactly one
champion, chosen by the same rule, and both decisions recorded (run tags and model-version
descriptions):

- across machines, by a Prefect global concurrency limit of one slot, ``oodgate-registry-<model>``,
  created on first use, whenever ``PREFECT_API_URL`` names a server (flows sharing a Prefect server
  share the limit);
- on one machine, always, by an exclusive file lock in the work directory: a ``python -m
  flows.pipeline`` without ``PREFECT_API_URL`` runs on a temporary Prefect server of its own, which
  no other process shares.

Registering the same weights again (a re-run with unchanged data, code and params) adds no version.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from oodgate.config import GateConfig
from oodgate.gate import compare_means
from tasks import tracking

CHAMPION = "champion"
FINGERPRINT_TAG = "oodgate.model_fingerprint"
SERIALISED_TAG = "oodgate.registry_lock"  # on each new version: what serialised its registration
LIMIT_PREFIX = "oodgate-registry-"
LEASE_SECONDS = 60  # renewed while held; the slot of a holder that died is freed when it runs out
WAIT_SECONDS = 600.0


class RegistryBusyError(RuntimeError):
    """The registry's concurrency limit could not be acquired or is not a one-slot limit."""


def limit_name(model_name: str) -> str:
    return f"{LIMIT_PREFIX}{model_name}"


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prefect_server() -> str | None:
    """The Prefect API that ``PREFECT_API_URL`` names, or None (a temporary server per process)."""
    try:
        from prefect.settings import PREFECT_API_URL
    except ImportError:
        return None
    return PREFECT_API_URL.value() or None


def ensure_limit(name: str) -> None:
    """Create the one-slot global concurrency limit ``name`` unless it exists; refuse one that was
    changed to more slots or deactivated, since it would no longer serialise anything."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # created at the same moment by another flow
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            return
    if existing.limit != 1 or not existing.active:
        raise RegistryBusyError(
            f"the Prefect concurrency limit {name!r} has limit={existing.limit}, active={existing.active}; "
            f"the registry needs one active slot: prefect gcl update {name} --limit 1 --enable"
        )


@contextlib.contextmanager
def serialised(model_name: str, lock_path: Path) -> Iterator[str]:
    """Hold the registry of ``model_name`` alone; yields what serialises it (recorded on the version)."""
    api = prefect_server()
    with contextlib.ExitStack() as stack:
        how = f"file lock {lock_path}"
        if api is not None:
            from prefect.concurrency.sync import concurrency

            name = limit_name(model_name)
            ensure_limit(name)
            try:
                stack.enter_context(
                    concurrency(
                        name,
                        occupy=1,
                        timeout_seconds=WAIT_SECONDS,
                        lease_duration=LEASE_SECONDS,
                        strict=True,
                    )
                )
            except TimeoutError:
                raise RegistryBusyError(
                    f"waited {WAIT_SECONDS:.0f} s for the Prefect concurrency limit {name!r} at {api}; another "
                    f"flow holds it (see prefect gcl inspect {name}); the slot of a holder that died is freed "
                    f"when its {LEASE_SECONDS} s lease runs out"
                ) from None
            how = f"Prefect concurrency limit {name!r} at {api} + {how}"
        stack.enter_context(exclusive(lock_path))
        yield how


def current_champion(name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_with_fingerprint(name: str, model_fingerprint: str) -> Any | None:
    """The oldest registered version of ``name`` whose weights have this fingerprint, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = tracking.client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if (v.tags or {}).get(FINGERPRINT_TAG) == model_fingerprint]
    return min(same, key=lambda v: int(v.version)) if same else None


def register(
    name: str,
    model_uri: str,
    run_id: str,
    loss_id: str,
    metrics: Mapping[str, float],
    baseline_reasons: list[str],
    gate: GateConfig,
    lock_path: Path,
    model_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Register a candidate that beat the baseline; it takes the alias only if it also beats the champion.

    Idempotent: a model whose fingerprint (:func:`oodgate.serving.fingerprint`) is already registered
    adds no version; the decision is returned as ``unchanged`` with the existing version's number.
    """
    import mlflow

    c = tracking.client()
    with serialised(name, lock_path) as how:
        existing = version_with_fingerprint(name, model_fingerprint) if model_fingerprint else None
        if existing is not None:
            champ = current_champion(name)
            is_champion = champ is not None and str(champ.version) == str(existing.version)
            reason = f"unchanged: same fingerprint as version {existing.version}"
            return {
                "loss": loss_id,
                "version": int(existing.version),
                "champion": is_champion,
                "unchanged": True,
                "reasons": [reason + (" (the champion)" if is_champion else "")],
            }
        tags = {"oodgate.loss": loss_id, SERIALISED_TAG: how}
        if model_fingerprint:
            tags[FINGERPRINT_TAG] = model_fingerprint
        mv = mlflow.register_model(model_uri, name, tags=tags)
        champ = current_champion(name)
        if champ is None:
            take, champ_reasons = True, ["no current champion"]
        else:
            champ_metrics = c.get_run(champ.run_id).data.metrics
            # Means over seeds: the champion's run may come from another flow run, whose test
            # samples this one does not hold; the evidence was asked of both against the baseline.
            d = compare_means(metrics, champ_metrics, gate, reference=f"champion v{champ.version}")
            take, champ_reasons = d.promote, list(d.reasons)
        if take:
            c.set_registered_model_alias(name, CHAMPION, mv.version)
    description = "\n".join(
        [
            f"{loss_id}: beat the SoftMax baseline",
            *[f"- {r}" for r in baseline_reasons],
            "became champion" if take else "registered, but did not beat the current champion",
            *[f"- {r}" for r in champ_reasons],
        ]
    )
    c.update_model_version(name, mv.version, description=description)
    c.set_model_version_tag(
        name, mv.version, "oodgate.champion_decision", "promoted" if take else "kept_champion"
    )
    tracking.set_tags(
        run_id,
        {
            "oodgate.registered_version": mv.version,
            "oodgate.champion": str(take).lower(),
            "oodgate.champion_reasons": "; ".join(champ_reasons),
        },
    )
    return {
        "loss": loss_id,
        "version": int(mv.version),
        "champion": take,
        "unchanged": False,
        "reasons": champ_reasons,
    }
