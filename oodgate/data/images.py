"""Pixel-level conversions shared by every loader: layout, grayscale, resizing (uint8 in, uint8 out);
and opening a user's image file under Pillow's decompression-bomb limit (:func:`open_image`)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL.Image import Image

# ITU-R BT.601 luma weights in integer form, so the conversion is exact and identical everywhere.
_LUMA = (299, 587, 114)
_CHUNK = 4096


def gray_from_rgb_np(rgb: np.ndarray) -> np.ndarray:
    """``(299 R + 587 G + 114 B + 500) // 1000`` on a uint8 ``(..., 3)`` array; returns uint8 ``(...)``."""
    c = rgb.astype(np.uint32)
    gray = (_LUMA[0] * c[..., 0] + _LUMA[1] * c[..., 1] + _LUMA[2] * c[..., 2] + 500) // 1000
    return gray.astype(np.uint8)


def gray_from_rgb(x: torch.Tensor) -> torch.Tensor:
    """The same integer luma formula on a uint8 ``(N, 3, H, W)`` tensor; returns ``(N, 1, H, W)``."""
    c = x.to(torch.int32)
    gray = (_LUMA[0] * c[:, 0] + _LUMA[1] * c[:, 1] + _LUMA[2] * c[:, 2] + 500) // 1000
    return gray.to(torch.uint8).unsqueeze(1).contiguous()


def nchw_from_array(a: np.ndarray, source: str) -> torch.Tensor:
    """uint8 ``NHW`` or ``NHWC`` (C in 1, 3) numpy array -> contiguous uint8 ``NCHW`` tensor."""
    if a.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8, got {a.dtype}")
    if a.ndim == 3:
        a = a[:, :, :, None]
    if a.ndim != 4 or a.shape[3] not in (1, 3):
        raise ValueError(f"{source}: images must be NHW or NHWC with 1 or 3 channels, got shape {a.shape}")
    out = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    return torch.from_numpy(out if out.flags.writeable else out.copy())


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.empty((0, x.shape[1], size, size), dtype=torch.uint8)
    out = []
    for chunk in x.split(_CHUNK):  # type: ignore[no-untyped-call]  # torch: Tensor.split unannotated
        f = F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(f.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out).contiguous()


def conform(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Bring uint8 ``(N, C, H, W)`` images to ``(N, channels, size, size)``.

    Gray -> RGB repeats the channel; RGB -> gray uses the integer luma formula of ``gray_from_rgb``.
    Resizing is bilinear with antialiasing on float values, rounded back to uint8 (deterministic on
    CPU); non-square images are stretched to the square.
    """
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"conform expects uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
    if channels not in (1, 3):
        raise ValueError(f"conform: channels must be 1 or 3, got {channels}")
    c = x.shape[1]
    if c == channels:
        pass
    elif c == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif c == 3 and channels == 1:
        x = gray_from_rgb(x)
    else:
        raise ValueError(f"conform: cannot convert {c}-channel images to {channels} channels")
    if x.shape[2:] != (size, size):
        x = _resize(x, size)
    return x.contiguous()


# ------------------------------------------------------------------ opening image files
class ImageTooLargeError(ValueError):
    """An image file with more pixels than Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``): decoding it could take any amount of memory and time."""

    def __init__(self, pixels: int | None, limit: int | None) -> None:
        self.pixels, self.limit = pixels, limit
        size = f"{pixels} pixels, over" if pixels else "more pixels than"
        super().__init__(
            f"{size} Pillow's limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS, "
            "a guard against decompression bombs)"
        )


@contextmanager
def open_image(path: str | Path) -> Iterator[Image]:
    """``PIL.Image.open(path)`` with Pillow's decompression-bomb guard as one error: an image over
    ``MAX_IMAGE_PIXELS`` (Pillow only warns, then decodes it) or over twice that (Pillow's
    ``DecompressionBombError``, whose message has no file name) raises :class:`ImageTooLargeError`;
    the caller names the file. Pillow's limit itself is left as it is."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                yield img
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise ImageTooLargeError(int(found[1]) if found else None, Image.MAX_IMAGE_PIXELS) from None
