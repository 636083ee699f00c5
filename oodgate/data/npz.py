"""``.npz`` files of images, read from their headers before anything is decompressed: the array's
shape and dtype, and whether an OOD set's array is too large to load (a file of a few hundred KB can
hold gigabytes of zeros)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

MAX_OOD_BYTES = 8 * 2**30  # 8 GiB: the largest decompressed array an OOD set may hold


def npz_array_header(path: str | Path, name: str = "x") -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of the array ``name`` in the ``.npz`` at ``path``, from its ``.npy`` header
    alone (the array is never decompressed); None when the archive holds no such array. A file that
    is not a zip raises ``zipfile.BadZipFile``, a damaged header ``ValueError``, as they come."""
    with zipfile.ZipFile(path) as z:
        members = set(z.namelist())
        member = next((m for m in (f"{name}.npy", name) if m in members), None)
        if member is None:
            return None
        with z.open(member) as f:
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
    return shape, dtype


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def ood_npz_too_large(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why the array ``x`` of an OOD ``.npz`` (``shape`` and ``dtype`` from its header) is too large
    to load: its decompressed size over :data:`MAX_OOD_BYTES`; None when it is not."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes <= MAX_OOD_BYTES:
        return None
    return (
        f"{str(path)!r}: array 'x' ({dtype}, shape {shape}) is {_size(nbytes)} decompressed, over the "
        f"limit of {_size(MAX_OOD_BYTES)} for an OOD set (MAX_OOD_BYTES in oodgate/data/npz.py); "
        "save fewer images in it, or split it into several OOD sets"
    )
