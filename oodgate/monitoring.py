"""Watching incoming data with a deployed model: read a batch, test its OOD rate, draw its scores.

The served model accepts an image as in-distribution when its OOD score reaches the threshold that
kept ``tpr`` (95%) of the validation ID images, so on data like the training data about ``1 - tpr``
(5%) of a batch is flagged OOD. :func:`rate_test` asks whether a batch's count of flagged images is
compatible with that, with a two-sided exact test:

``binomial``
    The count ``j`` of ``m`` images is ``Binomial(m, p0)`` with ``p0`` the expected rate, taken as
    exact. This is the test to use when the validation set is large (thousands of images).
``beta_binomial``
    The threshold was itself set on a finite validation set: with ``k`` of its ``n`` scores below
    the threshold, the (k+1)-th smallest of ``n`` exchangeable scores, the chance that a new ID image
    falls below it is ``Beta(k + 1, n - k)`` distributed, so ``j ~ BetaBinomial(m, k + 1, n - k)``
    (exact for continuous scores when the batch and validation images are exchangeable). With a
    few hundred validation images the binomial test alone mistakes the threshold's own noise for drift.

The p-value is the smaller tail probability doubled (capped at 1); a batch whose p-value is below
``alpha`` is flagged ``high`` (more OOD than expected: the data moved away from the training data)
or ``low`` (fewer: the threshold no longer matches the data).

A batch is a folder of images (any depth, sorted by path) or an ``.npz`` whose array ``x`` holds
the images; either must already be what the model was trained on: the same height, width and
channel count (no silent resizing: a resize changes the scores), uint8 or float in [0, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodgate.data.ood import IMAGE_SUFFIXES  # what an OOD folder is read from, read here too

GRAY_MODES = ("1", "L", "I", "I;16", "F")
SHOWN = 5  # offending files named in an error


class BatchError(ValueError):
    """A batch that cannot be scored: missing, empty, unreadable, or not the model's input shape."""


@dataclass(frozen=True)
class Batch:
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    names: list[str]  # file paths relative to the folder, or "x[<i>]" for an .npz
    digest: str  # SHA-256 of the shape and pixels: the batch's identity


def _digest(x: np.ndarray) -> str:
    h = hashlib.sha256(f"{x.dtype}|{x.shape}|".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _describe(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{h}x{w} {'grayscale' if c == 1 else 'RGB'} ({c} channel{'s' if c > 1 else ''})"


def dvc_file(path: str | Path) -> Path:
    """Where ``dvc add <path>`` records the path's hash: ``<path>.dvc`` beside it."""
    p = Path(path)
    return p.with_name(p.name + ".dvc")


def _missing(p: Path) -> BatchError:
    if dvc_file(p).is_file():
        return BatchError(
            f"batch {str(p)!r} is tracked by DVC ({dvc_file(p).name}) but not in the workspace; "
            f"run `dvc pull {p}` (or `dvc checkout {p}`) first"
        )
    return BatchError(f"batch {str(p)!r} does not exist; pass a folder of images or an .npz file")


def _to_float(a: np.ndarray, source: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype.kind != "f":
        raise BatchError(f"{source}: images must be uint8 or float in [0, 1], got dtype {a.dtype}")
    a = a.astype(np.float32)
    # NaN and infinities by name, with where they are: a NaN used to be reported as a range error
    for name, bad in (("NaN", np.isnan(a)), ("infinite", np.isinf(a))):
        if bad.any():
            images = np.flatnonzero(bad.reshape(len(a), -1).any(axis=1))
            shown = ", ".join(f"x[{i}]" for i in images[:SHOWN]) + (" ..." if len(images) > SHOWN else "")
            raise BatchError(
                f"{source}: {int(bad.sum())} pixel values are {name}, in {len(images)} of {len(a)} images "
                f"({shown}); images must be uint8 or float in [0, 1]"
            )
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise BatchError(f"{source}: float images must lie in [0, 1], got [{a.min():.4g}, {a.max():.4g}]")
    return a


def _load_npz(p: Path, shape: tuple[int, int, int]) -> Batch:
    try:
        with np.load(p, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise BatchError(
                    f"batch {str(p)!r} has no array 'x' (found: {', '.join(npz.files) or 'none'})"
                )
            a = npz["x"]
    except (OSError, ValueError) as e:
        if isinstance(e, BatchError):
            raise
        raise BatchError(f"batch {str(p)!r} is not a readable .npz file ({e})") from None
    if a.ndim == 0 or len(a) == 0:
        raise BatchError(f"batch {str(p)!r} holds no images (array 'x' has shape {a.shape})")
    c, h, w = shape
    if a.shape[1:] == (c, h, w):
        nchw = a
    elif a.shape[1:] == (h, w, c):
        nchw = a.transpose(0, 3, 1, 2)
    elif c == 1 and a.shape[1:] == (h, w):
        nchw = a[:, None]
    else:
        raise BatchError(
            f"batch {str(p)!r}: images of shape {a.shape[1:]} do not fit the model, which takes "
            f"{_describe(shape)} images: x must be (N, {c}, {h}, {w}), (N, {h}, {w}, {c})"
            + (f" or (N, {h}, {w})" if c == 1 else "")
        )
    x = _to_float(np.ascontiguousarray(nchw), f"batch {str(p)!r}")
    return Batch(x=x, names=[f"x[{i}]" for i in range(len(x))], digest=_digest(x))


def _load_folder(p: Path, shape: tuple[int, int, int], fit: bool = False) -> Batch:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if fit:
        return _load_folder_fitted(p, shape)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BatchError(f"batch folder {str(p)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    c, h, w = shape
    images, unreadable, wrong = [], [], []
    for f in files:
        rel = str(f.relative_to(p))
        try:
            with Image.open(f) as img:
                img = ImageOps.exif_transpose(img)
                gray = img.mode in GRAY_MODES
                if gray != (c == 1) or img.size != (w, h):
                    kind = "grayscale" if gray else "colour"
                    wrong.append(f"{rel} ({img.size[1]}x{img.size[0]} {kind})")
                    continue
                a = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            unreadable.append(f"{rel} ({type(e).__name__})")
            continue
        images.append(a[None] if c == 1 else a.transpose(2, 0, 1))
    if unreadable:
        raise BatchError(
            f"batch folder {str(p)!r}: {len(unreadable)} of {len(files)} files cannot be read as images: "
            f"{', '.join(unreadable[:SHOWN])}{' ...' if len(unreadable) > SHOWN else ''}; remove or replace them"
        )
    if wrong:
        raise BatchError(
            f"batch folder {str(p)!r}: {len(wrong)} of {len(files)} images are not {_describe(shape)}, the "
            f"model's input: {', '.join(wrong[:SHOWN])}{' ...' if len(wrong) > SHOWN else ''}; "
            "prepare them as the training images were"
        )
    x = np.stack(images).astype(np.float32) / 255.0
    names = [str(f.relative_to(p)) for f in files]
    return Batch(x=x, names=names, digest=_digest(x))


def _load_folder_fitted(p: Path, shape: tuple[int, int, int]) -> Batch:
    """Images of any size and mode, decoded as the training images of a folder dataset were."""
    from oodgate.data.folder import decode_files, image_files

    files = image_files(p)
    if not files:
        raise BatchError(f"batch folder {str(p)!r} holds no images")
    c, h, _ = shape
    x, _, bad = decode_files(files, h, channels=c)
    if bad:
        shown = ", ".join(f"{f.relative_to(p)} ({why.split(':')[0]})" for f, why in bad[:SHOWN])
        raise BatchError(
            f"batch folder {str(p)!r}: {len(bad)} of {len(files)} files cannot be read as images: "
            f"{shown}{' ...' if len(bad) > SHOWN else ''}; remove or replace them"
        )
    x = x.astype(np.float32) / 255.0
    return Batch(x=x, names=[str(f.relative_to(p)) for f in files], digest=_digest(x))


def load_batch(path: str | Path, shape: tuple[int, int, int], fit: bool = False) -> Batch:
    """The images at ``path`` (a folder or an ``.npz`` with array ``x``) as float32 ``(N, C, H, W)``
    in [0, 1], checked against the model's input ``shape`` = (C, H, W); a :class:`BatchError` says
    what is wrong (and, for a DVC-tracked path not in the workspace, to pull it)."""
    p = Path(path).resolve()
    if not p.exists():
        raise _missing(p)
    if p.is_dir():
        return _load_folder(p, tuple(shape), fit)
    if p.suffix.lower() == ".npz":
        return _load_npz(p, tuple(shape))
    raise BatchError(f"batch {str(p)!r} must be a folder of images or an .npz file with an array 'x'")


# ------------------------------------------------------------------ the OOD-rate test
@dataclass(frozen=True)
class RateTest:
    n: int  # images in the batch
    flagged: int  # images flagged OOD
    rate: float
    expected: float
    p_value: float
    alpha: float
    method: str
    alert: str  # "high", "low" or "none"
    basis: str  # what the expected rate rests on

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self) -> str:
        verdict = {
            "high": "ALERT: significantly more OOD images than expected (the data moved away from the "
            "training data)",
            "low": "ALERT: significantly fewer OOD images than expected (the threshold no longer matches "
            "the data)",
            "none": "no alert: the OOD rate is compatible with in-distribution data",
        }[self.alert]
        return (
            f"{self.flagged} of {self.n} images flagged OOD ({self.rate:.1%}); expected {self.expected:.1%} "
            f"({self.basis}); two-sided exact {self.method.replace('_', '-')} test p = {self.p_value:.3g} "
            f"at level {self.alpha:g}: {verdict}"
        )


def validation_counts(validation_scores: Any, threshold: float) -> tuple[int, int]:
    """``(n, k)``: validation ID scores, and how many fall below the threshold (flagged OOD)."""
    s = np.asarray(validation_scores, dtype=np.float64)
    return len(s), int((s < threshold).sum())


def rate_test(
    flagged: int,
    n: int,
    alpha: float,
    method: str = "binomial",
    expected: float | None = None,
    tpr: float = 0.95,
    validation: tuple[int, int] | None = None,
) -> RateTest:
    """Test ``flagged`` OOD images of ``n`` against the expected rate (see the module docstring).

    ``binomial``: ``expected`` if given, else ``1 - tpr``. ``beta_binomial``: needs ``validation``
    = ``(n_val, k_val)`` from :func:`validation_counts`; the expected rate is ``(k + 1) / (n + 1)``.
    """
    from scipy import stats

    if n <= 0 or not 0 <= flagged <= n:
        raise ValueError(f"rate_test needs 0 <= flagged <= n and n > 0, got flagged={flagged}, n={n}")
    if method == "binomial":
        p0 = expected if expected is not None else 1.0 - tpr
        basis = (
            "the configured rate" if expected is not None else f"1 - the threshold's validation TPR {tpr:g}"
        )
        dist = stats.binom(n, p0)
    elif method == "beta_binomial":
        if validation is None:
            raise ValueError("the beta_binomial test needs the validation counts the threshold was set on")
        n_val, k_val = validation
        a, b = k_val + 1, n_val - k_val
        dist = stats.betabinom(n, a, b)
        p0 = a / (a + b)
        basis = f"{k_val} of {n_val} validation ID images below the threshold"
    else:
        raise ValueError(f"unknown test {method!r}; use binomial or beta_binomial")
    upper = float(dist.sf(flagged - 1))  # P(J >= flagged)
    lower = float(dist.cdf(flagged))  # P(J <= flagged)
    p_value = min(1.0, 2.0 * min(upper, lower))
    rate = flagged / n
    alert = "none" if p_value >= alpha else ("high" if rate > p0 else "low")
    return RateTest(
        n=n,
        flagged=flagged,
        rate=rate,
        expected=float(p0),
        p_value=p_value,
        alpha=alpha,
        method=method,
        alert=alert,
        basis=basis,
    )


# ------------------------------------------------------------------ summaries and pictures
def summarise(table: Any, class_names: list[str]) -> dict[str, Any]:
    """Per-batch figures from the model's output table (``p_<class>``, ``predicted``, ``score``,
    ``in_distribution``): the OOD rate, the mean calibrated confidence (of all images and of those
    accepted), and how many images each class was predicted for."""
    probs = table[[f"p_{c}" for c in class_names]].to_numpy()
    confidence = probs.max(axis=1)
    accepted = table["in_distribution"].to_numpy(dtype=bool)
    counts = table["predicted"].value_counts()
    return {
        "n": len(table),
        "flagged": int((~accepted).sum()),
        "ood_rate": float((~accepted).mean()),
        "mean_confidence": float(confidence.mean()),
        "mean_confidence_accepted": float(confidence[accepted].mean()) if accepted.any() else float("nan"),
        "mean_score": float(table["score"].mean()),
        "class_counts": {c: int(counts.get(c, 0)) for c in class_names},
    }


def score_plot(
    scores: np.ndarray,
    threshold: float,
    path: Path,
    validation_scores: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Histogram of the batch's OOD scores against the validation ID scores the threshold came from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = np.concatenate([scores, validation_scores if validation_scores is not None else []])
    lo, hi = np.percentile(everything, 0.5), np.percentile(everything, 99.5)
    bins = np.linspace(min(lo, threshold), max(hi, threshold) + 1e-9, 50)
    fig, ax = plt.subplots(figsize=(6, 4))
    if validation_scores is not None:
        ax.hist(validation_scores, bins=bins, density=True, alpha=0.5, label="validation ID (the model's)")
    ax.hist(scores, bins=bins, density=True, histtype="step", lw=1.8, label=f"this batch ({len(scores)})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set(title=title or "OOD scores", xlabel="score (higher = in-distribution)", ylabel="density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
