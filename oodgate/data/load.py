"""``load_data``: from a ``DataConfig`` to the ``DataBundle`` every later stage consumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oodgate.config import DataConfig
from oodgate.data.bundle import DataBundle, ImageSet
from oodgate.data.id_sets import ID_DATASETS
from oodgate.data.ood import check_ood_sources, load_ood, ood_groups
from oodgate.data.splits import check_classes, select_classes, stratified_carve, subset


def channel_stats(x: np.ndarray | ImageSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NCHW images in ``[0, 1]`` units, 6 decimals.

    Computed exactly from a 256-bin histogram per channel with integer sums, so the result does not
    depend on summation order or thread count.
    """
    a = x.x.numpy() if isinstance(x, ImageSet) else x
    values = np.arange(256, dtype=np.int64)
    means, stds = [], []
    for c in range(a.shape[1]):
        counts = np.bincount(a[:, c].reshape(-1), minlength=256).astype(np.int64)
        n, s, sq = int(counts.sum()), int(counts @ values), int(counts @ (values * values))
        mean = s / (n * 255)
        var = (n * sq - s * s) / (n * n * 255 * 255)  # exact integer numerator, >= 0
        means.append(round(mean, 6))
        stds.append(round(float(np.sqrt(var)), 6))
    return tuple(means), tuple(stds)


def _carve(pool: ImageSet, fraction: float, rng: np.random.Generator, key: str) -> tuple[ImageSet, ImageSet]:
    kept, carved = stratified_carve(pool.y.numpy(), fraction, rng)
    if carved.size == 0 or kept.size == 0:
        raise ValueError(
            f"data.{key}={fraction} leaves an empty split from {len(pool)} images; "
            f"use a larger data.{key} or more data"
        )
    return subset(pool, kept), subset(pool, carved)


def load_data(cfg: DataConfig, root: str | Path | None = None) -> DataBundle:
    """Load the in-distribution splits and the OOD sets named in ``cfg``.

    The ID dataset's classes are filtered and relabelled by ``data.classes``. Datasets without an
    official test split get one carved with ``data.test_fraction``; validation is then carved from
    the training pool with ``data.val_fraction`` (both stratified per class, seeded by
    ``data.split_seed``). Each OOD set is conformed to the ID shape and kept whole: no step tunes
    anything on OOD data, so every OOD image is a test image.
    """
    root = Path(cfg.root if root is None else root)
    loader = ID_DATASETS.get(cfg.dataset)
    check_ood_sources(cfg)
    source = loader(cfg, root)
    num_all = len(source.class_names)
    if cfg.classes is not None:
        check_classes(cfg.classes, num_all, cfg.dataset)
    class_names = [source.class_names[c] for c in cfg.classes] if cfg.classes else list(source.class_names)
    pool = select_classes(source.train, cfg.classes, num_all, cfg.dataset)

    rng = np.random.default_rng(cfg.split_seed)
    if source.test is None:
        pool, test = _carve(pool, cfg.test_fraction, rng, "test_fraction")
    else:
        test = select_classes(source.test, cfg.classes, num_all, cfg.dataset)
    train, val = _carve(pool, cfg.val_fraction, rng, "val_fraction")

    _, channels, height, width = train.x.shape
    if height != width:
        raise ValueError(f"dataset {cfg.dataset!r} has non-square images ({height}x{width}); not supported")
    ood = {src.name: load_ood(src, cfg, root, channels, height) for src in cfg.ood}

    mean, std = channel_stats(train)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        ood=ood,
        num_classes=len(class_names),
        in_channels=int(channels),
        image_size=int(height),
        mean=mean,
        std=std,
        class_names=class_names,
        ood_groups=ood_groups(cfg),
    )
