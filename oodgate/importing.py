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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from oodgate.classifier import Classifier, ModelSpec, build_classifier

FORMATS = ("oodgate", "torchvision", "entropic", "logitnorm")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the declared architecture and method."""


# their backbone keys -> oodgate's (applied in order, first match wins)
Rule = tuple[str, str | Callable[[re.Match], str]]
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
for _name in ("wrn_40_2", "wrn_28_10", "wrn_16_8", "wrn_28_2"):
    _BACKBONES[("logitnorm", _name)] = _WRN

_HEAD_PREFIXES = ("classifier.", "fc.", "linear.")
_IGNORED = ("temperature", "validationset_available", "precomputed_thresholds")  # DisMax's extras
_LINEAR_METHODS = ("softmax", "logitnorm")


@dataclass(frozen=True)
class Imported:
    """An imported model and what was left out of the file."""

    model: Classifier
    ignored: tuple[str, ...]


def read_state(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor] | dict:
    """The file's contents with ``weights_only=True`` (tensors and plain containers only): a
    state dict, unwrapped from ``{"state_dict": ...}``/``{"model": ...}``/``{"net": ...}``, its
    ``module.`` prefixes (DataParallel) removed; or an oodgate checkpoint (with ``spec``) as is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{what}: {str(path)!r} does not exist; give the path of the file, relative to the project"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects refused, not a torch file, truncated
        raise CheckpointError(
            f"{what}: {str(path)!r} cannot be read as plain tensors ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it must be saved with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, dict) and "spec" in obj and "model" in obj:
        return obj  # oodgate's own checkpoint
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{what}: {str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _rename(key: str, rules: list[Rule]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


def _head_prefix(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> str:
    for prefix in _HEAD_PREFIXES:
        if any(f"{prefix}{n}" in state for n in names):
            return prefix
    raise CheckpointError(
        f"no classification head found: none of {', '.join(p + n for p in _HEAD_PREFIXES for n in names)} "
        f"is in the file (its last keys: {', '.join(list(state)[-4:])})"
    )


def _map_entropic(state: dict, spec: ModelSpec) -> tuple[dict, list[str]]:
    names = ("weights", "bias") if spec.method == "softmax" else ("prototypes", "distance_scale")
    prefix = _head_prefix(state, names)
    rules = _BACKBONES.get(("entropic", spec.backbone))
    if rules is None:
        raise CheckpointError(
            f"checkpoint.format 'entropic' maps the papers' CIFAR resnet34 and densenet_bc_100 backbones, "
            f"not model.backbone {spec.backbone!r}"
        )
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


def _map_logitnorm(state: dict, spec: ModelSpec) -> tuple[dict, list[str]]:
    rules = _BACKBONES.get(("logitnorm", spec.backbone))
    if rules is None:
        raise CheckpointError(
            f"checkpoint.format 'logitnorm' maps the LogitNorm code's WideResNet (wrn_40_2, wrn_28_10, ...), not "
            f"model.backbone {spec.backbone!r}"
        )
    out = {}
    for k, v in state.items():
        out[
            f"head.linear.{k.removeprefix('fc.')}" if k.startswith("fc.") else f"backbone.{_rename(k, rules)}"
        ] = v
    return out, []


def _map_torchvision(state: dict, model: Classifier) -> tuple[dict, list[str]]:
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


def _check_fit(mapped: dict, model: Classifier, source: str, fmt: str) -> None:
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
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    source: str = "checkpoint",
) -> Imported:
    """The model a checkpoint file holds, as an oodgate :class:`~oodgate.classifier.Classifier`
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
            f"checkpoint.format {fmt!r} holds a linear head, which is the head of the softmax and logitnorm "
            f"methods, not {spec.method!r}"
        )
    if mean is not None:
        spec = replace(spec, mean=tuple(mean), std=tuple(std))
    with torch.device("meta"):
        meta_model = Classifier(spec)
    if fmt == "entropic":
        mapped, ignored = _map_entropic(state, spec)
    elif fmt == "logitnorm":
        mapped, ignored = _map_logitnorm(state, spec)
    else:
        mapped, ignored = _map_torchvision(state, meta_model)
    _check_fit(mapped, meta_model, source, fmt)
    model = build_classifier(spec, 0)
    model.load_state_dict({**model.state_dict(), **mapped}, strict=True)
    return Imported(model.eval(), tuple(ignored))


def _import_oodgate(state: dict, spec: ModelSpec, source: str) -> Imported:
    saved = ModelSpec.from_dict(state["spec"])
    for key in (
        "backbone",
        "method",
        "num_classes",
        "in_channels",
        "image_size",
        "backbone_options",
        "method_options",
    ):
        if getattr(saved, key) != getattr(spec, key):
            raise CheckpointError(
                f"{source} holds a model with {key} {getattr(saved, key)!r}, but params.yaml declares "
                f"{getattr(spec, key)!r}; declare the checkpoint's architecture and method"
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
    cfg, project: Path, num_classes: dict[str, int], image_shapes: dict[str, tuple[int, int]]
) -> None:
    """Every checkpoint a loss imports exists, is plain tensors and fits the declared architecture,
    method and classes (the keys and shapes, on the meta device: no memory, no time): refused at
    config load, like a missing ``model.weights``, instead of once per seed after the data is
    prepared. ``num_classes`` and ``image_shapes``: the class count and the (channels, side) of each
    registered dataset."""
    from oodgate import methods

    for loss_id, loss in cfg.losses.items():
        c = loss.checkpoint
        if c is None:
            continue
        data = cfg.data
        if data.dataset == "folder":
            channels, side = 3, data.image_size
            classes = len(data.classes) if data.classes else None  # the folder's class count is read later
        else:
            channels, side = image_shapes.get(data.dataset, (3, 32))
            classes = len(data.classes) if data.classes else num_classes.get(data.dataset)
        for seed in cfg.seeds if c.per_seed else cfg.seeds[:1]:
            path = Path(checkpoint_for_seed(c.path, seed))
            path = path if path.is_absolute() else Path(project) / path
            source = f"losses.{loss_id}.checkpoint {str(path)!r}"
            state = read_state(path, source)
            if classes is None or c.format == "oodgate":
                continue  # the head's size is checked when the data is known, or comes with the file
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
            if "spec" in state:
                raise CheckpointError(f"{source} is an oodgate checkpoint: set checkpoint.format: oodgate")
            with torch.device("meta"):
                meta_model = Classifier(spec)
            if c.format in ("torchvision", "logitnorm") and spec.method not in _LINEAR_METHODS:
                raise CheckpointError(
                    f"{source}: checkpoint.format {c.format!r} holds a linear head, the head of the softmax and "
                    f"logitnorm methods, not {spec.method!r}"
                )
            mapper = {"entropic": _map_entropic, "logitnorm": _map_logitnorm}.get(c.format)
            mapped, _ = mapper(state, spec) if mapper else _map_torchvision(state, meta_model)
            _check_fit(mapped, meta_model, source, c.format)
