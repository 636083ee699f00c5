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
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np
from numpy.typing import ArrayLike

from oodgate.base.config import MAX_BATCH_IMAGES, OODSource, load_config
from oodgate.data.folder import decode_files, image_files
from oodgate.data.images import ImageTooLargeError, open_image
from oodgate.data.load import load_data
from oodgate.data.npz import npz_array_header
from oodgate.data.ood import (
    IMAGE_SUFFIXES,  # what an OOD folder is read from, read here too
    load_ood,
)
from oodgate.measuring.evaluation import THRESHOLD_TPR

if TYPE_CHECKING:
    import pandas as pd

    from oodgate.base.config import MonitorConfig

GRAY_MODES = ("1", "L", "I", "I;16", "F")
FAR_OOD = ("photo_patches", "gaussian_noise")  # what the demo's shifted batch mixes in
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


def _layout(p: Path, images: tuple[int, ...], shape: tuple[int, int, int]) -> str:
    """How ``x``'s images of shape ``images`` hold the model's ``(C, H, W)``: "chw", "hwc" or "hw"."""
    c, h, w = shape
    for layout, fits in (("chw", (c, h, w)), ("hwc", (h, w, c)), ("hw", (h, w) if c == 1 else None)):
        if tuple(images) == fits:
            return layout
    raise BatchError(
        f"batch {str(p)!r}: images of shape {tuple(images)} do not fit the model, which takes "
        f"{_describe(shape)} images: x must be (N, {c}, {h}, {w}), (N, {h}, {w}, {c})"
        + (f" or (N, {h}, {w})" if c == 1 else "")
    )


def _too_many(what: str, n: int, max_images: int, fix: str) -> BatchError:
    return BatchError(
        f"{what} holds {n} images, more than monitor.max_images={max_images}; {fix}, or raise the "
        "cap with --set monitor.max_images=N"
    )


def _check_npz_header(p: Path, shape: tuple[int, int, int], max_images: int) -> None:
    """The count, shape and dtype of ``x``'s images from the ``.npz``'s header, before anything is
    decompressed: a 381 KB file of 500,000 zero images took 363 s and 4.6 GB to be read whole."""
    import zipfile

    try:
        header = npz_array_header(p)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BatchError(f"batch {str(p)!r} is not a readable .npz file ({e})") from None
    if header is None or not header[0]:
        return  # no array 'x', or a scalar: np.load says so
    dims, dtype = header
    if dims[0] > max_images:
        raise _too_many(
            f"batch {str(p)!r} (its header: array 'x' {dtype} of shape {dims})",
            dims[0],
            max_images,
            "split the batch into smaller .npz files",
        )
    if len(dims) > 1:
        _layout(p, dims[1:], shape)
    if dtype != np.uint8 and dtype.kind != "f":
        raise BatchError(f"batch {str(p)!r}: images must be uint8 or float in [0, 1], got dtype {dtype}")


def _load_npz(p: Path, shape: tuple[int, int, int], max_images: int = MAX_BATCH_IMAGES) -> Batch:
    _check_npz_header(p, shape, max_images)
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
    layout = _layout(p, a.shape[1:], shape)
    nchw = a if layout == "chw" else a.transpose(0, 3, 1, 2) if layout == "hwc" else a[:, None]
    x = _to_float(np.ascontiguousarray(nchw), f"batch {str(p)!r}")
    return Batch(x=x, names=[f"x[{i}]" for i in range(len(x))], digest=_digest(x))


def _too_large(p: Path, rel: str, e: object) -> BatchError:
    """An image over Pillow's decompression-bomb limit (``e``: the ImageTooLargeError or its text)."""
    return BatchError(f"batch folder {str(p)!r}: {rel} has {e}; shrink it or remove it")


def _load_folder(
    p: Path, shape: tuple[int, int, int], fit: bool = False, max_images: int = MAX_BATCH_IMAGES
) -> Batch:
    from PIL import ImageOps, UnidentifiedImageError

    if fit:
        return _load_folder_fitted(p, shape, max_images)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BatchError(f"batch folder {str(p)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) > max_images:
        raise _too_many(
            f"batch folder {str(p)!r}", len(files), max_images, "split the batch into smaller folders"
        )
    c, h, w = shape
    images, unreadable, wrong = [], [], []
    for f in files:
        rel = str(f.relative_to(p))
        try:
            with open_image(f) as img:
                img = ImageOps.exif_transpose(img)
                gray = img.mode in GRAY_MODES
                if gray != (c == 1) or img.size != (w, h):
                    kind = "grayscale" if gray else "colour"
                    wrong.append(f"{rel} ({img.size[1]}x{img.size[0]} {kind})")
                    continue
                a = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except ImageTooLargeError as e:
            raise _too_large(p, rel, e) from None
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


def _load_folder_fitted(p: Path, shape: tuple[int, int, int], max_images: int = MAX_BATCH_IMAGES) -> Batch:
    """Images of any size and mode, decoded as the training images of a folder dataset were."""

    files = image_files(p)
    if not files:
        raise BatchError(f"batch folder {str(p)!r} holds no images")
    if len(files) > max_images:
        raise _too_many(
            f"batch folder {str(p)!r}", len(files), max_images, "split the batch into smaller folders"
        )
    c, h, _ = shape
    x, _, bad = decode_files(files, h, channels=c)
    prefix = f"{ImageTooLargeError.__name__}: "  # decode_files gives each failure as "<type>: <message>"
    for f, why in bad:
        if why.startswith(prefix):
            raise _too_large(p, str(f.relative_to(p)), why.removeprefix(prefix))
    if bad:
        shown = ", ".join(f"{f.relative_to(p)} ({why.split(':')[0]})" for f, why in bad[:SHOWN])
        raise BatchError(
            f"batch folder {str(p)!r}: {len(bad)} of {len(files)} files cannot be read as images: "
            f"{shown}{' ...' if len(bad) > SHOWN else ''}; remove or replace them"
        )
    x = x.astype(np.float32) / 255.0
    return Batch(x=x, names=[str(f.relative_to(p)) for f in files], digest=_digest(x))


def load_batch(
    path: str | Path, shape: tuple[int, int, int], fit: bool = False, max_images: int = MAX_BATCH_IMAGES
) -> Batch:
    """The images at ``path`` (a folder or an ``.npz`` with array ``x``) as float32 ``(N, C, H, W)``
    in [0, 1], checked against the model's input ``shape`` = (C, H, W); a :class:`BatchError` says
    what is wrong (and, for a DVC-tracked path not in the workspace, to pull it). A batch of more
    than ``max_images`` (``monitor.max_images``) is refused before it is read: an ``.npz`` by the
    header of its array ``x``, a folder by its count of image files; so is an image over Pillow's
    decompression-bomb limit."""
    p = Path(path).resolve()
    if not p.exists():
        raise _missing(p)
    if p.is_dir():
        return _load_folder(p, cast("tuple[int, int, int]", tuple(shape)), fit, max_images)
    if p.suffix.lower() == ".npz":
        return _load_npz(p, cast("tuple[int, int, int]", tuple(shape)), max_images)
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

    def as_dict(self) -> dict[str, object]:
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


def validation_counts(validation_scores: ArrayLike, threshold: float) -> tuple[int, int]:
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
@dataclass(frozen=True)
class BatchFigures:
    """What a batch's predictions say, in figures (:func:`summarise`)."""

    n: int  # images
    flagged: int  # images flagged OOD
    ood_rate: float
    mean_confidence: float  # mean calibrated confidence, all images
    mean_confidence_accepted: float  # of the images accepted as in-distribution (NaN: none)
    mean_score: float  # mean OOD score
    class_counts: dict[str, int]  # images predicted per class


def summarise(table: pd.DataFrame, class_names: list[str]) -> BatchFigures:
    """Per-batch figures from the model's output table (``p_<class>``, ``predicted``, ``score``,
    ``in_distribution``): the OOD rate, the mean calibrated confidence (of all images and of those
    accepted), and how many images each class was predicted for."""
    probs = table[[f"p_{c}" for c in class_names]].to_numpy()
    confidence = probs.max(axis=1)
    accepted = table["in_distribution"].to_numpy(dtype=bool)
    counts = table["predicted"].value_counts()
    return BatchFigures(
        n=len(table),
        flagged=int((~accepted).sum()),
        ood_rate=float((~accepted).mean()),
        mean_confidence=float(confidence.mean()),
        mean_confidence_accepted=float(confidence[accepted].mean()) if accepted.any() else float("nan"),
        mean_score=float(table["score"].mean()),
        class_counts={c: int(counts.get(c, 0)) for c in class_names},
    )


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
    bins: Any = np.linspace(min(lo, threshold), max(hi, threshold) + 1e-9, 50)  # hist's stub: no arrays
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


# ------------------------------------------------------------------ one batch, start to end
class MonitorError(ValueError):
    """The monitoring run cannot start: no batch named, or none configured; or the model lacks what
    the configured test needs."""


class Reference(TypedDict):
    """What a registered model carries about its threshold: the score at it, the TPR it kept and
    the validation ID scores it was set on."""

    threshold: float
    tpr: float
    validation_scores: list[float]


def batch_path(batch: str | None, configured: str | None, project: Path) -> Path:
    """The batch to score: ``batch``, else ``monitor.batch`` (``configured``), relative to ``project``."""
    chosen = batch or configured
    if not chosen:
        raise MonitorError(
            "no batch to score: pass --batch PATH (a folder of images or an .npz), set monitor.batch "
            "in params.yaml, or run `make monitor` for the demo batches"
        )
    p = Path(chosen)
    return p if p.is_absolute() else project / p


def predictions_path(out_dir: Path, batch: Path, digest: str, version: int) -> Path:
    """Where a batch's predictions by a model version go: one file per batch content and version."""
    return out_dir / f"{batch.stem}-{digest[:12]}-v{version}.parquet"


def batch_rate_test(mon: MonitorConfig, figures: BatchFigures, ref: Reference | None, label: str) -> RateTest:
    """:func:`rate_test` as ``monitor`` configures it, against the model's reference (``label``
    names the model in the error when the test needs what the model lacks)."""

    validation = None if ref is None else validation_counts(ref["validation_scores"], ref["threshold"])
    if mon.test == "beta_binomial" and validation is None:
        raise MonitorError(
            f"{label} carries no validation scores, which the beta_binomial test needs; "
            "set monitor.test: binomial, or register a model logged with its reference"
        )
    return rate_test(
        figures.flagged,
        figures.n,
        mon.alpha,
        method=mon.test,
        expected=mon.expected_ood_rate,
        tpr=ref["tpr"] if ref else THRESHOLD_TPR,
        validation=validation,
    )


@dataclass(frozen=True)
class MonitorSummary:
    """One scored batch: its figures, the OOD-rate test, the model and the batch (``summary.json``)."""

    figures: BatchFigures
    test: RateTest
    model_name: str
    champion_version: int
    alias: str  # the alias the model was looked up by, or "version <n>"
    batch: str
    batch_digest: str

    def record(self) -> dict[str, object]:
        """As ``summary.json`` holds it (the figures first, then the test, the model and the batch)."""
        fields = asdict(self)
        return {**fields.pop("figures"), **fields}

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> MonitorSummary:
        """The summary a batch's ``summary.json`` holds (:meth:`record`)."""
        fields = BatchFigures.__dataclass_fields__
        return cls(
            figures=BatchFigures(**{k: d[k] for k in fields}),
            test=RateTest(**d["test"]),
            model_name=str(d["model_name"]),
            champion_version=int(d["champion_version"]),
            alias=str(d["alias"]),
            batch=str(d["batch"]),
            batch_digest=str(d["batch_digest"]),
        )

    def report(self) -> str:
        """The batch's report in markdown: the verdict, the batch, the model and the figures."""
        f, test = self.figures, self.test
        counts = ", ".join(f"{c}: {n}" for c, n in f.class_counts.items())
        head = {"high": "ALERT (more OOD than expected)", "low": "ALERT (less OOD than expected)"}
        return "\n".join(
            [
                f"## Monitoring: {head.get(test.alert, 'no alert')}",
                "",
                f"- batch: `{self.batch}` ({f.n} images)",
                f"- model: {self.model_name} version {self.champion_version}",
                f"- {test.sentence()}",
                f"- mean calibrated confidence {f.mean_confidence:.4f}; mean OOD score {f.mean_score:.4g}",
                f"- predicted classes: {counts}",
            ]
        )

    def params(self) -> dict[str, str | int | float]:
        """The batch run's parameters."""
        return {
            "batch": self.batch,
            "images": self.figures.n,
            "alias": self.alias,
            "test": self.test.method,
            "alpha": self.test.alpha,
        }

    def metrics(self) -> dict[str, float]:
        """The batch run's figures (the history run gets ``ood_rate``, ``mean_confidence``,
        ``p_value`` and ``champion_version`` of each batch)."""
        f = self.figures
        return {
            "ood_rate": f.ood_rate,
            "mean_confidence": f.mean_confidence,
            "mean_score": f.mean_score,
            "p_value": self.test.p_value,
            "expected_ood_rate": self.test.expected,
            "champion_version": self.champion_version,
            **{f"class_count/{c}": n for c, n in f.class_counts.items()},
        }


@dataclass(frozen=True)
class MonitorResult:
    """What a monitoring run returns: the summary, where the predictions are, the batch's MLflow
    run, and whether it was scored before (then nothing was logged, and there is no new step)."""

    summary: MonitorSummary
    predictions: str
    mlflow_run_id: str
    reused: bool
    step: int | None = None  # the history step of a newly logged batch

    def record(self) -> dict[str, object]:
        step = {} if self.step is None else {"step": self.step}
        return {
            **self.summary.record(),
            "predictions": self.predictions,
            "mlflow_run_id": self.mlflow_run_id,
            **step,
            "reused": self.reused,
        }


def write_outputs(
    staging: Path, table: pd.DataFrame, summary: MonitorSummary, ref: Reference | None, title: str
) -> list[Path]:
    """The batch's files (predictions, score plot, report, summary) in ``staging``, a directory next
    to where the predictions will go (:func:`publish`)."""
    staging.mkdir(parents=True, exist_ok=True)
    table.to_parquet(staging / "predictions.parquet", index=False)
    if ref is not None:  # a model logged without its reference gets no plot
        scores, val = table["score"].to_numpy(), np.asarray(ref["validation_scores"])
        score_plot(scores, float(ref["threshold"]), staging / "scores.png", val, title)
    (staging / "report.md").write_text(summary.report() + "\n")
    (staging / "summary.json").write_text(json.dumps(summary.record(), indent=1))
    return sorted(staging.iterdir())


def publish(staging: Path, final: Path) -> None:
    """The staged predictions to ``final`` in one rename, the staging directory gone: only a batch
    scored and logged leaves predictions."""
    (staging / "predictions.parquet").replace(final)
    shutil.rmtree(staging)


def write_demo_batches(params_path: Path, out_dir: Path) -> list[Path]:
    """Two batches from the configured data: the in-distribution test split, and the same with a
    quarter of its images replaced by far-OOD ones (photo patches and Gaussian noise, half each)."""

    cfg = load_config(params_path)
    data_root = params_path.parent / cfg.data.root
    bundle = load_data(cfg.data, data_root)
    x_id = bundle.test.x.numpy()
    n_ood = len(x_id) // 4
    shape = (bundle.in_channels, bundle.image_size)
    far = [load_ood(OODSource(name=n), cfg.data, data_root, *shape).x.numpy() for n in FAR_OOD]
    ood = np.concatenate([a[: -(-n_ood // len(far))] for a in far])[:n_ood]
    rng = np.random.default_rng(0)
    keep = rng.permutation(len(x_id))[: len(x_id) - len(ood)]
    shifted = np.concatenate([x_id[keep], ood])[rng.permutation(len(keep) + len(ood))]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "in_distribution.npz", out_dir / "shifted.npz"]
    np.savez_compressed(paths[0], x=x_id)
    np.savez_compressed(paths[1], x=shifted)
    return paths
