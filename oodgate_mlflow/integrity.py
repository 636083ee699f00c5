"""Registered model files, verified before use.

At registration every file of the model version (the ``torch.export`` program, the pyfunc's code
file, ``MLmodel``, ``meta.json``, ``reference.json``, the environment files) is hashed, and the
SHA-256 of each is recorded as the version's tag :data:`TAG` in the registry. Every loader (Python,
REST, the monitoring flow) downloads the version into a local directory, compares every file with
the record, and loads from that same directory only if all match: a mismatch, a missing or an
unexpected file is refused in one line naming the file, before any code from the artifact store is
imported (loading a pyfunc runs its code file).

What this protects against: anyone who can write to the artifact store but not to the registry
(the tracking database or server), e.g. a shared artifact bucket or directory. What it does not:
whoever can write the registry can change the record too, and the code of this project and its
installed packages are trusted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

TAG = "oodgate.model_files"  # on a model version: {relative path: sha256} of every file


# What repairs a version: a pipeline run re-registers its best candidate when the version holding
# the same weights fails this check (oodgate_mlflow.registry.register), and a promoted candidate
# replaces a champion that fails it; another version can be loaded meanwhile.
REPAIR = (
    "run the pipeline (`make run`): when this model is its best candidate it is registered again as a new "
    "version and the aliases move to it, and a promoted candidate replaces a champion that fails this check; "
    "meanwhile load another version (--version N)"
)


class ModelIntegrityError(RuntimeError):
    """A registered model's files are not the ones recorded at registration."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(model_dir: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``model_dir`` (sorted, POSIX paths)."""
    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def encode(files: Mapping[str, str]) -> str:
    return json.dumps(dict(files), sort_keys=True, separators=(",", ":"))


def verify(model_dir: str | Path, recorded: str | None, what: str) -> None:
    """Raise :class:`ModelIntegrityError` unless the files under ``model_dir`` are exactly the
    recorded ones (``recorded``: the :data:`TAG` value; ``what``: the model version, for the
    message)."""
    if not recorded:
        raise ModelIntegrityError(
            f"{what} has no record of its files ({TAG}), so they cannot be verified; {REPAIR}"
        )
    try:
        want = json.loads(recorded)
    except ValueError:
        raise ModelIntegrityError(f"{what}: its {TAG} record is not readable; {REPAIR}") from None
    got = manifest(model_dir)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            problem = "is missing from the artifact store"
        elif name not in want:
            problem = "was not part of the model when it was registered (an added file)"
        elif got[name] != want[name]:
            problem = (
                f"is not the file registered (sha256 {got[name][:12]}..., registered {want[name][:12]}...)"
            )
        else:
            continue
        raise ModelIntegrityError(
            f"{what}: {name} {problem}; refusing to load it (the artifact store was changed after "
            f"registration); restore the file, or {REPAIR}"
        )
