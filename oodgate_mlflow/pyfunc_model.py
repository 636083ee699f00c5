"""The registered model as an MLflow pyfunc, defined from code (MLflow's "models from code").

MLflow copies this file into the model's artifacts and runs it on load; the network itself is the
nested ``torch_model`` artifact, a ``torch.export`` program saved with ``mlflow.pytorch`` and loaded
with pickle deserialisation refused. It checks its input before running the network, so a wrong
shape or dtype gets one short message that says what is expected, and names its outputs.

Input: images ``(B, C, H, W)`` (``{"inputs": [...]}`` over REST): float in [0, 1] (any float
dtype; JSON numbers with a decimal point) or integers in [0, 255], pixel values as uint8 holds them
(any integer dtype; JSON integers). Output: one row per image with ``p_<class>`` (the
calibrated probabilities), ``predicted`` (the class name), ``score`` (the OOD score, higher =
in-distribution) and ``in_distribution`` (the score reaches the validation threshold).
"""

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class ImageInputError(MlflowException):
    """A request whose images have the wrong shape, dtype or range (HTTP 400). MLflow's scoring
    server prepends the whole request body to a prediction error's message; this error keeps its
    own one-line message, which says what is expected and what came."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by __init__
            self._message = value


def check_images(x, shape: tuple[int, int, int]) -> np.ndarray:
    """``x`` as a float32 array (B, C, H, W) in [0, 1], or an ImageInputError saying what is expected.
    Integers are pixel values 0-255, whatever their dtype: JSON integers arrive as int64, and were
    refused above 1 although uint8 is accepted."""
    expected = f"images of shape (batch, {shape[0]}, {shape[1]}, {shape[2]}), float in [0, 1] or integers 0-255 (uint8)"
    if isinstance(x, pd.DataFrame):
        raise ImageInputError(
            f'expected {expected} as a tensor ({{"inputs": [...]}}), got a table with columns {list(x.columns)[:5]}'
        )
    try:
        a = np.asarray(x)
    except ValueError:
        raise ImageInputError(f"expected {expected}; got ragged nested lists") from None
    if a.dtype.kind not in "fiu":
        raise ImageInputError(f"expected {expected}; got dtype {a.dtype}")
    if a.ndim != 4 or tuple(a.shape[1:]) != tuple(shape) or a.shape[0] == 0:
        raise ImageInputError(f"expected {expected}; got shape {tuple(a.shape)}")
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise ImageInputError(
                f"expected {expected}; got integers in [{a.min()}, {a.max()}], outside the pixel values 0-255"
            )
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
        raise ImageInputError(
            f"expected {expected}; got values in [{np.nanmin(a):.4g}, {np.nanmax(a):.4g}] or non-finite values"
        )
    return a


class OODGateModel(PythonModel):
    def load_context(self, context) -> None:
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.shape = tuple(meta["input_shape"])
        self.class_names = list(meta["class_names"])
        self.preprocessing = meta.get("preprocessing", "exact")  # "fit": files of any size are fitted
        # The threshold's reference (score, TPR, validation ID scores); absent in models logged without one.
        path = context.artifacts.get("reference")
        self.reference = json.loads(Path(path).read_text()) if path else None
        previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
        os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # MLflow verifies the archive
        try:
            self.module = mlflow.pytorch.load_model(context.artifacts["torch_model"])
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
            else:
                os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        # np.ndarray is a hint MLflow infers no schema from: the input reaches check_images as sent.
        import torch

        x = check_images(model_input, self.shape)
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x)).numpy()
        k = len(self.class_names)
        table = pd.DataFrame(out[:, :k], columns=[f"p_{c}" for c in self.class_names])
        table["predicted"] = [self.class_names[i] for i in out[:, :k].argmax(1)]
        table["score"] = out[:, k]
        table["in_distribution"] = out[:, k + 1] > 0.5
        return table


mlflow.models.set_model(OODGateModel())
