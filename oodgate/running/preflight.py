"""Everything about a config that can be known before any work starts, checked in well under a second.

:func:`preflight` runs in every entry point (``python -m oodgate``, ``python -m flows.pipeline``, the
flow itself before its first task) after the config is loaded: every name the config gives is one
the code has (:func:`check_names`), the device exists, the class indices exist in the dataset, the
work directory can be written, the pretrained weights fit the backbone, and every OOD path is
readable and holds images of a usable shape (an ``.npz`` is inspected through its header, never
loaded whole). Each problem is one line naming the key, the value and the fix
(:class:`PreflightError`); the caller prints it without a traceback.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import cast

import numpy as np

from oodgate.base.config import AUTO_SCORE, Config, ConfigError
from oodgate.data.folder import scan
from oodgate.data.id_sets import ID_DATASETS
from oodgate.data.npz import npz_array_header, ood_npz_too_large
from oodgate.data.ood import OOD_DATASETS
from oodgate.data.torchvision_sets import TORCHVISION_SETS
from oodgate.learning import methods, models, scores
from oodgate.learning.importing import CheckpointError, check_checkpoints
from oodgate.learning.models import create_backbone
from oodgate.learning.models.torchvision_models import WeightsError
from oodgate.learning.models.torchvision_models import check_weights as fits
from oodgate.measuring.metrics import OOD_SUMMARIES

# Classes of each in-distribution dataset (their loaders are slow to run just to count them).
NUM_CLASSES = {
    "embedded_mnist": 10,
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "svhn": 10,
}
# The (channels, side) of each dataset's images, which a backbone's weights depend on; folder
# datasets are RGB at data.image_size.
IMAGE_SHAPES = {
    "embedded_mnist": (1, 28),
    "mnist": (1, 28),
    "fashion_mnist": (1, 28),
    "cifar10": (3, 32),
    "cifar100": (3, 32),
    "svhn": (3, 32),
}
# The class names of the datasets whose names are the digits, known without loading them (the others'
# are read from their files: an imported checkpoint's class names are checked once the data is prepared).
CLASS_NAMES = {
    "embedded_mnist": [str(d) for d in range(10)],
    **{name: [str(d) for d in range(10)] for name, spec in TORCHVISION_SETS.items() if spec.digits},
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# An OOD .npz is loaded whole, then conformed to the ID shape (a copy or two more); a small compressed
# file can hold any size (a 381 KB .npz held 392 MB of zero images), so the decompressed size of its
# array 'x' is read from its header and capped before anything is decompressed.


class PreflightError(ConfigError):
    """The config names something this machine does not have."""


def check_names(cfg: Config) -> None:
    """Every name the config gives is one the code has: the backbone and its options, the dataset,
    the OOD sets (known ones, no summary's name), the methods with their options and the scores.
    The registries import torch, so this runs here and not when the config is parsed."""

    if not models.is_known(cfg.model.backbone):
        raise PreflightError(
            f"model.backbone={cfg.model.backbone!r} is not a known backbone; "
            f"valid backbones: {', '.join(models.names())}, or torchvision:<name> for a torchvision "
            "classification model (torchvision:resnet18, torchvision:efficientnet_b0, ...)"
        )
    try:
        models.check_options(cfg.model.backbone, cfg.model.options, cfg.data.image_size)
    except ValueError as e:
        raise PreflightError(f"model.options: {e}") from None
    if cfg.data.dataset != "folder" and cfg.data.dataset not in ID_DATASETS:
        raise PreflightError(
            f"data.dataset={cfg.data.dataset!r} is not a known dataset; "
            f"valid datasets: folder (your own images), {', '.join(ID_DATASETS.names())}"
        )
    if not cfg.data.ood:
        raise PreflightError(
            "data.ood is empty: the gate compares FPR95 on OOD sets, so nothing could ever be "
            f"promoted; list at least one (e.g. {', '.join(OOD_DATASETS.names()[:3])})"
        )
    reserved = (*OOD_SUMMARIES, "threshold")  # ood/<name>/... names taken by the evaluation
    for source in cfg.data.ood:
        if source.name in reserved:
            raise PreflightError(
                f"data.ood: {source.name!r} names a summary over OOD sets "
                f"({', '.join(reserved)}); give the set another name"
            )
        if source.path is None and source.name not in OOD_DATASETS:
            raise PreflightError(
                f"data.ood: {source.name!r} is not a known OOD set; valid sets: "
                f"{', '.join(OOD_DATASETS.names())}, or {{name: <label>, path: <folder or .npz>}}"
            )
    for source in cfg.data.ood_val:
        if source.path is None and source.name not in OOD_DATASETS:
            raise PreflightError(
                f"data.ood_val: {source.name!r} is not a known OOD set; valid sets: "
                f"{', '.join(OOD_DATASETS.names())}, or {{name: <label>, path: <folder or .npz>}}"
            )
        if source.path is None and source.name == cfg.data.dataset:
            raise PreflightError(
                f"data.ood_val: {source.name!r} is the in-distribution dataset (data.dataset); it cannot be OOD"
            )
    for key, loss in cfg.losses.items():
        try:
            methods.check_options(loss.method, loss.options)
            if loss.score is not None and loss.score != AUTO_SCORE:
                scores.get(loss.score)
        except ValueError as e:
            raise PreflightError(f"losses.{key}: {e}") from None


def check_validation_ood(cfg: Config, project: Path) -> None:
    """Validation OOD sets given by path must not be, contain or lie inside a test OOD set's path:
    choosing a score on them would then tune on test images (``prepare`` also refuses any image the
    two share, pixel for pixel)."""
    tests = {s.name: Path(os.path.abspath(project / s.path)) for s in cfg.data.ood if s.path is not None}
    for source in cfg.data.ood_val:
        if source.path is None:
            continue
        path = Path(os.path.abspath(project / source.path))
        for name, test in tests.items():
            if path == test or test in path.parents or path in test.parents:
                raise PreflightError(
                    f"data.ood_val: {source.name!r} ({str(path)!r}) overlaps the test OOD set {name!r} "
                    f"({str(test)!r}); validation OOD data must be disjoint from every test OOD set, or "
                    "choosing a score on it would tune on the test: give images from another source"
                )
        check_ood_path(source.name, path, "data.ood_val")


def check_device(cfg: Config) -> None:
    if cfg.train.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise PreflightError(
            f"train.device: 'cuda', but this machine has no CUDA device (torch {torch.__version__} sees "
            "none); use 'auto' (the GPU where there is one, else the CPU) or 'cpu', or run on a GPU machine"
        )


def check_classes(cfg: Config) -> None:
    n = NUM_CLASSES.get(cfg.data.dataset)
    if n is None or cfg.data.classes is None:
        return
    bad = [c for c in cast("list[int]", cfg.data.classes) if c >= n]  # indices: not a folder dataset
    if bad:
        raise PreflightError(
            f"data.classes: {bad[0]} is out of range for data.dataset {cfg.data.dataset!r}, which has "
            f"{n} classes; use indices 0..{n - 1}"
        )


def _npz_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array ``x`` in an ``.npz``, from its header only."""
    try:
        header = npz_array_header(path)
        if header is None:
            with zipfile.ZipFile(path) as z:
                names = [n.removesuffix(".npy") for n in z.namelist()]
            raise PreflightError(
                f"data.ood: {str(path)!r} holds no array 'x' (found: {', '.join(names) or 'none'}); "
                "save the images with np.savez(path, x=images)"
            )
        shape, dtype = header
    except ValueError as e:
        if isinstance(e, PreflightError):
            raise
        raise PreflightError(
            f"data.ood: {str(path)!r}: the header of array 'x' cannot be read ({e}); "
            "save the images with np.savez(path, x=images)"
        ) from None
    except zipfile.BadZipFile:
        raise PreflightError(
            f"data.ood: {str(path)!r} is not an .npz archive (not a zip file); "
            "save the images with np.savez(path, x=images)"
        ) from None
    except OSError as e:
        raise PreflightError(f"data.ood: {str(path)!r} cannot be read ({e.strerror or e})") from None
    return shape, dtype


def check_ood_path(name: str, path: Path, key: str = "data.ood") -> None:
    if not path.exists():
        raise PreflightError(
            f"{key}: {name!r} points to {str(path)!r}, which does not exist; give a folder of images "
            "or an .npz file with a uint8 array 'x'"
        )
    if path.is_dir():
        try:
            images = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        except OSError as e:
            raise PreflightError(
                f"data.ood: folder {str(path)!r} cannot be read ({e.strerror or e})"
            ) from None
        if not images:
            raise PreflightError(
                f"data.ood: folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        return
    if path.suffix.lower() != ".npz":
        raise PreflightError(f"data.ood: {str(path)!r} must be a folder of images or an .npz file")
    shape, dtype = _npz_header(path)
    if dtype.hasobject:
        raise PreflightError(
            f"data.ood: {str(path)!r}: array 'x' holds Python objects (dtype object), which are never "
            "loaded; save uint8 images (N, H, W) or (N, H, W, C)"
        )
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise PreflightError(
            f"data.ood: {str(path)!r}: array 'x' is {dtype} of shape {shape}; expected uint8 images "
            "(N, H, W) or (N, H, W, C) with C 1 or 3"
        )
    if shape[0] == 0:
        raise PreflightError(f"data.ood: {str(path)!r}: array 'x' holds no images")
    too_large = ood_npz_too_large(path, shape, dtype)
    if too_large:
        raise PreflightError(f"{key}: {name!r} points to {too_large}")


def check_folder(cfg: Config, project: Path) -> None:
    """A folder dataset's layout: the folder, its class folders, none empty (no image is decoded)."""
    if cfg.data.dataset != "folder":
        return

    try:
        scan(cfg.data, project / cfg.data.root)
    except (OSError, ValueError) as e:
        raise PreflightError(str(e)) from None


def check_weights(cfg: Config, project: Path) -> None:
    """The file exists, holds tensors only and fits the backbone, key by key and shape by shape
    (the backbone is built on the meta device: no memory, no time). A file of another architecture
    used to fail in every training, after the data was prepared."""
    if cfg.model.weights is None:
        return
    path = project / cfg.model.weights
    if not path.is_file():
        raise PreflightError(
            f"model.weights: {str(path)!r} does not exist; give a local file written by "
            "torch.save(model.state_dict(), path) (nothing is downloaded)"
        )
    import torch

    shape = (3, cfg.data.image_size) if cfg.data.dataset == "folder" else IMAGE_SHAPES.get(cfg.data.dataset)
    try:
        backbone = None  # a dataset of unknown shape: only what can be checked without the data
        if shape is not None:
            with torch.device("meta"):
                backbone = create_backbone(
                    cfg.model.backbone, shape[0], cast(int, shape[1]), **cfg.model.options
                )
        fits(backbone, path)
    except WeightsError as e:
        raise PreflightError(str(e)) from None


def check_workdir(cfg: Config, project: Path) -> None:
    """The work directory is a directory this process can write, or can be created in one. A file
    there used to fail after the MLflow run was created; a read-only one after training, or with a
    changed param in a loss reported as failed while the run exited 0."""
    path = Path(os.path.abspath(project / cfg.workdir))  # absolute: the message names the real place
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    fix = "set workdir (in params.yaml, or --set workdir=DIR) to a directory this user can write"
    if existing == path and not path.is_dir():
        raise PreflightError(
            f"workdir: {str(path)!r} is a file, not a directory; move the file aside, or {fix}"
        )
    if not existing.is_dir():
        raise PreflightError(f"workdir: {str(path)!r} cannot be created: {str(existing)!r} is a file; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):  # mode bits, and EROFS for root too
        what = "is" if existing == path else f"would be created in {str(existing)!r}, which is"
        raise PreflightError(
            f"workdir: {str(path)!r} {what} not writable (its permissions, or a read-only file "
            f"system); make it writable, or {fix}"
        )


def check_dvc_project(project: Path, data_root: str = "data") -> None:
    """``project`` is inside a DVC project, as ``dvc`` looks for one: a ``.dvc`` directory in it or
    above it, up to the mount point. Only the pipeline flow needs one (it checks the data against
    ``<data_root>.dvc``); without it DVC's NotDvcRepoError surfaced as a traceback."""
    here = Path(project).resolve()
    while not (here / ".dvc").is_dir():
        if os.path.ismount(here) or here.parent == here:
            raise PreflightError(
                f"{str(Path(project).resolve())!r} is not a DVC project (no .dvc directory in it or above it, "
                f"up to {str(here)!r}); make it one with `dvc init` there (`dvc init --no-scm` outside git) "
                f"and `dvc add {data_root}`, or pass the project's directory as --root"
            )
        here = here.parent


def _check_checkpoints(cfg: Config, project: Path) -> None:

    try:
        check_checkpoints(cfg, project, NUM_CLASSES, IMAGE_SHAPES, CLASS_NAMES)
    except CheckpointError as e:
        raise PreflightError(str(e)) from None


def preflight(cfg: Config, training: bool = True, project: str | Path = ".") -> None:
    """Raise :class:`PreflightError` for the first problem found. ``training=False`` skips the device
    and the pretrained weights (a step that only reads results). Relative paths are taken from
    ``project`` (default: the working directory)."""
    project = Path(project)
    check_names(cfg)
    check_workdir(cfg, project)
    if training:
        check_device(cfg)
        check_weights(cfg, project)
    check_classes(cfg)
    check_folder(cfg, project)
    if training:
        _check_checkpoints(cfg, project)
    for source in cfg.data.ood:
        if source.path is not None:
            check_ood_path(source.name, Path(source.path))
    check_validation_ood(cfg, project)
