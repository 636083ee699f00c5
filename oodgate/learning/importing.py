"""Bring your own trained model: a checkpoint written elsewhere becomes an oodgate model.

A loss with ``checkpoint:`` in ``params.yaml`` is imported instead of trained; calibration,
evaluation, the gate, the registry and monitoring then treat it like any trained candidate (or as
the baseline). Formats (``checkpoint.format``):

``oodgate``
    a ``best.pt``/``calibrated.pt`` written by oodgate itself (its architecture comes with it).
``torchvision``
    a torchvision classifier's ``state_dict()`` for ``model.backbone: torchvision:<name>``: its last
    ``nn.Linear`` (``fc`` of a ResNet, ``classifier.1`` of an EfficientNet, ...) becomes the
    ``linear`` head of a ``softmax`` (or ``logitnorm``) loss.
``entropic``
    the layout of the IsoMax/IsoMax+/DisMax papers' public training code (the entropic
    out-of-distribution detection and distinction maximization repositories, and their
    robust-deep-learning library): the head under ``classifier.`` (``fc.`` or ``linear.`` on some
    backbones) with ``prototypes`` ``[C, F]``, ``distance_scale`` ``[1]`` (IsoMax+, DisMax), and for
    their SoftMax baseline ``weights`` ``[C, F]`` and ``bias``; on their CIFAR ``ResNet34``
    (``conv1``, ``bn1``, ``layerN.M.shortcut``) and ``DenseNet3`` (BC-100, ``block1.layer.0.bn1``,
    ``trans1``, ``bn1``) backbones, which are oodgate's ``resnet34`` and ``densenet_bc_100``.
``logitnorm``
    the layout of the LogitNorm paper's public code: a ``WideResNet`` (``block1.layer.0.bn1``,
    ``convShortcut``, ``bn1``; oodgate's ``wrn_*``, e.g. ``wrn_40_2``) with a plain ``fc`` linear head.

The heads' parameterisations are the same as oodgate's (``z_j = -||f - p_j||`` for IsoMax,
``-|s| ||f^ - p^_j||`` for IsoMax+, DisMax's ``-(d_j + mean_k d_k)`` with ``d = |s| ||f^ - p^||/sqrt 2``),
so the tensors are copied, not transformed. What is not oodgate's is ignored and listed: DisMax's
stored ``temperature`` (oodgate fits its own), ``validationset_available`` and
``precomputed_thresholds``. Every other key must map: a missing, unexpected or mis-shaped key fails
with the names and shapes. Files are read with ``torch.load(weights_only=True)``: nothing is
unpickled but tensors and plain containers.

The model normalises its inputs with ``checkpoint.mean``/``std`` when given (the constants the
checkpoint was trained with, e.g. the papers' CIFAR-10 mean (0.491, 0.482, 0.446), std (0.247, 0.243,
0.261)), else with the training split's, as a trained model does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from oodgate.data.folder import scan
from oodgate.learning import methods
from oodgate.learning.classifier import Classifier, ModelSpec, build_classifier
from oodgate.learning.models.torchvision_models import load_error

if TYPE_CHECKING:
    from oodgate.base.config import Config

FORMATS = ("oodgate", "torchvision", "entropic", "logitnorm")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the declared architecture and method."""


# their backbone keys -> oodgate's (applied in order, first match wins)
Rule = tuple[str, str | Callable[[re.Match[str]], str]]
_BACKBONES: dict[tuple[str, str], list[Rule]] = {
    ("entropic", "resnet34"): [
        (r"^conv1\.", "stem.0."),
        (r"^bn1\.", "stem.1."),
        (r"^(layer\d+\.\d+)\.shortcut\.", r"\1.downsample."),
    ],
    ("entropic", "densenet_bc_100"): [
        (r"^conv1\.", "features.conv0."),
        (
            r"^block(\d+)\.layer\.(\d+)\.(bn|conv)(\d)\.",
            lambda m: (
                f"features.denseblock{m[1]}.denselayer{int(m[2]) + 1}."
                f"{'norm' if m[3] == 'bn' else 'conv'}{m[4]}."
            ),
        ),
        (r"^trans(\d+)\.bn1\.", r"features.transition\1.norm."),
        (r"^trans(\d+)\.conv1\.", r"features.transition\1.conv."),
        (r"^bn1\.", "features.norm_final."),
    ],
}
_WRN: list[Rule] = [
    (r"^block(\d+)\.layer\.(\d+)\.convShortcut\.", r"block\1.\2.shortcut."),
    (r"^block(\d+)\.layer\.(\d+)\.", r"block\1.\2."),
    (r"^bn1\.", "bn."),
]
for _name in ("wrn_40_2", "wrn_28_10"):  # registered backbones only (oodgate.learning.models.names())
    _BACKBONES[("logitnorm", _name)] = _WRN

_HEAD_PREFIXES = ("classifier.", "fc.", "linear.")
_IGNORED = ("temperature", "validationset_available", "precomputed_thresholds")  # DisMax's extras
_LINEAR_METHODS = ("softmax", "logitnorm")
# What the papers' head modules hold in a state dict, which tells the method a file was trained with:
# their SoftMax baseline ``weights``, ``bias``; IsoMaxLossFirstPart ``prototypes``;
# IsoMaxPlusLossFirstPart ``prototypes``, ``distance_scale`` (its ``temperature`` is a plain float,
# never saved); DisMaxLossFirstPart the same and its ``temperature``, ``validationset_available`` and
# ``precomputed_thresholds`` parameters. So the four are told apart by their keys, IsoMax+ from DisMax
# too (the same prototypes and scale, another formula: an IsoMax+ file imported as DisMax, or the
# reverse, gave logits off by up to ~2.2). Where a file cannot tell: the linear head of the
# ``torchvision`` and ``logitnorm`` formats is the same for SoftMax (cross-entropy) and LogitNorm
# training; both compute ``W f + b`` at inference, so only the declared method's label and default
# score depend on it.
_ENTROPIC_HEADS = {
    "softmax": ("weights", "bias"),
    "isomax": ("prototypes",),
    "isomax_plus": ("prototypes", "distance_scale"),
    "dismax": ("prototypes", "distance_scale", *_IGNORED),
}
_ENTROPIC_NAMES = {"softmax": "SoftMax", "isomax": "IsoMax", "isomax_plus": "IsoMax+", "dismax": "DisMax"}


@dataclass(frozen=True)
class Imported:
    """An imported model and what was left out of the file."""

    model: Classifier
    ignored: tuple[str, ...]


def read_state(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor] | dict[str, Any]:
    """The file's contents with ``weights_only=True`` (tensors and plain containers only): a
    state dict, unwrapped from ``{"state_dict": ...}``/``{"model": ...}``/``{"net": ...}``, its
    ``module.`` prefixes (DataParallel) removed; or an oodgate checkpoint (with ``spec``) as is."""
    path = Path(path)
    where = what if repr(str(path)) in what else f"{what}: {str(path)!r}"  # the path named once
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist; give the path of the file, relative to the project")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects refused, not a torch file, truncated, empty
        raise CheckpointError(f"{where} {load_error(path, e)}") from None
    if isinstance(obj, dict) and "spec" in obj and "model" in obj:
        return obj  # oodgate's own checkpoint
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _rename(key: str, rules: list[Rule]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


def _head_prefix(state: dict[str, torch.Tensor], names: tuple[str, ...], source: str = "checkpoint") -> str:
    for prefix in _HEAD_PREFIXES:
        if any(f"{prefix}{n}" in state for n in names):
            return prefix
    raise CheckpointError(
        f"{source}: no classification head found: none of "
        f"{', '.join(p + n for p in _HEAD_PREFIXES for n in names)} is in the file (its last keys: "
        f"{', '.join(list(state)[-4:])})"
    )


def entropic_head(state: dict[str, torch.Tensor], method: str, source: str = "checkpoint") -> str:
    """The prefix of the head of a file in the papers' layout, once its parameters are those of
    ``method``'s head (:data:`_ENTROPIC_HEADS`); refused naming both methods when they are another's."""
    prefix = _head_prefix(state, ("weights", "prototypes"), source)
    names = {k.removeprefix(prefix) for k in state if k.startswith(prefix)}
    if "weights" in names:
        found = "softmax"
    elif names & set(_IGNORED):
        found = "dismax"
    elif "distance_scale" in names:
        found = "isomax_plus"
    else:
        found = "isomax"
    if found != method and method in _ENTROPIC_HEADS:
        held = ", ".join(prefix + n for n in _ENTROPIC_HEADS[found] if n in names)
        want = ", ".join(prefix + n for n in _ENTROPIC_HEADS[method])
        raise CheckpointError(
            f"{source} holds the head of {_ENTROPIC_NAMES[found]} ({held}), not that of "
            f"{_ENTROPIC_NAMES[method]}, the loss's method (method: {method}, whose file holds {want}); set "
            f"the loss's method: {found}, or give a checkpoint trained with {method} (their logits differ)"
        )
    return prefix


def _map_entropic(
    state: dict[str, Any], spec: ModelSpec, source: str = "checkpoint"
) -> tuple[dict[str, Any], list[str]]:
    prefix = entropic_head(state, spec.method, source)
    rules = _BACKBONES.get(("entropic", spec.backbone))
    if rules is None:
        raise _unmapped("entropic", "the papers' CIFAR backbones", spec.backbone, source)
    out, ignored = {}, []
    for k, v in state.items():
        if k.startswith(prefix):
            name = k.removeprefix(prefix)
            if name in _IGNORED:
                ignored.append(k)
            elif spec.method == "softmax" and name in ("weights", "bias"):
                out[f"head.linear.{'weight' if name == 'weights' else 'bias'}"] = v
            else:
                out[f"head.{name}"] = v
        else:
            out[f"backbone.{_rename(k, rules)}"] = v
    return out, ignored


def _map_logitnorm(
    state: dict[str, Any], spec: ModelSpec, source: str = "checkpoint"
) -> tuple[dict[str, Any], list[str]]:
    rules = _BACKBONES.get(("logitnorm", spec.backbone))
    if rules is None:
        raise _unmapped("logitnorm", "the LogitNorm code's WideResNets", spec.backbone, source)
    out = {}
    for k, v in state.items():
        out[
            f"head.linear.{k.removeprefix('fc.')}" if k.startswith("fc.") else f"backbone.{_rename(k, rules)}"
        ] = v
    return out, []


def _unmapped(fmt: str, what: str, backbone: str, source: str) -> CheckpointError:
    """A format's file for a backbone it has no mapping of: the backbones it maps, and the way on."""
    mapped = sorted(b for f, b in _BACKBONES if f == fmt)
    return CheckpointError(
        f"{source}: checkpoint.format {fmt!r} maps {what} ({', '.join(mapped)}), not model.backbone "
        f"{backbone!r}; set model.backbone to one of them"
    )


def _map_torchvision(state: dict[str, Any], model: Classifier) -> tuple[dict[str, Any], list[str]]:
    backbone = model.backbone
    classifier = getattr(backbone, "classifier", None)
    if classifier is None:
        raise CheckpointError(
            f"checkpoint.format 'torchvision' needs model.backbone: torchvision:<name>, got {model.spec.backbone!r}"
        )
    prefix = classifier + "."
    out = {}
    for k, v in state.items():
        out[f"head.linear.{k.removeprefix(prefix)}" if k.startswith(prefix) else f"backbone.net.{k}"] = v
    return out, []


def _listed(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _check_fit(mapped: dict[str, Any], model: Classifier, source: str, fmt: str) -> None:
    own = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std", "head.temperature")}
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked") or k in mapped}
    missing = [k for k in own if k not in mapped]
    unexpected = [k for k in mapped if k not in own and not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (file vs model: {_listed(shapes)})")
        s = model.spec
        raise CheckpointError(
            f"{source} does not fit {s.backbone} with a {s.method} head for {s.num_classes} classes in format "
            f"{fmt!r} (keys as oodgate names them): {'; '.join(parts)}; check model.backbone, model.options, "
            "the loss's method, data.classes and checkpoint.format"
        )


def import_model(
    path: str | Path,
    fmt: str,
    spec: ModelSpec,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    source: str = "checkpoint",
) -> Imported:
    """The model a checkpoint file holds, as an oodgate :class:`~oodgate.learning.classifier.Classifier`
    of ``spec`` (the declared architecture and method; ``mean``/``std``: the input normalisation the
    checkpoint was trained with, default ``spec``'s). Raises :class:`CheckpointError` naming what does
    not fit."""
    if fmt not in FORMATS:
        raise CheckpointError(f"checkpoint.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = read_state(path, source)
    if fmt == "oodgate":
        return _import_oodgate(state, spec, source)
    if "spec" in state:
        raise CheckpointError(f"{source} is an oodgate checkpoint: set checkpoint.format: oodgate")
    if fmt in ("torchvision", "logitnorm") and spec.method not in _LINEAR_METHODS:
        raise CheckpointError(
            f"{source}: checkpoint.format {fmt!r} holds a linear head, which is the head of the softmax and "
            f"logitnorm methods, not {spec.method!r}"
        )
    if mean is not None:
        spec = replace(spec, mean=tuple(mean), std=tuple(cast("Sequence[float]", std)))  # given together
    with torch.device("meta"):
        meta_model = Classifier(spec)
    if fmt == "entropic":
        mapped, ignored = _map_entropic(state, spec, source)
    elif fmt == "logitnorm":
        mapped, ignored = _map_logitnorm(state, spec, source)
    else:
        mapped, ignored = _map_torchvision(state, meta_model)
    _check_fit(mapped, meta_model, source, fmt)
    model = build_classifier(spec, 0)
    model.load_state_dict({**model.state_dict(), **mapped}, strict=True)
    return Imported(model.eval(), tuple(ignored))


def saved_spec(state: dict[str, Any], source: str) -> ModelSpec:
    """The :class:`ModelSpec` an oodgate checkpoint holds (read from the file, nothing built)."""
    if "spec" not in state:
        raise CheckpointError(
            f"{source} is not an oodgate checkpoint (it holds no model spec, only tensors): set "
            "checkpoint.format to the layout it has (torchvision, entropic or logitnorm)"
        )
    try:
        return ModelSpec.from_dict(state["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{source} holds a model spec oodgate cannot read ({type(e).__name__}: {e}); give a best.pt "
            "or calibrated.pt written by oodgate"
        ) from None


# what the config calls each field of a saved spec, and how to make them agree
_SPEC_KEYS = {
    "method": ("the loss's method", "declare method: {saved} for this loss"),
    "num_classes": ("the data's class count", "select the classes it was trained on (data.classes)"),
    "class_names": (
        "the data's classes",
        "select the classes it was trained on, in its order (data.classes)",
    ),
    "in_channels": ("the data's image channels", "use data of {saved}-channel images (data.dataset)"),
    "image_size": (
        "the data's image size",
        "use data of {saved}x{saved} images (data.dataset, or data.image_size for a folder)",
    ),
    "backbone": ("model.backbone", "declare model.backbone: {saved}"),
    "backbone_options": ("model.options", "declare model.options: {saved}"),
    "method_options": ("the loss's options", "declare the loss's options: {saved}"),
}


def compare_spec(saved: ModelSpec, expected: dict[str, object], source: str, where: dict[str, str]) -> None:
    """Refuse an oodgate checkpoint whose spec differs from what the config gives (``expected``:
    spec field -> value, only the fields known; ``where``: a field -> the config key it comes from)."""
    for key, (what, fix) in _SPEC_KEYS.items():
        if key not in expected:
            continue
        have, want = getattr(saved, key), expected[key]
        if key == "class_names" and (not have or not want):
            continue  # not recorded, or not known before the data is prepared
        if isinstance(have, tuple):
            have, want = list(have), list(cast("Iterable[object]", want))
        if have != want:
            raise CheckpointError(
                f"{source} holds a model with {key} {have!r}, but {what} is {want!r} "
                f"({where.get(key, 'params.yaml')}); {fix.format(saved=have)}, or give a checkpoint that "
                "fits the config"
            )


def _import_oodgate(state: dict[str, Any], spec: ModelSpec, source: str) -> Imported:
    saved = saved_spec(state, source)
    keys = ("method", "num_classes", "class_names", "in_channels", "image_size", "backbone")
    compare_spec(
        saved,
        {k: getattr(spec, k) for k in (*keys, "backbone_options", "method_options")},
        source,
        {"class_names": "the prepared data", "num_classes": "the prepared data"},
    )
    model = build_classifier(replace(saved, score=spec.score, class_names=spec.class_names), 0)
    weights = dict(state["model"])
    weights["head.temperature"] = torch.ones_like(model.head.temperature)  # oodgate fits its own
    model.load_state_dict(weights, strict=True)
    return Imported(model.eval(), ())


def checkpoint_for_seed(path: str, seed: int) -> str:
    """``path`` with ``{seed}`` replaced (one checkpoint per seed), or ``path`` itself (one for all)."""
    return path.replace("{seed}", str(seed))


__all__ = ["FORMATS", "CheckpointError", "Imported", "checkpoint_for_seed", "import_model", "read_state"]


# ---------------------------------------------------------------- checked at config load
def check_checkpoints(
    cfg: Config,
    project: Path,
    num_classes: dict[str, int],
    image_shapes: dict[str, tuple[int, int]],
    class_names: dict[str, list[str]] | None = None,
) -> None:
    """Every checkpoint a loss imports exists, is plain tensors and fits the declared architecture,
    method and classes (the keys and shapes, on the meta device: no memory, no time): refused at
    config load, like a missing ``model.weights``, instead of once per seed after the data is
    prepared. ``num_classes`` and ``image_shapes``: the class count and the (channels, side) of each
    registered dataset; ``class_names``: the names of those whose names are known without loading
    them (an oodgate checkpoint's class names are checked against them)."""

    if all(loss.checkpoint is None for loss in cfg.losses.values()):
        return
    data = cfg.data
    names: list[str] = []  # the class names, where known before the data is prepared (folders)
    if data.dataset == "folder":
        shape: tuple[int, int] | None = (3, cast(int, data.image_size))  # a folder has one
        names = _folder_classes(cfg, Path(project))
        classes = len(names) or (len(data.classes) if data.classes else None)
        where_classes = "data.classes" if data.classes else f"the class folders under data.root {data.root!r}"
        where_shape = f"RGB at data.image_size {data.image_size}"
    else:
        shape = image_shapes.get(data.dataset)
        classes = len(data.classes) if data.classes else num_classes.get(data.dataset)
        where_classes = "data.classes" if data.classes else f"data.dataset {data.dataset!r}"
        known = (class_names or {}).get(data.dataset, [])
        if known and all(c < len(known) for c in cast("list[int]", data.classes or [])):
            names = [known[c] for c in cast("list[int]", data.classes)] if data.classes else list(known)
        where_shape = f"the images of data.dataset {data.dataset!r}"
    channels, side = shape or (3, 32)
    for loss_id, loss in cfg.losses.items():
        c = loss.checkpoint
        if c is None:
            continue
        for seed in cfg.seeds if c.per_seed else cfg.seeds[:1]:
            path = Path(checkpoint_for_seed(c.path, seed))
            path = path if path.is_absolute() else Path(project) / path
            source = f"losses.{loss_id}.checkpoint {str(path)!r}"
            state = read_state(path, source)
            if c.format == "oodgate":  # its spec, read from the file (nothing built), against the config's
                expected: dict[str, object] = {
                    "method": loss.method,
                    "backbone": cfg.model.backbone,
                    "backbone_options": dict(cfg.model.options),
                    "method_options": dict(loss.options),
                }
                if classes is not None:
                    expected["num_classes"] = classes
                if names:
                    expected["class_names"] = tuple(names)
                if shape is not None:
                    expected["in_channels"], expected["image_size"] = shape
                where = {
                    "method": f"losses.{loss_id}.method",
                    "method_options": f"losses.{loss_id}.options",
                    "num_classes": where_classes,
                    "class_names": where_classes,
                    "in_channels": where_shape,
                    "image_size": where_shape,
                }
                compare_spec(saved_spec(state, source), expected, source, where)
                continue
            if "spec" in state:
                raise CheckpointError(f"{source} is an oodgate checkpoint: set checkpoint.format: oodgate")
            if c.format == "entropic":
                entropic_head(state, loss.method, source)  # the head's method, known without the data
            if classes is None:
                continue  # the head's size is checked when the data is known
            spec = ModelSpec(
                backbone=cfg.model.backbone,
                method=loss.method,
                num_classes=classes,
                in_channels=channels,
                image_size=side,
                mean=tuple(c.mean or [0.5] * channels),
                std=tuple(c.std or [0.25] * channels),
                score=methods.METHODS.get(loss.method).default_score,
                backbone_options=dict(cfg.model.options),
                method_options=dict(loss.options),
            )
            with torch.device("meta"):
                meta_model = Classifier(spec)
            if c.format in ("torchvision", "logitnorm") and spec.method not in _LINEAR_METHODS:
                raise CheckpointError(
                    f"{source}: checkpoint.format {c.format!r} holds a linear head, the head of the softmax and "
                    f"logitnorm methods, not {spec.method!r}"
                )
            mapper = {"entropic": _map_entropic, "logitnorm": _map_logitnorm}.get(c.format)
            mapped, _ = mapper(state, spec, source) if mapper else _map_torchvision(state, meta_model)
            _check_fit(mapped, meta_model, source, c.format)


def _folder_classes(cfg: Config, project: Path) -> list[str]:
    """A folder dataset's selected class names, from its class folders (no image is decoded); empty
    when the folder cannot be listed (preflight's folder check says why)."""

    try:
        return list(scan(cfg.data, project / cfg.data.root).class_names)
    except (OSError, ValueError):
        return []
