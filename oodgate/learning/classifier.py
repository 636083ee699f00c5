"""Backbone + method head as one module, and checkpoints that rebuild it.

The model takes images as float tensors in [0, 1] (``uint8 / 255``), shape (B, C, H, W), and normalises
them itself with the training split's mean/std, so a saved model needs no preprocessing code.
A checkpoint stores the ``ModelSpec`` beside the weights (plain types only, so it loads with
``torch.load(..., weights_only=True)``) and ``load_classifier`` never needs the caller to remember
the architecture.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from oodgate.base.files import torch_save
from oodgate.learning import methods, scores
from oodgate.learning.methods import Head
from oodgate.learning.models import create_backbone

# nn.Module constructors draw from torch's global RNG. Every construction in this package (a seeded
# new model, or a model about to receive a checkpoint's weights) holds this lock and restores the
# RNG state, so concurrent tasks in one process (the flow's thread pool) never shift each other's
# initialisation: a model's weights depend on its seed alone.
_INIT_LOCK = threading.Lock()


def _construct(spec: ModelSpec, seed: int) -> Classifier:
    with _INIT_LOCK:
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            return Classifier(spec)
        finally:
            torch.random.set_rng_state(state)


@dataclass(frozen=True)
class ModelSpec:
    backbone: str
    method: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    score: str
    backbone_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    # How an image file becomes the input: "exact" (it must have the input's size and channels) or
    # "fit" (folder datasets: oodgate.data.folder.decode_image, shorter side resized, centre crop, RGB)
    preprocessing: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["class_names"] = list(self.mean), list(self.std), list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)


class Classifier(nn.Module):
    mean: torch.Tensor  # buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        scores.get(spec.score)  # fail early on an unknown score name
        self.spec = spec
        self.backbone = create_backbone(
            spec.backbone, in_channels=spec.in_channels, image_size=spec.image_size, **spec.backbone_options
        )
        self.head: Head = methods.create(
            spec.method, cast(int, self.backbone.out_features), spec.num_classes, **spec.method_options
        )
        shape = (1, spec.in_channels, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(shape))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.backbone((x - self.mean) / self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits ``z / T`` of images in [0, 1]."""
        return cast(torch.Tensor, self.head(self.features(x)))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """The configured OOD score of these logits (higher = in-distribution)."""
        return scores.get(self.spec.score)(logits)


def build_classifier(spec: ModelSpec, seed: int) -> Classifier:
    """A freshly initialised classifier whose weights depend only on ``spec`` and ``seed``."""
    return _construct(spec, seed)


def with_score(model: Classifier, score: str) -> Classifier:
    """The same model with another OOD score (the score is a function of the logits, not a weight)."""
    scores.get(score)  # fail early on an unknown score name
    model.spec = replace(model.spec, score=score)
    return model


def save_classifier(model: Classifier, path: str | Path, **extra: Any) -> Path:

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # atomic: an interrupted or failed save (a full disk) never leaves a truncated checkpoint
    return torch_save({"spec": model.spec.to_dict(), "model": state, **extra}, Path(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    return cast(dict[str, Any], torch.load(path, map_location="cpu", weights_only=True))


def load_classifier(path: str | Path) -> Classifier:
    """Rebuild a classifier from a checkpoint written by ``save_classifier`` (safe load)."""
    ckpt = read_checkpoint(path)
    model = _construct(ModelSpec.from_dict(ckpt["spec"]), seed=0)  # weights replaced just below
    model.load_state_dict(ckpt["model"])
    return model.eval()
