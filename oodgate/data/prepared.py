"""The prepared data's format (what the prepare step writes, every later step reads): ``id.pt``
(the splits and their statistics) and ``ood.pt`` (the OOD sets, their groups, the validation OOD
sets), each verified against the digests ``data.json`` recorded before it is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from oodgate.base.files import digest, file_digest, read_json, verified
from oodgate.data.bundle import DataBundle, ImageSet


def pack(s: ImageSet) -> dict[str, torch.Tensor]:
    return {"x": s.x, "y": s.y}


def _unpack(d: Mapping[str, torch.Tensor]) -> ImageSet:
    return ImageSet(x=d["x"], y=d["y"])


def load_prepared(prepared_dir: str | Path, with_ood: bool = True) -> DataBundle:
    prepared_dir = Path(prepared_dir)
    fix = "run the prepare step again (`python -m oodgate prepare` or `dvc repro prepare`)"
    if not (prepared_dir / "data.json").is_file():
        raise FileNotFoundError(f"prepared data not found in {str(prepared_dir)!r}; {fix}")
    summary = read_json(prepared_dir / "data.json")
    # Memory-mapped: the images are read from the file as they are used, so a prepared dataset larger
    # than memory trains (a small one ends up in the page cache, at the speed of memory).
    d = torch.load(
        verified(summary, prepared_dir, "id.pt", "prepared data", fix), weights_only=True, mmap=True
    )
    ood = (
        torch.load(
            verified(summary, prepared_dir, "ood.pt", "prepared data", fix), weights_only=True, mmap=True
        )
        if with_ood
        else {"names": [], "groups": {}, "sets": {}}
    )
    m = d["meta"]
    return DataBundle(
        train=_unpack(d["train"]),
        val=_unpack(d["val"]),
        test=_unpack(d["test"]),
        ood={k: _unpack(ood["sets"][k]) for k in ood["names"]},
        num_classes=m["num_classes"],
        in_channels=m["in_channels"],
        image_size=m["image_size"],
        mean=tuple(m["mean"]),
        std=tuple(m["std"]),
        class_names=list(m["class_names"]),
        ood_groups=dict(ood["groups"]),
        ood_val={k: _unpack(v) for k, v in ood.get("validation", {}).items()},
    )


def evaluation_images(prepared_dir: str | Path) -> str:
    """Which test and OOD images a run's metrics come from: the digest of the prepared ``id.pt`` and
    ``ood.pt``. Two runs with the same digest were evaluated on the same images, so their per-sample
    results can be compared (the registry's champion comparison)."""
    return digest([file_digest(Path(prepared_dir) / "id.pt"), file_digest(Path(prepared_dir) / "ood.pt")])
