"""Prepare: load the configured datasets once and save their splits as uint8 tensors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oodgate.base.config import Config
from oodgate.base.files import output_digests, torch_save, write_json
from oodgate.data.load import load_data
from oodgate.data.prepared import pack
from oodgate.running.steps.inputs import prepare_inputs
from oodgate.running.steps.reuse import exclusive

if TYPE_CHECKING:
    from oodgate.data.bundle import DataBundle


def prepare(cfg: Config, out_dir: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """``id.pt`` (train/val/test and the normalisation stats), ``ood.pt`` (the whole OOD sets and their groups,
    and the validation OOD sets) and
    ``data.json`` (the sizes, the digests every later read verifies, and the inputs record the data
    was prepared from: :func:`~oodgate.running.steps.inputs.prepare_inputs`, deterministic, so that a re-run
    writes the same bytes) in ``out_dir``; returns ``data.json``'s content."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Folder images are decoded into memory maps here, never held whole in memory; removed once saved.
    # Another run preparing the same directory waits: its start would remove this one's scratch.
    scratch = out_dir / ".scratch"
    with exclusive(out_dir):
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            return _save(load_data(cfg.data, root, scratch=scratch), out_dir, prepare_inputs(cfg))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _save(bundle: DataBundle, out_dir: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "num_classes": bundle.num_classes,
        "in_channels": bundle.in_channels,
        "image_size": bundle.image_size,
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "class_names": list(bundle.class_names),
    }
    # atomic: a failed write (a full disk) keeps the previous file whole and leaves no temporary one
    torch_save(
        {"meta": meta, "train": pack(bundle.train), "val": pack(bundle.val), "test": pack(bundle.test)},
        out_dir / "id.pt",
    )
    torch_save(
        {
            "names": list(bundle.ood),
            "groups": dict(bundle.ood_groups),
            "sets": {k: pack(v) for k, v in bundle.ood.items()},
            # the validation OOD sets, disjoint from the test ones: what a score is chosen on
            "validation": {k: pack(v) for k, v in bundle.ood_val.items()},
        },
        out_dir / "ood.pt",
    )
    sizes = {"train": len(bundle.train.y), "val": len(bundle.val.y), "test": len(bundle.test.y)}
    sizes.update({f"ood/{k}": len(v.y) for k, v in bundle.ood.items()})
    sizes.update({f"ood_val/{k}": len(v.y) for k, v in bundle.ood_val.items()})
    summary = {**meta, "sizes": sizes, "outputs": output_digests(out_dir, ("id.pt", "ood.pt"))}
    # what the data was prepared from (no paths, no times): the core CLI refuses stale prepared data
    summary["inputs"] = inputs
    write_json(out_dir / "data.json", summary)
    return summary
