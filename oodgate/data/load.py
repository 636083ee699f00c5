"""``load_data``: from a ``DataConfig`` to the ``DataBundle`` every later stage consumes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import cast

import numpy as np
import torch

from oodgate.base.config import DataConfig
from oodgate.data import folder
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
    chunk = max(1, (64 << 20) // max(1, a[0, 0].size))  # 64 MiB of one channel at a time (memory maps)
    for c in range(a.shape[1]):
        counts = np.zeros(256, dtype=np.int64)
        for i in range(0, a.shape[0], chunk):
            counts += np.bincount(np.asarray(a[i : i + chunk, c]).reshape(-1), minlength=256)
        n, s, sq = int(counts.sum()), int(counts @ values), int(counts @ (values * values))
        mean = s / (n * 255)
        var = (n * sq - s * s) / (n * n * 255 * 255)  # exact integer numerator, >= 0
        means.append(round(mean, 6))
        stds.append(round(float(np.sqrt(var)), 6))
    return tuple(means), tuple(stds)


def _carve(pool: ImageSet, fraction: float, rng: np.random.Generator, key: str) -> tuple[ImageSet, ImageSet]:
    kept, carved = _carve_labels(pool.y.numpy(), fraction, rng, key)
    return subset(pool, kept), subset(pool, carved)


def load_data(cfg: DataConfig, root: str | Path | None = None, scratch: Path | None = None) -> DataBundle:
    """Load the in-distribution splits and the OOD sets named in ``cfg``.

    The ID dataset's classes are filtered and relabelled by ``data.classes``. Datasets without an
    official test split get one carved with ``data.test_fraction``; validation is then carved from
    the training pool with ``data.val_fraction`` (both stratified per class, seeded by
    ``data.split_seed``). Each OOD set is conformed to the ID shape and kept whole: no step tunes
    anything on OOD data, so every OOD image is a test image.
    """
    root = Path(cfg.root if root is None else root)
    check_ood_sources(cfg)
    if cfg.dataset == "folder":
        return load_folder(cfg, root, scratch)
    loader = ID_DATASETS.get(cfg.dataset)
    source = loader(cfg, root)
    num_all = len(source.class_names)
    if cfg.classes is not None:
        check_classes(cast("list[int]", cfg.classes), num_all, cfg.dataset)
    class_names = (
        [source.class_names[c] for c in cast("list[int]", cfg.classes)]
        if cfg.classes
        else list(source.class_names)
    )
    pool = select_classes(source.train, cast("list[int] | None", cfg.classes), num_all, cfg.dataset)

    rng = np.random.default_rng(cfg.split_seed)
    if source.test is None:
        pool, test = _carve(pool, cfg.test_fraction, rng, "test_fraction")
    else:
        test = select_classes(source.test, cast("list[int] | None", cfg.classes), num_all, cfg.dataset)
    train, val = _carve(pool, cfg.val_fraction, rng, "val_fraction")

    _, channels, height, width = train.x.shape
    if height != width:
        raise ValueError(f"dataset {cfg.dataset!r} has non-square images ({height}x{width}); not supported")
    ood = {src.name: load_ood(src, cfg, root, channels, height) for src in cfg.ood}
    ood_val = {src.name: load_ood(src, cfg, root, channels, height) for src in cfg.ood_val}
    check_disjoint(ood, ood_val)

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
        ood_val=ood_val,
    )


def check_disjoint(ood: dict[str, ImageSet], ood_val: dict[str, ImageSet]) -> None:
    """Refuse a validation OOD set that shares an image (the same pixels) with a test OOD set:
    choosing a score on it would tune on the test."""
    if not ood_val:
        return
    seen: dict[bytes, str] = {}
    for name, s in ood.items():
        for img in s.x.numpy():
            seen.setdefault(hashlib.sha1(img.tobytes()).digest(), name)
    for name, s in ood_val.items():
        shared: dict[str, int] = {}
        for img in s.x.numpy():
            test = seen.get(hashlib.sha1(img.tobytes()).digest())
            if test is not None:
                shared[test] = shared.get(test, 0) + 1
        if shared:
            test, count = max(shared.items(), key=lambda kv: kv[1])
            raise ValueError(
                f"data.ood_val: {name!r} shares {count} images (the same pixels) with the test OOD set {test!r}; "
                "validation OOD data must be disjoint from every test OOD set, or choosing a score on it "
                "would tune on the test: give images from another source"
            )


def _carve_labels(
    labels: np.ndarray, fraction: float, rng: np.random.Generator, key: str
) -> tuple[np.ndarray, np.ndarray]:
    kept, carved = stratified_carve(labels, fraction, rng)
    if carved.size == 0 or kept.size == 0:
        raise ValueError(
            f"data.{key}={fraction} leaves an empty split from {labels.size} images; "
            f"use a larger data.{key} or more images"
        )
    return kept, carved


def load_folder(cfg: DataConfig, root: Path, scratch: Path | None = None) -> DataBundle:
    """A folder dataset (``oodgate.data.folder``): the splits are drawn on the file lists as for the
    other datasets (test carved first when there is no ``test/`` folder, then validation from the
    training pool), then each split is decoded once, into ``scratch`` when given."""

    found = folder.scan(cfg, root)
    rng = np.random.default_rng(cfg.split_seed)
    lists: dict[str, tuple[list[Path], np.ndarray]] = {}
    pool_paths, pool_labels = found.splits.get("all") or found.splits["train"]
    if "test" in found.splits:
        lists["test"] = found.splits["test"]
    else:
        kept, carved = _carve_labels(pool_labels, cfg.test_fraction, rng, "test_fraction")
        lists["test"] = ([pool_paths[i] for i in carved], pool_labels[carved])
        pool_paths, pool_labels = [pool_paths[i] for i in kept], pool_labels[kept]
    if "val" in found.splits:
        lists["val"] = found.splits["val"]
        lists["train"] = (pool_paths, pool_labels)
    else:
        kept, carved = _carve_labels(pool_labels, cfg.val_fraction, rng, "val_fraction")
        lists["val"] = ([pool_paths[i] for i in carved], pool_labels[carved])
        lists["train"] = ([pool_paths[i] for i in kept], pool_labels[kept])

    size, bad, total = int(cast(int, cfg.image_size)), [], 0
    sets = {}
    for split in ("train", "val", "test"):
        paths, labels = lists[split]
        x, kept, skipped = folder.decode_files(paths, size, workers=cfg.workers, scratch=scratch, name=split)
        bad += skipped
        total += len(paths)
        sets[split] = ImageSet(folder.as_tensor(x), torch.from_numpy(labels[kept]))
    folder.report_bad(bad, total, found.base, cfg.on_bad_image)

    ood: dict[str, ImageSet] = {}
    for src in cfg.ood:
        p = Path(src.path) if src.path is not None else None
        if p is not None and p.is_dir():
            files = folder.image_files(p)
            if not files:
                raise ValueError(f"data.ood: folder {str(p)!r} holds no images")
            x, _, skipped = folder.decode_files(
                files, size, workers=cfg.workers, scratch=scratch, name=f"ood-{len(ood)}"
            )
            folder.report_bad(skipped, len(files), p, cfg.on_bad_image)
            ood[src.name] = ImageSet(folder.as_tensor(x), torch.full((x.shape[0],), -1, dtype=torch.int64))
        else:
            ood[src.name] = load_ood(src, cfg, root, 3, size)
    ood_val: dict[str, ImageSet] = {}
    for src in cfg.ood_val:
        p = Path(src.path) if src.path is not None else None
        if p is not None and p.is_dir():
            files = folder.image_files(p)
            if not files:
                raise ValueError(f"data.ood_val: folder {str(p)!r} holds no images")
            x, _, skipped = folder.decode_files(
                files, size, workers=cfg.workers, scratch=scratch, name=f"ood-val-{len(ood_val)}"
            )
            folder.report_bad(skipped, len(files), p, cfg.on_bad_image)
            ood_val[src.name] = ImageSet(
                folder.as_tensor(x), torch.full((x.shape[0],), -1, dtype=torch.int64)
            )
        else:
            ood_val[src.name] = load_ood(src, cfg, root, 3, size)
    check_disjoint(ood, ood_val)
    mean, std = channel_stats(sets["train"])
    return DataBundle(
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        ood=ood,
        num_classes=len(found.class_names),
        in_channels=3,
        image_size=size,
        mean=mean,
        std=std,
        class_names=list(found.class_names),
        ood_groups=ood_groups(cfg),
        ood_val=ood_val,
    )
