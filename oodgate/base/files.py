"""Writing results so that a failure loses nothing: a temporary file beside the target, moved onto it
only once complete, and removed on any failure.

A full disk used to show only inside a traceback and left 0-byte ``*.tmp`` files behind. Here it
becomes :class:`NoSpaceError`, whose one-line message names the file system, the file and the fix;
the entry points print it without a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, cast

from oodgate.base.records import CorruptResultError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full file system, or a full quota on it


class NoSpaceError(OSError):
    """The file system holding a result is full: say where, what was being written, and that a re-run
    after freeing space reuses every finished result."""

    def __init__(self, path: str | Path, cause: OSError | None = None, message: str | None = None) -> None:
        path = Path(os.path.abspath(path))
        code = cause.errno if cause is not None and cause.errno in NO_SPACE else errno.ENOSPC
        what = "no space left" if code == errno.ENOSPC else "no disk quota left"
        message = message or (
            f"{what} on {file_system(path)} while writing {path}; free space and re-run (finished "
            "results are kept and reused)"
        )
        super().__init__(code, message)
        self.path = path

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ..."
        return cast(str, self.strerror)  # always set: __init__ passes (code, message)

    def __reduce__(self) -> tuple[Any, ...]:
        # as it was, wherever it is unpickled (a Dask worker's failure reaches the flow this way)
        return (type(self), (str(self.path), None, self.strerror))


def is_no_space(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is a full file system."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


def no_space_error(error: BaseException | None, default_path: str | Path = ".") -> NoSpaceError:
    """The :class:`NoSpaceError` for ``error`` (see :func:`is_no_space`), naming the file it was
    writing where the error says so."""
    while error is not None:
        if isinstance(error, NoSpaceError):
            return error
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return NoSpaceError(error.filename or default_path, error)
        error = error.__cause__ or error.__context__
    return NoSpaceError(default_path)


def file_system(path: Path) -> str:
    """``/mount/point (device)`` of the file system holding ``path`` (Linux: from /proc/self/mounts)."""
    here = path
    while not here.exists() and here.parent != here:
        here = here.parent
    here = here.resolve()
    while not os.path.ismount(here) and here.parent != here:
        here = here.parent
    device = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1].replace("\\040", " ") == str(here):
                    device = fields[0]  # the last mount on a point is the one in force
    except OSError:
        pass
    return f"{here} ({device})" if device else str(here)


@contextmanager
def atomic(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file opened on ``<path>.<writer>.tmp``, moved onto ``path`` once the block wrote it whole.
    On any failure the temporary file is removed and ``path`` keeps what it held; a full file system
    is raised as :class:`NoSpaceError`. The temporary name is the writer's own (process, thread, a
    random part), so that two processes writing the same result never move each other's file.
    Writers get a Python file object, so that torch.save reports the write's own error (given a
    path, it raises a RuntimeError without the errno)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_no_space(e):
            raise NoSpaceError(path, e if isinstance(e, OSError) else None) from None
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic(path, "w") as f:
        f.write(text)
    return Path(path)


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic(path) as f:
        torch.save(obj, f)
    return Path(path)


# ---------------------------------------------------------------- digests and JSON records
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


def write_json(path: Path, obj: Any) -> Path:
    """Atomically: a reader never sees half a record, and a failed write (a full disk) leaves
    neither the old file changed nor a temporary file behind (:mod:`oodgate.base.files`)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


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
