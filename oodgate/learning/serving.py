"""The deployable model: calibrated probabilities, OOD score and in/out decision in one tensor.

``ServingModel(x)`` takes float32 images in [0, 1], shape (B, C, H, W), and returns (B, K + 2):
columns ``0..K-1`` are the calibrated class probabilities, column ``K`` the OOD score (higher =
in-distribution), column ``K + 1`` is 1.0 where the score reaches the stored threshold (the score
that keeps 95% of the validation in-distribution data) and 0.0 where the input is flagged OOD.
One output tensor keeps the model exportable with ``torch.export`` (MLflow's default format).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from oodgate.learning.classifier import Classifier


class ServingModel(nn.Module):
    threshold: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, classifier: Classifier, threshold: float) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        s = self.classifier.score(logits)
        accept = (s >= self.threshold).to(logits.dtype)
        return torch.cat([F.softmax(logits, dim=1), s[:, None], accept[:, None]], dim=1)


def split_output(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"probabilities": (B, K), "score": (B,), "in_distribution": (B,) bool}`` from a ServingModel output."""
    return {"probabilities": out[:, :-2], "score": out[:, -2], "in_distribution": out[:, -1] > 0.5}


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes and bytes, buffers included), so two
    models share a fingerprint exactly when they compute the same function with the same weights,
    temperature and threshold. The registry uses it to never register the same model twice."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
