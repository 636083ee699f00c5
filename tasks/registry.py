"""The MLflow model registry: register a promoted candidate, move the ``champion`` alias if it wins.

The read-compare-move of the alias runs under an exclusive file lock, so two flows gating at
once on this machine serialise: the registry ends with exactly one champion, chosen by the same
rule, and both decisions are recorded (run tags and model-version descriptions). Registering the
same weights again (a re-run with unchanged data, code and params) adds no version.
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


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    with exclusive(lock_path):
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
        tags = {"oodgate.loss": loss_id}
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
