"""The one reuse mechanism: a step's fingerprinted record decides whether it recomputes.

Every step writes, last, a record (``train.json``, ``calibration.json``, ``selection.json``,
``evaluation.json``) holding its fingerprint (:mod:`oodgate.running.steps.inputs`: the params it
reads, its code, its upstream results) and the digests of the files it wrote. A step returns the
finished result in its directory when the record's fingerprint is the one the current inputs give
and every file it lists is intact (:func:`reusable`); a later step reads an upstream result only
when its record is fresh (:func:`upstream`), naming what changed otherwise. The orchestrators read
this record rather than deciding again: Prefect's cache key is a digest of it
(``tasks/caching.py``), MLflow reuses a child run by the fingerprint it carries, and DVC re-runs a
stage when its inputs record or an upstream output changed. ``python -m oodgate why`` prints the
answer for one (step, loss, seed).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from oodgate.base.config import Config
from oodgate.base.files import damaged, digest, read_json, verified
from oodgate.base.records import StaleResultError
from oodgate.running.layout import Layout
from oodgate.running.steps.inputs import (
    calibrate_inputs,
    evaluate_inputs,
    expected,
    prepare_fingerprint,
    prepare_inputs,
    select_inputs,
    train_inputs,
)

if TYPE_CHECKING:
    from oodgate.running.steps.inputs import Expected

log = logging.getLogger("oodgate")


def read_record(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A step's record file, or a FileNotFoundError that says which step writes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r} is missing; {fix}")
    return cast(dict[str, Any], read_json(path))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["train.epochs: 1 -> 3", ...]``: the keys whose values differ between two inputs records."""
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def check_fresh(
    record: Mapping[str, Any], expected: str, inputs: Mapping[str, Any], what: str, where: Path, fix: str
) -> None:
    """Refuse an upstream result whose fingerprint is not the one the current inputs give; the
    message names what differs (a params key, the code, or an upstream result or the data)."""
    got = record.get("fingerprint")
    if got == expected:
        return
    changed = differences(record.get("inputs", {}), inputs)
    why = (
        "; ".join(changed)
        if changed
        else "its own inputs are the same, so the data or an earlier step changed"
    )
    raise StaleResultError(
        f"{what} in {str(where)!r} is stale: it was computed from other inputs ({why}); {fix}"
    )


def reusable(out_dir: Path, record_name: str, fingerprint: str) -> dict[str, Any] | None:
    """The record in ``out_dir`` if it has ``fingerprint`` and every file it lists is intact; else
    None (a corrupt file is reported by path, and the caller recomputes)."""
    path = Path(out_dir) / record_name
    if not path.is_file():
        return None
    try:
        record: dict[str, Any] = read_json(path)
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); recomputing", path, e)
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    outputs = record.get("outputs")
    bad = damaged(out_dir, outputs) if outputs else ["(no output digests recorded)"]
    if bad:
        log.warning(
            "%s: %s missing or not what %s recorded (corrupt or changed); recomputing",
            out_dir,
            ", ".join(bad),
            record_name,
        )
        return None
    return record


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock (an exclusive ``flock`` on ``.<name>.lock`` beside it) while a step
    checks for its finished result and, if there is none, computes it: a second process with the
    same inputs (another pipeline run of the same project, on this machine or on another one sharing
    the work directory) waits, then finds the record written and reuses it instead of computing it
    again. Prefect's cache isolation cannot do this here: its lock is on the cache key, which is over
    the result's record, unknown until the result exists (:mod:`tasks.caching`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


P = ParamSpec("P")
R = TypeVar("R")


def one_at_a_time(step: Callable[P, R]) -> Callable[P, R]:
    """``step`` under its ``out_dir``'s lock (:func:`exclusive`): a concurrent run with the same
    inputs waits, then finds the record written and reuses the result."""
    signature = inspect.signature(step)

    @functools.wraps(step)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        with exclusive(Path(signature.bind(*args, **kwargs).arguments["out_dir"])):
            return step(*args, **kwargs)

    return locked


# step -> (its record file, what its result is called, the verb that makes it)
UPSTREAM = {
    "train": ("train.json", "the trained model", "train"),
    "calibrate": ("calibration.json", "the calibrated model", "calibrate"),
    "evaluate": ("evaluation.json", "the evaluation", "evaluate"),
    "select": ("selection.json", "the score selection", "select"),
}


@dataclass(frozen=True)
class Upstream:
    """An upstream step's record, checked fresh, and the paths of the files it vouches for."""

    record: dict[str, Any]
    files: dict[str, Path]


def upstream(
    step: str, loss_id: str, seed: int, out_dir: str | Path, want: Expected, files: tuple[str, ...]
) -> Upstream:
    """The result of ``step`` for (``loss_id``, ``seed``) in ``out_dir``, which a later step reads:
    its record must exist (FileNotFoundError), have the fingerprint the current inputs give
    (:func:`check_fresh`), and each of ``files`` must be the bytes it recorded (:func:`verified`).
    Every message names the result and the command that makes it."""
    out_dir = Path(out_dir)
    record_name, noun, verb = UPSTREAM[step]
    per_loss = step == "select"  # one result for all the loss's seeds
    what = f"{noun} of {loss_id}" if per_loss else f"{noun} of {loss_id} seed {seed}"
    which = f"--loss {loss_id}" if per_loss else f"--loss {loss_id} --seed {seed}"
    fix = f"{verb} it first (`python -m oodgate {verb} {which}` or `dvc repro`)"
    record = read_record(out_dir / record_name, what, fix)
    check_fresh(record, want.fingerprint[step], want.inputs[step], what, out_dir, fix)
    return Upstream(record, {name: verified(record, out_dir, name, what, fix) for name in files})


# ---------------------------------------------------------------- python -m oodgate why
STEPS = ("prepare", *UPSTREAM)
RECORDS = {"prepare": "data.json", **{k: v[0] for k, v in UPSTREAM.items()}}


def judge(out_dir: Path, record_name: str, fingerprint: str | None, inputs: Mapping[str, Any]) -> str:
    """What the step does with ``out_dir``, in one line: reuses it (:func:`reusable`, the step's own
    test), or computes it again, and why. ``fingerprint`` None: the record's own inputs decide (the
    prepared data of the fixed layout, which records no fingerprint)."""
    path = Path(out_dir) / record_name
    if fingerprint is not None and reusable(Path(out_dir), record_name, fingerprint) is not None:
        return f"{out_dir}: {record_name} has this fingerprint and the files it lists are intact: reused"
    if not path.is_file():
        return f"{out_dir}: nothing there: computed on the next run"
    try:
        record = read_json(path)
    except (OSError, ValueError) as e:
        return f"{out_dir}: {record_name} unreadable ({e}): computed again"
    fresh = record.get("fingerprint") == fingerprint if fingerprint else record.get("inputs") == inputs
    if not fresh:
        changed = differences(record.get("inputs", {}), inputs)
        why = (
            "; ".join(changed)
            if changed
            else "its own inputs are the same: the data or an upstream result changed"
        )
        return f"{out_dir}: computed from other inputs ({why}): computed again"
    outputs = record.get("outputs") or {}
    bad = damaged(Path(out_dir), outputs) if outputs else ["(no output digests recorded)"]
    if bad:
        return (
            f"{out_dir}: {', '.join(bad)} missing or changed since {record_name} was written: computed again"
        )
    return f"{out_dir}: {record_name} matches the params and the files it lists are intact: reused"


def explain(
    cfg: Config, step: str, loss_id: str, seed: int, workdir: Path, data_version: str | None
) -> list[str]:
    """Why ``step`` of (``loss_id``, ``seed``) is or is not computed again, in each place its result
    may be: the fixed layout of ``python -m oodgate`` and ``dvc repro``, and the flow's
    content-addressed directory (with the prepared data of ``data_version``, the md5 that
    ``data.dvc`` records). The MLflow line gives the fingerprint a reusable child run carries."""
    lay = Layout(Path(workdir))
    lines = [f"{step} of {loss_id} seed {seed}" if step != "prepare" else "prepare (the data)"]
    prepared = {"python -m oodgate / dvc repro": lay.prepared}
    if data_version:
        prepared["the flow"] = lay.cached("prepared", prepare_fingerprint(cfg, data_version))
    for who, prepared_dir in prepared.items():
        if step == "prepare":
            lines.append(f"  {who}: {judge(prepared_dir, 'data.json', None, prepare_inputs(cfg))}")
            continue
        if not (prepared_dir / "id.pt").is_file():
            lines.append(f"  {who}: no prepared data in {prepared_dir}: every step computes on the next run")
            continue
        want = expected(cfg, loss_id, seed, prepared_dir)
        fp = want.fingerprint[step]
        out = {
            "python -m oodgate / dvc repro": _fixed(lay, step, loss_id, seed),
            "the flow": lay.cached(step, fp),
        }[who]
        lines.append(f"  {who}: fingerprint {fp[:12]}; {judge(out, RECORDS[step], fp, want.inputs[step])}")
        if who == "the flow":
            losses = [
                expected(cfg, loss_id, s, prepared_dir).fingerprint["evaluate"] for s in cfg.seeds_of(loss_id)
            ]
            lines.append(
                f"  MLflow: the flow reuses a finished {loss_id} child run tagged oodgate.fingerprint = "
                f"'{digest(losses)}' (all its seeds), once its artifacts match the digests recorded with it"
            )
    if not data_version:
        lines.append("  the flow: no data.dvc records the data's version: `dvc add` it first")
    lines.append(f"  dvc repro: {_dvc_stage(cfg, lay, step, loss_id, seed)}")
    return lines


def _dvc_stage(cfg: Config, lay: Layout, step: str, loss_id: str, seed: int) -> str:
    """Whether the stage's inputs record (what ``dvc.yaml`` makes it depend on) is the current one."""
    named = {"prepare": "prepare.json", "select": f"select/{loss_id}.json"}
    path = lay.inputs / named.get(step, f"{step}/{loss_id}/seed{seed}.json")
    now = prepare_inputs(cfg) if step == "prepare" else _step_inputs(cfg, step, loss_id, seed)
    if not path.is_file():
        return f"no {path}: the inputs stage writes it, and the stage runs"
    changed = differences(read_json(path), now)
    if changed:
        return f"{path} differs from the params ({'; '.join(changed)}): the inputs stage rewrites it and the stage re-runs"
    return (
        f"{path} is current: the stage re-runs only when an upstream output changed (`dvc status` lists them)"
    )


def _step_inputs(cfg: Config, step: str, loss_id: str, seed: int) -> dict[str, Any]:
    records = {"train": train_inputs, "calibrate": calibrate_inputs, "evaluate": evaluate_inputs}
    return select_inputs(cfg, loss_id) if step == "select" else records[step](cfg, loss_id, seed)


def _fixed(lay: Layout, step: str, loss_id: str, seed: int) -> Path:
    return lay.select(loss_id) if step == "select" else getattr(lay, step)(loss_id, seed)
