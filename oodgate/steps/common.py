"""What every step shares: JSON and tensor files, digests, the prepared-data format, the device."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oodgate.config import Config
from oodgate.data.bundle import DataBundle, ImageSet
from oodgate.steps.results import CorruptResultError, StaleResultError

if TYPE_CHECKING:
    from oodgate.steps.inputs import Expected

log = logging.getLogger("oodgate")


# ---------------------------------------------------------------- digests
def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object (fingerprints and cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a file's bytes (memoised per path, size and modification time)."""
    st = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------- JSON
def write_json(path: Path, obj: Any) -> Path:
    """Atomically: a reader never sees half a record, and a failed write (a full disk) leaves
    neither the old file changed nor a temporary file behind (:mod:`oodgate.files`)."""
    from oodgate.files import write_text

    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_record(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A step's record file, or a FileNotFoundError that says which step writes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r} is missing; {fix}")
    return read_json(path)


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


# ---------------------------------------------------------------- outputs, verified before reuse
def output_digests(out_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    """What a record stores of the files it vouches for: their digests."""
    return {name: file_digest(Path(out_dir) / name) for name in names}


def damaged(out_dir: Path, outputs: Mapping[str, str]) -> list[str]:
    """The files of ``outputs`` that are missing or whose bytes differ from their recorded digest."""
    bad = []
    for name, want in outputs.items():
        path = Path(out_dir) / name
        if not path.is_file() or file_digest(path) != want:
            bad.append(name)
    return bad


def reusable(out_dir: Path, record_name: str, fingerprint: str) -> dict[str, Any] | None:
    """The record in ``out_dir`` if it has ``fingerprint`` and every file it lists is intact; else
    None (a corrupt file is reported by path, and the caller recomputes)."""
    path = Path(out_dir) / record_name
    if not path.is_file():
        return None
    try:
        record = read_json(path)
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


def verified(record: Mapping[str, Any], out_dir: Path, name: str, what: str, fix: str) -> Path:
    """``out_dir/name`` if its bytes are those the upstream ``record`` recorded; otherwise a
    CorruptResultError naming the file (an upstream step must recompute it)."""
    path = Path(out_dir) / name
    want = (record.get("outputs") or {}).get(name)
    if not path.is_file() or want is None or file_digest(path) != want:
        raise CorruptResultError(
            f"{what}: {str(path)!r} is missing or not the file its record vouches for (corrupt or changed "
            f"since it was written); {fix}"
        )
    return path


# ---------------------------------------------------------------- one process at a time
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


# ---------------------------------------------------------------- upstream results
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


# ---------------------------------------------------------------- prepared data
def pack(s: ImageSet) -> dict[str, torch.Tensor]:
    return {"x": s.x, "y": s.y}


def _unpack(d: Mapping[str, torch.Tensor]) -> ImageSet:
    return ImageSet(x=d["x"], y=d["y"])


def load_prepared(prepared_dir: str | Path, with_ood: bool = True) -> DataBundle:
    prepared_dir = Path(prepared_dir)
    fix = "run the prepare step again (`python -m oodgate prepare` or `dvc repro prepare`)"
    if not (prepared_dir / "data.json").is_file():
        raise FileNotFoundError(f"prepared data not found in {str(prepared_dir)!r}; {fix}")
    summary = read_json(prepared_dir / "data.json")
    # Memory-mapped: the images are read from the file as they are used, so a prepared dataset larger
    # than memory trains (a small one ends up in the page cache, at the speed of memory).
    d = torch.load(
        verified(summary, prepared_dir, "id.pt", "prepared data", fix), weights_only=True, mmap=True
    )
    ood = (
        torch.load(
            verified(summary, prepared_dir, "ood.pt", "prepared data", fix), weights_only=True, mmap=True
        )
        if with_ood
        else {"names": [], "groups": {}, "sets": {}}
    )
    m = d["meta"]
    return DataBundle(
        train=_unpack(d["train"]),
        val=_unpack(d["val"]),
        test=_unpack(d["test"]),
        ood={k: _unpack(ood["sets"][k]) for k in ood["names"]},
        num_classes=m["num_classes"],
        in_channels=m["in_channels"],
        image_size=m["image_size"],
        mean=tuple(m["mean"]),
        std=tuple(m["std"]),
        class_names=list(m["class_names"]),
        ood_groups=dict(ood["groups"]),
        ood_val={k: _unpack(v) for k, v in ood.get("validation", {}).items()},
    )


# ---------------------------------------------------------------- numerics
PROVENANCE = "provenance.json"  # beside a result: what computed it (machine-specific, not hashed by DVC)


def activate_numerics(cfg: Config, processes: int = 1) -> None:
    """Compute under ``cfg.numerics`` in this process (:func:`oodgate.numerics.activate`), each of
    ``processes`` data-parallel processes with its share of the threads."""
    from oodgate import numerics
    from oodgate.engine import resolve_device

    threads = cfg.numerics.threads
    if threads is not None and processes > 1:
        threads = max(1, threads // processes)
    numerics.activate(cfg.numerics.mode, threads, resolve_device(cfg.train.device).type)


def write_provenance(cfg: Config, out_dir: Path) -> None:
    """``provenance.json`` in ``out_dir``: the numerics in force, the CPU and the software
    (``.dvcignore`` keeps it out of the directory's hash: the result is the same bits anywhere)."""
    from oodgate import numerics

    write_json(Path(out_dir) / PROVENANCE, numerics.provenance(cfg.numerics.mode, cfg.numerics.threads))


# ---------------------------------------------------------------- device
def inference_device(cfg: Config) -> tuple[str, bool]:
    """Where calibration, evaluation and export run: the device training resolved
    (``train.device``), with bf16 autocast exactly where training used it (``train.amp`` on CUDA)."""
    from oodgate.engine import resolve_device

    device = resolve_device(cfg.train.device)
    return str(device), cfg.train.amp and device.type == "cuda"
