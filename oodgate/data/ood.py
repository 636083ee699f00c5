"""Out-of-distribution sets: the names allowed in ``data.ood``, plus folders and ``.npz`` files.

A registered loader takes an ``OODRequest`` and returns uint8 ``(N, C, H, W)`` images of any shape;
``load_ood`` conforms them to the in-distribution shape. Generated sets (noise) are drawn at the ID
shape directly from a generator seeded by ``data.split_seed`` and a per-set constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from oodgate.base.config import DataConfig, OODSource
from oodgate.base.registry import Registry
from oodgate.data.bundle import DataNotFoundError, ImageSet
from oodgate.data.embedded import GLYPHS, PHOTO_PATCHES, PORTRAIT_PATCHES, load_embedded
from oodgate.data.id_sets import embedded_mnist_set
from oodgate.data.images import ImageTooLargeError, conform, nchw_from_array, open_image
from oodgate.data.npz import npz_array_header, ood_npz_too_large
from oodgate.data.torchvision_sets import TORCHVISION_SETS, load_torchvision

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# Per-set constants mixed with data.split_seed, so each generated set has its own stream.
_GAUSSIAN_STREAM = 101
_UNIFORM_STREAM = 102
_PATCH_STREAM = 103
_GLYPH_STREAM = 104
_PORTRAIT_STREAM = 105


@dataclass(frozen=True)
class OODRequest:
    """What an OOD loader needs: the data config, the data root and the ID image shape."""

    cfg: DataConfig
    root: Path
    channels: int
    size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.cfg.ood_size, self.channels, self.size, self.size)

    def rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.split_seed, stream])


OODLoader = Callable[[OODRequest], torch.Tensor]
OOD_DATASETS: Registry[OODLoader] = Registry("OOD dataset")


def unseen_digits(cfg: DataConfig) -> list[int]:
    """Digits left out of ``data.classes``; ``ValueError`` if ``mnist_unseen`` cannot be built."""
    if cfg.dataset != "embedded_mnist":
        raise ValueError(
            f"data.ood: 'mnist_unseen' holds the MNIST-5k digits left out of data.classes, so it needs "
            f"data.dataset: embedded_mnist (got {cfg.dataset!r}); use another OOD set for this dataset"
        )
    unseen = [d for d in range(10) if d not in (cfg.classes or range(10))]
    if not unseen:
        raise ValueError(
            f"data.ood: 'mnist_unseen' is empty because data.classes={cfg.classes} keeps every digit; "
            "list only the in-distribution digits in data.classes (e.g. [0, 1, 2, 3, 4, 5])"
        )
    return unseen


@OOD_DATASETS.register("mnist_unseen")
def _mnist_unseen(req: OODRequest) -> torch.Tensor:
    """MNIST-5k digits not in ``data.classes`` (near-OOD)."""
    digits = unseen_digits(req.cfg)
    s = embedded_mnist_set(req.root)
    return s.x[torch.isin(s.y, torch.tensor(digits))].contiguous()


@OOD_DATASETS.register("photo_patches")
def _photo_patches(req: OODRequest) -> torch.Tensor:
    """Crops of natural photographs (far-OOD); a seeded subset of ``data.ood_size`` when that is smaller."""
    patches = load_embedded(req.root, PHOTO_PATCHES)
    if req.cfg.ood_size < len(patches):
        keep = req.rng(_PATCH_STREAM).choice(len(patches), req.cfg.ood_size, replace=False)
        patches = patches[np.sort(keep)]
    return nchw_from_array(patches, PHOTO_PATCHES)


def _embedded_subset(req: OODRequest, name: str, stream: int) -> torch.Tensor:
    images = load_embedded(req.root, name)
    if req.cfg.ood_size < len(images):
        keep = req.rng(stream).choice(len(images), req.cfg.ood_size, replace=False)
        images = images[np.sort(keep)]
    return nchw_from_array(images, name)


@OOD_DATASETS.register("glyphs")
def _glyphs(req: OODRequest) -> torch.Tensor:
    """Letters rendered from matplotlib's fonts, MNIST-style (the demo's validation OOD set, near);
    a seeded subset of ``data.ood_size`` when that is smaller."""
    return _embedded_subset(req, GLYPHS, _GLYPH_STREAM)


@OOD_DATASETS.register("portrait_patches")
def _portrait_patches(req: OODRequest) -> torch.Tensor:
    """Crops of matplotlib's sample photograph (the demo's validation OOD set, far); a seeded subset
    of ``data.ood_size`` when that is smaller."""
    return _embedded_subset(req, PORTRAIT_PATCHES, _PORTRAIT_STREAM)


@OOD_DATASETS.register("gaussian_noise")
def _gaussian_noise(req: OODRequest) -> torch.Tensor:
    """Pixels ``clip(rint(N(0.5, 0.25^2) * 255), 0, 255)``, independent per pixel."""
    noise = req.rng(_GAUSSIAN_STREAM).normal(0.5, 0.25, req.shape)
    return torch.from_numpy(np.clip(np.rint(noise * 255), 0, 255).astype(np.uint8))


@OOD_DATASETS.register("uniform_noise")
def _uniform_noise(req: OODRequest) -> torch.Tensor:
    """Pixels uniform on ``0..255``, independent per pixel."""
    return torch.from_numpy(req.rng(_UNIFORM_STREAM).integers(0, 256, req.shape, dtype=np.uint8))


def _torchvision_test(name: str) -> OODLoader:
    def load(req: OODRequest) -> torch.Tensor:
        return load_torchvision(name, req.root, train=False, download=req.cfg.download)[0].x

    load.__doc__ = f"{name}: the official test split through torchvision."
    return load


for _name in TORCHVISION_SETS:
    OOD_DATASETS.register(_name)(_torchvision_test(_name))


def _load_image_folder(folder: Path, channels: int, size: int) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"OOD folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    batch = []
    for f in files:  # images may differ in size and mode: conform each one, then stack
        try:
            with open_image(f) as img:
                mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                array = np.asarray(img.convert(mode), dtype=np.uint8)
        except ImageTooLargeError as e:
            raise ValueError(
                f"OOD folder {str(folder)!r}: {f.name} has {e}; shrink it or remove it"
            ) from None
        batch.append(conform(nchw_from_array(array[None], str(f)), channels, size))
    return torch.cat(batch)


def _load_npz(path: Path) -> torch.Tensor:
    import zipfile

    try:  # the decompressed size from the header, before anything is decompressed
        header = npz_array_header(path)
    except (OSError, ValueError, zipfile.BadZipFile):
        header = None  # np.load below says what is wrong
    too_large = header and ood_npz_too_large(path, *header)
    if too_large:
        raise ValueError(f"OOD file {too_large}")
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz.files:
            raise ValueError(
                f"OOD file {str(path)!r} has no array 'x' (found: {', '.join(npz.files) or 'none'})"
            )
        x = npz["x"]
    if len(x) == 0:
        raise ValueError(f"OOD file {str(path)!r}: array 'x' is empty")
    return nchw_from_array(x, str(path))


def load_path_source(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A folder of images (sorted by filename) or an ``.npz`` with uint8 array ``x`` (NHW or NHWC).

    Returns uint8 ``(N, channels, size, size)``; a relative path is taken from the working directory.
    """
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(
            f"OOD path {str(p)!r} does not exist; point data.ood[].path to a folder of images or an .npz file"
        )
    if p.is_dir():
        return _load_image_folder(p, channels, size)
    if p.suffix.lower() == ".npz":
        return conform(_load_npz(p), channels, size)
    raise ValueError(f"OOD path {str(p)!r} must be a folder of images or an .npz file")


def check_ood_sources(cfg: DataConfig) -> None:
    """Fail before any data is read: duplicate names, unknown names, impossible ``mnist_unseen``."""
    seen: set[str] = set()
    for src in cfg.ood:
        if src.name in seen:
            raise ValueError(f"data.ood: OOD set {src.name!r} is listed twice; names must be unique")
        seen.add(src.name)
        if src.path is not None:
            continue
        if src.name not in OOD_DATASETS:
            raise ValueError(
                f"data.ood: unknown OOD dataset {src.name!r}; valid names: {', '.join(OOD_DATASETS.names())} "
                "(or give a path: to a folder of images or an .npz file)"
            )
        if src.name == cfg.dataset:
            raise ValueError(
                f"data.ood: {src.name!r} is the in-distribution dataset (data.dataset); "
                "its test split cannot also be OOD"
            )
        if src.name == "mnist_unseen":
            unseen_digits(cfg)


#: the kind of images each dataset holds: an OOD set of the in-distribution data's kind is near-OOD
#: (OpenOOD's split: CIFAR-100 is near for CIFAR-10, SVHN and MNIST far; Fashion-MNIST near for MNIST)
_KINDS = {
    "embedded_mnist": "handwritten digits",
    "mnist": "handwritten digits",
    "fashion_mnist": "handwritten digits",
    "cifar10": "object photos",
    "cifar100": "object photos",
    "svhn": "house numbers",
}
#: generated and embedded OOD sets: their group whatever the in-distribution data
_GROUPS = {
    "mnist_unseen": "near",
    "photo_patches": "far",
    "gaussian_noise": "far",
    "uniform_noise": "far",
    "glyphs": "near",
    "portrait_patches": "far",
}


def ood_group(src: OODSource, cfg: DataConfig) -> str:
    """``near`` or ``far``: the set's ``group`` if given, else its default (``_GROUPS``, or near when
    the torchvision set holds the same kind of images as the in-distribution dataset)."""
    if src.group is not None:
        return src.group
    if src.name in _GROUPS:
        return _GROUPS[src.name]
    same_kind = _KINDS.get(src.name) is not None and _KINDS.get(src.name) == _KINDS.get(cfg.dataset)
    return "near" if same_kind else "far"


def ood_groups(cfg: DataConfig) -> dict[str, str]:
    """Every OOD set of ``data.ood`` with its group, in order."""
    return {src.name: ood_group(src, cfg) for src in cfg.ood}


def load_ood(src: OODSource, cfg: DataConfig, root: Path, channels: int, size: int) -> ImageSet:
    """One OOD set at the ID shape ``(channels, size, size)``, labelled ``-1``."""
    if src.path is not None:
        x = load_path_source(src.path, channels, size)
    else:
        x = conform(OOD_DATASETS.get(src.name)(OODRequest(cfg, root, channels, size)), channels, size)
    return ImageSet(x, torch.full((x.shape[0],), -1, dtype=torch.int64))
