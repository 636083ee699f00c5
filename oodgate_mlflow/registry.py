"""The MLflow model registry (MLflow's champion/challenger convention): every pipeline run registers
its best candidate as the ``challenger``; the ``champion`` alias moves only to a candidate the gate
promoted over the SoftMax baseline that, by the caller's judgement (a :data:`Judge`), also replaces
the current champion. The registry moves aliases; it runs no gate policy.

The read-compare-move of the aliases runs under the caller's lock (a :data:`Lock`; the flow's is
``tasks.registry.serialised``: a Prefect global concurrency limit and a file lock), so two flows
gating at once end with exactly one champion, chosen by the same rule, and both decisions recorded
(run tags and model-version descriptions).

Registering the same weights again (a re-run with unchanged data, code and params) adds no version.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from oodgate_mlflow import integrity, tracking

if TYPE_CHECKING:  # imported where used: MLflow costs seconds at start-up
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"
FINGERPRINT_TAG = "oodgate.model_fingerprint"
EVALUATION_DATA_TAG = "oodgate.evaluation_data"  # on child runs: digest of the test and OOD images
SERIALISED_TAG = "oodgate.registry_lock"  # on each new version: what serialised its registration


CHALLENGER = "challenger"

# The caller's comparison of the candidate with the current champion, called while the registry is
# held: whether the candidate replaces it, and why (one line each). The registry runs no gate
# policy of its own; it moves aliases.
Judge = Callable[["ModelVersion"], tuple[bool, tuple[str, ...]]]

# Held while the registry is read, compared and changed; yields what serialises it, in words (recorded
# on each new version).
Lock = AbstractContextManager[str]


@dataclass(frozen=True)
class Candidate:
    """What the registry needs of a pipeline run's best candidate: its logged model and the gate's
    decision on it against the baseline, as the version's tags and description record it."""

    loss: str
    model_uri: str
    run_id: str
    fingerprint: str | None
    promote: bool  # the gate's decision against the baseline
    reasons: tuple[str, ...]  # the gate's reasons
    tests: Mapping[str, str]  # per criterion: its test and bound
    by_metric: Mapping[str, str] = field(default_factory=dict)  # per criterion: its reason
    seed: int = 0  # the seed whose model is logged
    seed_choice: str = ""  # why that seed
    compared: str = ""  # which two models the gate compared, on which images
    model_digest: str | None = None  # the logged model's files as recorded (tracking.MODEL_DIGEST)


@dataclass(frozen=True)
class Registration:
    """What one pipeline run did to the registry."""

    loss: str
    version: int
    new_version: bool  # False: the same weights were registered before (no version added)
    champion: bool  # the version holds the champion alias after this run
    promoted_now: bool  # this run moved the champion alias to it
    reasons: tuple[str, ...]  # the champion decision

    def line(self) -> str:
        state = (
            ", now **champion**"
            if self.promoted_now
            else ", champion (unchanged)"
            if self.champion
            else "; the champion is unchanged"
        )
        added = "registered as" if self.new_version else "already registered as"
        return f"{self.loss}: {added} version {self.version}, alias {CHALLENGER}{state}"


def current(name: str, alias: str = CHAMPION) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def current_champion(name: str) -> ModelVersion | None:
    return current(name, CHAMPION)


SUPERSEDED_TAG = "oodgate.superseded"  # on a version whose files were lost or changed: by which, and why


def version_with_fingerprint(name: str, model_fingerprint: str) -> ModelVersion | None:
    """The oldest registered version of ``name`` whose weights have this fingerprint and which no
    later version superseded, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = tracking.client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [
        v
        for v in versions
        if (v.tags or {}).get(FINGERPRINT_TAG) == model_fingerprint and SUPERSEDED_TAG not in (v.tags or {})
    ]
    return min(same, key=lambda v: int(v.version)) if same else None


def files_problem(name: str, version: ModelVersion) -> str | None:
    """Why a registered version's files cannot be used (missing, changed, or never recorded), in a
    few words, or None when they are the ones recorded at registration."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = tracking.download_model(f"models:/{name}/{version.version}", Path(tmp) / "m")
        except Exception as e:  # the files are gone from the artifact store
            return f"its files cannot be read from the artifact store ({type(e).__name__})"
        try:
            integrity.verify(local, (version.tags or {}).get(integrity.TAG), f"version {version.version}")
        except integrity.ModelIntegrityError as e:
            return str(e).split("; refusing")[0].split("; register")[0]
    return None


def _description(candidate: Candidate, champion_reasons: tuple[str, ...], take: bool, rule: str) -> str:
    verdict = (
        "PROMOTED over the SoftMax baseline"
        if candidate.promote
        else "not promoted (the run's best candidate)"
    )
    lines = [
        f"{candidate.loss}: {verdict}. Gate: {rule}.",
        f"Model: seed {candidate.seed} ({candidate.seed_choice}).",
    ]
    if candidate.compared:
        lines.append(f"Compared: {candidate.compared}.")
    lines += ["", "| criterion | test | evidence |", "|---|---|---|"]
    for metric, test in candidate.tests.items():
        lines.append(f"| {metric} | {test} | {candidate.by_metric.get(metric, '')} |")
    if candidate.promote:
        lines += [
            "",
            "became champion" if take else "did not replace the current champion",
            *[f"- {r}" for r in champion_reasons],
        ]
    return "\n".join(lines)


def record_files(name: str, version: ModelVersion, logged_digest: str | None = None) -> None:
    """Hash every file of the new version and record the digests in the registry
    (:mod:`oodgate_mlflow.integrity`): every loader compares them before it loads anything. With
    ``logged_digest`` (the model's files as recorded when its run logged them), the version's files
    must be those: otherwise the version is deleted and :class:`integrity.ModelIntegrityError` raised."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        # as every loader downloads it (MLflow adds registered_model_meta: the name and version)
        local = tracking.download_model(f"models:/{name}/{version.version}", Path(tmp) / "m")
        files = integrity.manifest(local)
        if logged_digest is not None and tracking.model_files_digest(local) != logged_digest:
            tracking.client().delete_model_version(name, version.version)
            raise integrity.ModelIntegrityError(
                f"model {name!r}: the files registered as version {version.version} are not the ones its run "
                "logged (the artifact store changed in between); the version was deleted: run the pipeline "
                "again (make run), which logs the model anew"
            )
    record = integrity.encode(files)
    if len(record) > 7500:  # MLflow truncates tag values at 8000 characters
        raise RuntimeError(f"model {name} v{version.version} has too many files to record ({len(files)})")
    tracking.client().set_model_version_tag(name, version.version, integrity.TAG, record)


def _supersede(name: str, broken: tuple[ModelVersion, str], version: ModelVersion) -> tuple[str, ...]:
    """The version whose files were lost or changed is superseded by ``version`` (the same weights,
    registered again): tagged so, its aliases moved; one line saying why."""
    old, problem = broken
    c = tracking.client()
    c.set_model_version_tag(
        name, old.version, SUPERSEDED_TAG, f"by version {version.version}: {problem}"[:5000]
    )
    aliases = c.get_model_version(name, old.version).aliases or []  # a search's versions may omit them
    moved = [a for a in aliases if a != CHALLENGER]
    for alias in moved:
        c.set_registered_model_alias(name, alias, version.version)
    where = f"; its alias {', '.join(moved)} moved to it" if moved else ""
    return (
        f"registered again as version {version.version}: version {old.version} has the same weights, but {problem}{where}",
    )


def register(
    name: str, candidate: Candidate, lock: Lock, judge: Judge | None = None, rule: str = ""
) -> Registration:
    """Register the run's best candidate and give it the ``challenger`` alias; move ``champion`` to it
    only if the gate promoted it and there is no champion, or ``judge`` (called with the current
    champion while the registry is held) says it replaces it. Without a judge a promoted candidate
    never replaces a champion.

    Idempotent: a model whose fingerprint (:func:`oodgate.learning.serving.fingerprint`) is registered already
    adds no version; that version takes the aliases.
    """
    import mlflow

    c = tracking.client()
    with lock as how:
        existing = version_with_fingerprint(name, candidate.fingerprint) if candidate.fingerprint else None
        broken = None
        if existing is not None:
            problem = files_problem(name, existing)
            if problem is not None:  # its files were lost or changed: register the model again
                broken, existing = (existing, problem), None
        if existing is not None:
            version, new = existing, False
        else:
            tags = {
                "oodgate.loss": candidate.loss,
                SERIALISED_TAG: how,
                "oodgate.registered_seed": str(candidate.seed),
                "oodgate.seed_choice": candidate.seed_choice,
                "oodgate.gate": "promote" if candidate.promote else "reject",
                "oodgate.gate.tests": json.dumps(dict(candidate.tests), sort_keys=True),
                "oodgate.gate.reasons": "; ".join(candidate.reasons)[:5000],  # one reason per criterion
                "oodgate.gate.compared": candidate.compared[:500],
            }
            if candidate.fingerprint:
                tags[FINGERPRINT_TAG] = candidate.fingerprint
            version, new = mlflow.register_model(candidate.model_uri, name, tags=tags), True
            record_files(name, version, candidate.model_digest)
        repaired = _supersede(name, broken, version) if broken is not None else ()
        c.set_registered_model_alias(name, CHALLENGER, version.version)
        champ = current_champion(name)
        take, reasons = False, ("not promoted: the gate did not show it better than the baseline",)
        if candidate.promote:
            if champ is None:
                take, reasons = True, ("no current champion",)
            elif str(champ.version) == str(version.version):
                reasons = (f"unchanged: same fingerprint as version {version.version} (the champion)",)
            elif judge is None:
                reasons = (f"the champion v{champ.version} stays: nothing compared the two",)
            else:
                take, reasons = judge(champ)
            if take:
                c.set_registered_model_alias(name, CHAMPION, version.version)
        reasons = (*repaired, *reasons)
    is_champion = take or (champ is not None and str(champ.version) == str(version.version))
    if new:
        c.update_model_version(
            name, version.version, description=_description(candidate, reasons, take, rule)
        )
        decision = "promoted" if take else "kept_champion" if candidate.promote else "challenger"
        c.set_model_version_tag(name, version.version, "oodgate.champion_decision", decision)
    tracking.set_tags(
        candidate.run_id,
        {
            "oodgate.registered_version": version.version,
            "oodgate.champion": str(is_champion).lower(),
            "oodgate.champion_reasons": "; ".join(reasons)[:5000],
        },
    )
    return Registration(candidate.loss, int(version.version), new, is_champion, take, tuple(reasons))
