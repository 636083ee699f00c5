"""The user's own images: a class-per-subfolder tree (the layout torchvision's ``ImageFolder`` reads).

``data.path`` (under ``data.root`` unless absolute) holds one subfolder per class, or ``train/``
(and optionally ``val/``, ``test/``) subfolders that each hold the class folders; a split that is not
given is carved from ``train`` as for the other datasets. Classes are named by their folder, in sorted
order; ``data.classes`` selects and orders a subset (names or indices). Any file Pillow reads is an
image (hidden files and folders are ignored).

Every image is decoded the same way for training, evaluation and monitoring (:func:`decode_image`):
EXIF orientation applied, converted to RGB (transparent pixels composited onto white), the shorter
side resized to ``data.image_size`` and the centre cropped to a square (Pillow's ``ImageOps.fit``,
bilinear with antialiasing). Unreadable files are reported by path; ``data.on_bad_image`` skips or fails.

Decoded splits go into ``.npy`` files in a scratch directory when one is given (memory-mapped, so a
dataset larger than memory is never held whole), or into memory otherwise; ``data.workers``
processes decode in parallel, and the result does not depend on their number.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.utils.data

from oodgate.base.config import DataConfig
from oodgate.data.bundle import DataNotFoundError
from oodgate.data.images import open_image

log = logging.getLogger("oodgate")

SPLITS = ("train", "val", "test")
_SHOWN = 5  # bad files named in a message


class BadImagesError(ValueError):
    """Images that cannot be decoded, with ``data.on_bad_image: fail``."""


@cache
def image_suffixes() -> frozenset[str]:
    """Every file extension Pillow can open (``.jpg``, ``.png``, ``.webp``, ``.tif``, ...)."""
    from PIL import Image

    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted, hidden files and folders excluded."""
    suffixes = image_suffixes()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and Path(f).suffix.lower() in suffixes
        )
    return sorted(out)


def folder_root(cfg: DataConfig, root: Path) -> Path:
    """Where the class folders (or the split folders) are: ``data.path`` under ``data.root``."""
    if cfg.path is None:
        return Path(root)
    p = Path(cfg.path)
    return p if p.is_absolute() else Path(root) / p


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


@dataclass(frozen=True)
class FolderScan:
    """The files of a folder dataset, labelled ``0..K-1`` in the order of ``class_names``.

    ``splits`` maps ``train`` (and ``val``/``test`` when given as folders) or ``all`` (no split
    folders) to ``(paths, labels)``."""

    base: Path
    class_names: list[str]
    splits: dict[str, tuple[list[Path], np.ndarray]]


def _selected(found: list[str], classes: Sequence[int] | Sequence[str] | None, where: Path) -> list[str]:
    if classes is None:
        return found
    if isinstance(classes[0], int):
        bad = [c for c in cast("Sequence[int]", classes) if not 0 <= c < len(found)]
        if bad:
            raise ValueError(
                f"data.classes: index {bad[0]} is out of range: {where} has {len(found)} class folders "
                f"({', '.join(found)}); use indices 0..{len(found) - 1} or the folder names"
            )
        return [found[c] for c in cast("Sequence[int]", classes)]
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(
            f"data.classes: no class folder {missing[0]!r} in {where}; found: {', '.join(found)}"
        )
    return list(cast("Sequence[str]", classes))


def scan(cfg: DataConfig, root: str | Path) -> FolderScan:
    """List the files of a folder dataset; fails before any image is decoded on a missing folder,
    a layout without class folders, fewer than two classes or an empty class, naming what was found."""
    base = folder_root(cfg, Path(root))
    if not base.is_dir():
        raise DataNotFoundError(
            f"data.path: folder {str(base)!r} does not exist (data.root={cfg.root!r}, data.path={cfg.path!r}); "
            "point them at a folder with one subfolder of images per class"
        )
    split_dirs = [s for s in SPLITS if (base / s).is_dir()]
    if split_dirs and "train" not in split_dirs:
        raise ValueError(
            f"{base} has {'/'.join(split_dirs)} but no train/ folder; add train/<class>/... or use one "
            "folder per class without split folders"
        )
    top = base / "train" if split_dirs else base
    found = _class_dirs(top)
    if not found:
        loose = len(image_files(top))
        raise ValueError(
            f"{top} holds no class folders ({loose} loose images); put each class's images in a "
            "subfolder named after the class (the layout of torchvision's ImageFolder)"
        )
    names = _selected(found, cfg.classes, top)
    if len(names) < 2:
        raise ValueError(
            f"{top} has a single class folder ({names[0]!r}); a classifier needs at least two classes"
        )
    splits: dict[str, tuple[list[Path], np.ndarray]] = {}
    for split in split_dirs or ["all"]:
        folder = base / split if split_dirs else base
        if split != "train" and split in split_dirs:
            extra = sorted(set(_class_dirs(folder)) - set(found))
            if extra:
                raise ValueError(
                    f"{folder} has class folder(s) {', '.join(extra)} that train/ lacks; "
                    f"the classes are train/'s: {', '.join(found)}"
                )
        paths: list[Path] = []
        labels: list[int] = []
        counts = {}
        for label, name in enumerate(names):
            files = image_files(folder / name) if (folder / name).is_dir() else []
            counts[name] = len(files)
            paths.extend(files)
            labels.extend([label] * len(files))
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            shown = ", ".join(f"{n}: {c}" for n, c in counts.items())
            raise ValueError(
                f"{folder}: class folder(s) {', '.join(empty)} hold no images (images per class: {shown}); "
                f"add images, or leave the class out with data.classes"
            )
        splits[split] = (paths, np.asarray(labels, dtype=np.int64))
    return FolderScan(base, names, splits)


# ---------------------------------------------------------------- decoding
def decode_image(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """One image file -> uint8 ``(channels, size, size)``: EXIF orientation applied, RGB (alpha
    composited onto white) or luma, shorter side resized to ``size`` and the centre cropped."""
    from PIL import Image, ImageOps

    with open_image(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB" if channels == 3 else "L")
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
        a = np.asarray(img, dtype=np.uint8)
    return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]


class _Decode(torch.utils.data.Dataset["np.ndarray | str"]):
    """Item ``i``: the decoded image ``i``, or the reason it cannot be decoded."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int) -> None:
        self.paths, self.size, self.channels = [str(p) for p in paths], size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray | str:
        try:
            return decode_image(self.paths[i], self.size, self.channels)
        except Exception as e:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            return f"{type(e).__name__}: {e}"


def _identity(x: Any) -> Any:
    return x


def _new_array(n: int, shape: tuple[int, int, int], scratch: Path | None, name: str) -> np.ndarray:
    if scratch is None:
        return np.empty((n, *shape), dtype=np.uint8)
    scratch.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))


def decode_files(
    paths: Sequence[Path],
    size: int,
    *,
    channels: int = 3,
    workers: int = 0,
    scratch: Path | None = None,
    name: str = "images",
) -> tuple[np.ndarray, np.ndarray, list[tuple[Path, str]]]:
    """Decode ``paths`` in order: ``(images, kept, bad)`` where ``images`` is uint8
    ``(len(kept), channels, size, size)`` (a memory-mapped ``.npy`` in ``scratch`` when given),
    ``kept`` the indices of the decoded paths and ``bad`` the ``(path, reason)`` of the others."""
    shape = (channels, size, size)
    out = _new_array(len(paths), shape, scratch, name)
    kept: list[int] = []
    bad: list[tuple[Path, str]] = []
    jobs = _Decode(paths, size, channels)
    if workers > 0 and len(paths) > 1:
        from torch.utils.data import DataLoader

        # In order, whatever the number of workers; an error is returned as a string, not raised.
        # Spawned, not forked: the caller may be a flow whose threads (Prefect's, the server's) a
        # forked child would inherit mid-operation; a forked decoding worker once exited at start.
        loader = DataLoader(
            jobs,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=8,
            multiprocessing_context="spawn",
        )
        _collect(loader, paths, out, kept, bad)
    else:
        _collect((jobs[i] for i in range(len(jobs))), paths, out, kept, bad)
    if len(kept) < len(paths):  # compact into an array of the exact size (a view would save them all)
        exact = _new_array(len(kept), shape, scratch, f"{name}.kept")
        exact[:] = out[: len(kept)]
        del out
        if scratch is not None:
            (scratch / f"{name}.npy").unlink()
        out = exact
    return out, np.asarray(kept, dtype=np.int64), bad


def _collect(
    results: Iterable[np.ndarray | str],
    paths: Sequence[Path],
    out: np.ndarray,
    kept: list[int],
    bad: list[tuple[Path, str]],
) -> None:
    for i, r in enumerate(results):
        if isinstance(r, str):
            bad.append((paths[i], r))
        else:
            out[len(kept)] = r
            kept.append(i)


def report_bad(bad: list[tuple[Path, str]], total: int, where: Path, on_bad_image: str) -> None:
    """Fail (``on_bad_image: fail``) or warn about the unreadable images, naming the first few."""
    if not bad:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in bad[:_SHOWN])
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    if on_bad_image == "fail":
        raise BadImagesError(
            f"{len(bad)} of {total} images under {where} cannot be read: {shown}{more}; "
            "fix or remove them, or set data.on_bad_image: skip to leave them out"
        )
    log.warning("skipped %d of %d unreadable images under %s: %s%s", len(bad), total, where, shown, more)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A uint8 tensor sharing ``a``'s memory (or its memory map)."""
    return torch.from_numpy(a)
