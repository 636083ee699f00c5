"""Any torchvision classification model as a backbone: ``model.backbone: torchvision:<name>``.

``torchvision.models.get_model(name, weights=None, **model.options)`` builds the network (nothing is
downloaded), and its classification layer -- the last ``nn.Linear`` it holds (``fc`` of a ResNet,
``classifier[-1]`` of EfficientNet and ConvNeXt, ``heads.head`` of a ViT) -- is replaced by the
identity, so the network returns the features that layer read; the loss method attaches its own head.
Single-channel images are repeated to the three channels these networks take. Convolutional models
with global pooling accept any input size (32 and up); a ViT needs ``options: {image_size: ...}``.

:func:`load_weights` loads a local state dict into a backbone (``model.weights``): the file
torchvision's ``model.state_dict()`` writes, with or without its classification layer.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

PREFIX = "torchvision:"


def is_torchvision(name: str) -> bool:
    return name.startswith(PREFIX)


@cache
def available() -> tuple[str, ...]:
    """torchvision's classification models (``resnet18``, ``efficientnet_b0``, ``convnext_tiny``, ...)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _classifier_name(net: nn.Module) -> str | None:
    """The qualified name of the network's last ``nn.Linear`` (its classification layer)."""
    last = None
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


def _replace(net: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, new)


class TorchvisionBackbone(nn.Module):
    """A torchvision classification network without its classification layer."""

    def __init__(self, arch: str, in_channels: int, options: dict[str, Any]) -> None:
        super().__init__()
        import torchvision

        if arch not in available():
            raise ValueError(
                f"torchvision has no classification model {arch!r}; e.g. resnet18, resnet50, "
                f"efficientnet_b0, convnext_tiny (all: torchvision.models.list_models(module=torchvision.models))"
            )
        if in_channels not in (1, 3):
            raise ValueError(f"torchvision backbones take 1- or 3-channel images, got {in_channels} channels")
        try:
            net = torchvision.models.get_model(arch, weights=None, **options)
        except TypeError as e:
            raise ValueError(
                f"option(s) {', '.join(map(repr, options))} rejected by torchvision's {arch}: {e}"
            ) from None
        head = _classifier_name(net)
        if head is None:
            raise ValueError(
                f"torchvision's {arch} has no nn.Linear classification layer to remove; choose another model"
            )
        linear = net.get_submodule(head)
        _replace(net, head, nn.Identity())
        self.net = net
        self.arch = arch
        self.classifier = head  # its weights are dropped from pretrained files
        self.repeat = in_channels == 1
        self.out_features = int(linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat:
            x = x.expand(-1, 3, -1, -1)
        out = self.net(x)
        if isinstance(out, tuple):  # GoogLeNet/Inception in training mode: (logits, aux...)
            out = out[0]
        return cast(torch.Tensor, out)


def check(arch: str, options: dict[str, Any], image_size: int | None = None) -> None:
    """Build the network on the meta device (no memory, no time) and, given ``image_size``, run a
    forward pass of that size; raises ``ValueError`` naming what is wrong."""
    with torch.device("meta"):
        net = TorchvisionBackbone(arch, 3, options)
        if image_size is not None:
            try:
                net.eval()(torch.empty(1, 3, image_size, image_size))
            except Exception as e:  # shape errors surface as RuntimeError, AssertionError, ...
                raise ValueError(
                    f"torchvision's {arch} does not take {image_size}x{image_size} images ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); choose another data.image_size or model"
                ) from None


# ---------------------------------------------------------------- pretrained weights
class WeightsError(ValueError):
    """``model.weights`` is missing, unreadable or does not fit the backbone."""


def _pickled_global(path: Path, error: Exception) -> str | None:
    """The class or function a whole file pickles, which ``weights_only`` refused to load; None when
    the error is no such refusal, or the file ends inside its pickle (a legacy, non-zip file cut
    short makes the unpickler read a cut name, ``torch._utils._reb``, as a global)."""
    import pickle
    import pickletools
    import re
    import zipfile

    # torch's two wordings: a global outside its allow-list, and one from a module it blocks (os,
    # posix, subprocess, ...: what a payload that runs a command pickles)
    m = re.search(
        r"Unsupported global: GLOBAL (\S+) was not an allowed global"
        r"|unsupported GLOBAL (\S+) whose module \S+ is blocked",
        str(error),
    )
    if not isinstance(error, pickle.UnpicklingError) or m is None:
        return None
    name = m[1] or m[2]
    if zipfile.is_zipfile(path):
        return name  # torch.save's zip archive: whole (a cut one fails before anything is unpickled)
    try:  # the legacy format: pickles one after another; scanned, never run
        with path.open("rb") as f:
            size = path.stat().st_size
            for _ in range(4):  # magic number, protocol, system info, the object
                for _op in pickletools.genops(f):
                    pass
                if f.tell() >= size:
                    break
    except Exception:  # cut inside a pickle: truncated, not an object
        return None
    return name


def load_error(path: Path, error: Exception, verb: str = "read") -> str:
    """Why ``torch.load(path, weights_only=True)`` failed and what to do, as the end of a one-line
    message that begins with the key and the path: the file is empty; it holds pickled objects
    (never loaded: PyTorch's own advice to load it with ``weights_only=False`` is not repeated,
    since that would run whatever the pickle holds); or it is truncated or not a torch.save file."""
    import re
    import zipfile

    try:  # the file itself cannot be read (permissions, a directory, an I/O error)
        size = path.stat().st_size
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        return f"cannot be {verb} ({e.strerror or e})"
    save = "save the model with torch.save(model.state_dict(), path)"
    if size == 0:
        return f"is empty (0 bytes): the copy or the save did not finish; copy the file again, or {save}"
    # from here on the bytes are at fault, whatever torch raised (a cut zip archive: RuntimeError, or
    # OSError "Invalid argument"; a cut pickle stream: EOFError, UnpicklingError, struct.error, ...)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    detail = found[1] if found else (text.strip().splitlines() or [""])[0].split(". ")[0]
    name = _pickled_global(path, error)
    if name is not None or (found and zipfile.is_zipfile(path)):  # a whole file, refused unread
        what = f"a pickled {name} object" if name else f"pickled content other than tensors: {detail[:120]}"
        return (
            f"cannot be {verb} as plain tensors (UnpicklingError: it holds {what}); pickled objects are "
            "never loaded, only tensors: save the weights alone, with torch.save(model.state_dict(), path)"
        )
    detail = f"{type(error).__name__}: {detail[:120]}" if detail else type(error).__name__
    return (
        f"is truncated or not a torch.save file ({size} bytes; {detail}); copy it again from where it "
        f"was written (the sizes must match), or {save}"
    )


def _load_tensors(path: Path) -> object:
    """The file's content, loaded as plain tensors only; memory-mapped when its format allows, so
    that preflight checks even a large file without reading it whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # only the legacy (non-zip) format cannot be mapped
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(
            f"model.weights: {str(path)!r} does not exist; give a local file written by "
            "torch.save(model.state_dict(), path) (nothing is downloaded)"
        )
    try:
        obj = _load_tensors(path)
    except Exception as e:  # pickle refused (weights_only), not a torch file, truncated, empty
        raise WeightsError(f"model.weights: {str(path)!r} {load_error(path, e, 'loaded')}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"model.weights: {str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP prefixes


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _fitted_state(backbone: nn.Module, path: Path) -> tuple[nn.Module, dict[str, torch.Tensor], list[str]]:
    """The module the file loads into, the file's tensors for it and the ignored classifier keys;
    a :class:`WeightsError` naming every missing, unexpected or mis-shaped key. Only names and
    shapes are compared, so ``backbone`` may live on the meta device (preflight builds it there)."""
    target = backbone.net if isinstance(backbone, TorchvisionBackbone) else backbone
    state = _state_dict(path)
    ignored = []
    if isinstance(backbone, TorchvisionBackbone):
        prefix = backbone.classifier + "."
        ignored = [k for k in state if k.startswith(prefix)]
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    what = getattr(backbone, "arch", type(backbone).__name__)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (file vs model: {_listed(shapes)})")
        raise WeightsError(
            f"model.weights: {str(path)!r} does not fit backbone {what}: {'; '.join(parts)}; "
            "use weights saved from the same architecture (and model.options)"
        )
    return target, state, ignored


def check_weights(backbone: nn.Module | None, path: str | Path) -> None:
    """What :func:`load_weights` would refuse, without loading anything into ``backbone`` (None:
    only that the file holds a state dict of tensors)."""
    if backbone is None:
        _state_dict(Path(path))
    else:
        _fitted_state(backbone, Path(path))


def load_weights(backbone: nn.Module, path: str | Path) -> dict[str, int]:
    """Load ``path`` into ``backbone`` (a torchvision network's own keys, or the backbone's);
    the classification layer's weights are ignored. Missing, unexpected or mis-shaped keys are a
    :class:`WeightsError` naming them. Returns the counts of loaded and ignored tensors."""
    target, state, ignored = _fitted_state(backbone, Path(path))
    target.load_state_dict(state, strict=True)
    return {"loaded": len(state), "ignored": len(ignored)}
