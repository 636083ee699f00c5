"""The registry's side of the flow: the run's best candidate registered as the ``challenger``, the
``champion`` alias moved to it only when the gate promoted it and it beats the current champion on
this run's images (:func:`champion_judge`), the whole read-compare-move serialised (:func:`serialised`).

Two flows gating at once end with exactly one champion, chosen by the same rule, and both decisions
recorded:

- across machines, by a Prefect global concurrency limit of one slot, ``oodgate-registry-<model>``,
  created on first use, whenever ``PREFECT_API_URL`` names a server (flows sharing a Prefect server
  share the limit);
- on one machine, always, by an exclusive file lock in the work directory: a ``python -m
  flows.pipeline`` without ``PREFECT_API_URL`` runs on a temporary Prefect server of its own, which
  no other process shares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from oodgate.base.config import Config
from oodgate.data.prepared import load_prepared
from oodgate.deciding import gate
from oodgate.deciding.gate import SampleSet
from oodgate.running.steps.gate_step import LossDecision
from oodgate.running.steps.reuse import exclusive
from oodgate_mlflow import registry
from oodgate_mlflow.integrity import ModelIntegrityError
from oodgate_mlflow.runs import LossResult
from oodgate_mlflow.scoring import NotComparableError, score_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

LIMIT_PREFIX = "oodgate-registry-"
LEASE_SECONDS = 60  # renewed while held; the slot of a holder that died is freed when it runs out
WAIT_SECONDS = 600.0


class RegistryBusyError(RuntimeError):
    """The registry's concurrency limit could not be acquired or is not a one-slot limit."""


def limit_name(model_name: str) -> str:
    return f"{LIMIT_PREFIX}{model_name}"


def prefect_server() -> str | None:
    """The Prefect API that ``PREFECT_API_URL`` names, or None (a temporary server per process)."""
    return PREFECT_API_URL.value() or None


def ensure_limit(name: str) -> None:
    """Create the one-slot global concurrency limit ``name`` unless it exists; refuse one that was
    changed to more slots or deactivated, since it would no longer serialise anything."""
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
def serialised(model_name: str, workdir: Path) -> Iterator[str]:
    """Hold the registry of ``model_name`` alone; yields what serialises it (recorded on the version).
    The file lock is ``<workdir>/.registry.lock``."""
    api = prefect_server()
    with contextlib.ExitStack() as stack:
        lock_path = Path(workdir) / ".registry.lock"
        how = f"file lock {lock_path}"
        if api is not None:
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
        stack.enter_context(exclusive(Path(workdir) / "registry"))
        yield how


def champion_judge(
    cfg: Config, loss_id: str, seed: int, candidate: SampleSet, prepared_dir: str
) -> registry.Judge:
    """The gate's rule and evidence, the promoted candidate against the current champion, both
    scored now on this run's test and OOD images (the champion from a copy of its files verified
    against the registry's record). A champion that cannot be scored on them (other classes, another
    input shape) stays, and one line says why; one whose files fail verification cannot be served,
    and is replaced."""

    def judge(champion: ModelVersion) -> tuple[bool, tuple[str, ...]]:
        tags = champion.tags or {}
        who = f"the champion v{champion.version} ({tags.get('oodgate.loss', '?')} seed {tags.get('oodgate.registered_seed', '?')})"
        bundle = load_prepared(prepared_dir)
        images = {"": bundle.test.x.numpy(), **{k: v.x.numpy() for k, v in bundle.ood.items()}}
        try:
            scored = score_version(
                cfg.registry.model_name, champion, images, list(bundle.class_names), cfg.train.eval_batch_size
            )
        except NotComparableError as e:
            return False, (
                f"{who} stays: it cannot be scored on this run's images ({e}); a champion is replaced only by "
                "a model compared with it on the same images",
            )
        except ModelIntegrityError as e:
            return True, (f"{who} is replaced: its files fail verification, so it cannot be served ({e})",)
        probabilities, id_scores = scored.pop("")
        incumbent = gate.samples_from_probabilities(
            probabilities,
            bundle.test.y.numpy(),
            id_scores,
            {k: v for k, (_, v) in scored.items()},
            bundle.ood_groups,
        )
        d = gate.challenge(
            candidate,
            incumbent,
            cfg.gate,
            f"champion v{champion.version}",
            f"{loss_id} seed {seed} against {who}",
        )
        return d.promote, (d.compared, *d.reasons)

    return judge


@task(name="register", task_run_name="register-{loss_id}")
def register_model(
    cfg: Config,
    loss_id: str,
    logged: LossResult,
    decision: LossDecision,
    samples: SampleSet | None,
    prepared_dir: str,
    workdir: str,
    rule: str,
) -> registry.Registration:
    """Register the run's best candidate ``loss_id`` as the challenger; the champion alias moves to
    it only if the gate promoted it (``decision``) and it beats the current champion on this run's
    images (:func:`champion_judge`; ``samples``: its deployable model's per-image arrays)."""
    candidate = registry.Candidate(
        loss=loss_id,
        model_uri=logged.model_uri,
        run_id=logged.run_id,
        fingerprint=logged.model_fingerprint,
        promote=decision.promote,
        reasons=decision.reasons,
        tests=decision.tests,
        by_metric=decision.by_metric,
        seed=logged.seed,
        seed_choice=logged.seed_choice,
        compared=decision.compared,
        model_digest=logged.model_digest or None,
    )
    judge = champion_judge(cfg, loss_id, logged.seed, samples, prepared_dir) if samples is not None else None
    lock = serialised(cfg.registry.model_name, Path(workdir))
    return registry.register(cfg.registry.model_name, candidate, lock, judge, rule)
