"""The one typed, frozen configuration object, loaded from ``params.yaml``.

Every section forbids unknown keys and constrains its values, so a typo or a bad value fails with a
message naming the key, the value and what is allowed -- before any data is read or any run is
logged. Load it once at the entry point (``load_config``) and pass it down.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """``params.yaml`` is missing, unreadable or invalid; the message says what to change."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# An OOD set's name becomes part of file names (roc_<name>.csv) and metric names (ood/<name>/fpr95):
# a '/' would make it a directory or another metric section, a leading '.' a hidden or parent path.
OOD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
OOD_NAME_RULE = "letters, digits, '_', '-' and '.' only, not starting with '.'"


class OODSource(_Frozen):
    """An OOD set. ``name`` is a registered OOD dataset, or any label when ``path`` is given
    (:data:`OOD_NAME_RULE`: it names files and metrics).

    ``path`` points to a folder of images or an ``.npz`` file (array ``x``, uint8, NHWC or NHW).
    """

    name: str = Field(min_length=1)
    path: str | None = None
    group: Literal["near", "far"] | None = Field(
        default=None,
        description="near: unseen classes, letters, datasets of the same kind; far: photos, noise. "
        "Registered sets have a default; a path needs one.",
    )


class DataConfig(_Frozen):
    """``dataset: folder`` reads the user's own images: ``path`` (under ``root`` unless absolute) holds
    one subfolder per class, or ``train/``, ``val/`` and ``test/`` subfolders each holding the class
    folders. Folder images are brought to ``image_size`` (shorter side resized, centre crop) and RGB."""

    dataset: str = "embedded_mnist"
    root: str = "data"
    path: str | None = Field(
        default=None, description="folder datasets: the class-folder tree, under root (null: root itself)"
    )
    classes: list[int] | list[str] | None = Field(
        default=None,
        description="in-distribution classes to keep: indices, or folder names for folder datasets; null keeps all",
    )
    image_size: int | None = Field(
        default=None, ge=8, le=4096, description="folder datasets: the side of the square images models see"
    )
    on_bad_image: Literal["skip", "fail"] = Field(
        default="fail",
        description="folder datasets: an unreadable image fails the prepare step, or is skipped",
    )
    workers: int = Field(
        default=0,
        ge=0,
        le=256,
        description="processes decoding folder images, and loading training batches (0: in this process)",
    )
    ood: list[OODSource] = Field(default_factory=list)
    ood_val: list[OODSource] = Field(
        default_factory=list,
        description="validation OOD sets, disjoint in source from every test OOD set: score: auto chooses "
        "each model's OOD score on them (null list: the method's default score)",
    )
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=0.5, description="only for datasets without an official test split"
    )
    split_seed: int = Field(default=0, ge=0)
    ood_size: int = Field(default=1000, ge=10, description="samples per generated OOD set (noise, patches)")
    download: bool = False

    @field_validator("ood", "ood_val", mode="before")
    @classmethod
    def _names_to_sources(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, v: list[int] | list[str] | None) -> list[int] | list[str] | None:
        if v is None:
            return v
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("needs at least 2 distinct classes")
        if isinstance(v[0], int) and min(v) < 0:
            raise ValueError("class indices must be non-negative")
        return v

    @model_validator(mode="after")
    def _folder_keys(self) -> DataConfig:
        if self.dataset == "folder":
            if self.image_size is None:
                raise ValueError(
                    "data.dataset: folder needs data.image_size, the side of the square images the model "
                    "sees (e.g. 64, or 224 for ImageNet-pretrained backbones)"
                )
            return self
        named = {"path": self.path, "image_size": self.image_size}
        if self.on_bad_image != "fail":
            named["on_bad_image"] = self.on_bad_image
        set_keys = [k for k, v in named.items() if v is not None]
        if set_keys:
            raise ValueError(
                f"data.{set_keys[0]} applies to data.dataset: folder only (got dataset {self.dataset!r}); "
                f"remove it, or set data.dataset: folder"
            )
        if self.classes is not None and isinstance(self.classes[0], str):
            raise ValueError(
                f"data.classes: {self.dataset!r} selects classes by index (got names {self.classes}); "
                "names are for folder datasets"
            )
        return self


class ModelConfig(_Frozen):
    """``backbone``: a registered backbone, or ``torchvision:<name>`` for any torchvision
    classification model (its classifier removed; ``options`` go to its builder). ``weights``: a
    local file of the backbone's pretrained weights (a state dict; never downloaded)."""

    backbone: str = "small_cnn"
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(default=None, min_length=1)


class TrainConfig(_Frozen):
    epochs: int = Field(default=15, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=2, le=65_536)
    lr: float = Field(default=0.1, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    milestones: list[int] = Field(default_factory=list, description="epochs at which lr *= gamma")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(default=0, ge=0, description="linear learning-rate warm-up, in epochs")
    augment: Literal["none", "crop_flip", "crop", "resized_crop_flip", "resized_crop"] = "none"
    crop_scale: tuple[float, float] = Field(
        default=(0.25, 1.0),
        description="resized_crop*: the range of the crop's area, as a fraction of the image",
    )
    freeze_backbone_epochs: int = Field(
        default=0, ge=0, description="fine-tuning: train only the head for this many epochs"
    )
    backbone_lr: float = Field(
        default=1.0, gt=0.0, le=1.0, description="the backbone's learning rate as a fraction of lr"
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=4096,
        description="data-parallel training processes on this machine (DistributedDataParallel); "
        "batch_size is the global batch",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(default=True, description="bf16 autocast on CUDA; ignored on CPU")
    channels_last: bool = True
    eval_batch_size: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _milestones_within_epochs(self) -> TrainConfig:
        self._check_epoch_counts()
        if any(m <= 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ValueError(
                f"train.milestones must be increasing epochs in (0, epochs={self.epochs}), "
                f"got {self.milestones}"
            )
        if self.processes > 1 and self.freeze_backbone_epochs:
            raise ValueError(
                f"train.freeze_backbone_epochs={self.freeze_backbone_epochs} with train.processes="
                f"{self.processes}: freezing the backbone is not supported in distributed training; "
                "fine-tune in one process, or set freeze_backbone_epochs: 0"
            )
        if self.batch_size < self.processes:
            raise ValueError(
                f"train.batch_size={self.batch_size} is the global batch: it must be at least "
                f"train.processes={self.processes}"
            )
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"train.crop_scale must be 0 < low <= high <= 1, got {list(self.crop_scale)}")
        return self

    def _check_epoch_counts(self) -> None:
        """Every key counted in epochs must stay below ``epochs``. All conflicts are named at once,
        with the one set of overrides that resolves them: shortening a run (``--set train.epochs=2``)
        used to be refused one key at a time, three tries for one change."""
        conflicts, fixes = [], []
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            kept = [m for m in self.milestones if 0 < m < self.epochs]
            conflicts.append(f"train.milestones={self.milestones} (each must be below epochs)")
            fixes.append(f"train.milestones=[{','.join(map(str, kept))}]")
        if self.warmup_epochs >= self.epochs:
            conflicts.append(f"train.warmup_epochs={self.warmup_epochs} (must be below epochs)")
            fixes.append("train.warmup_epochs=0")
        if self.freeze_backbone_epochs >= self.epochs:
            conflicts.append(
                f"train.freeze_backbone_epochs={self.freeze_backbone_epochs} (must be below epochs, or "
                "the backbone never trains)"
            )
            fixes.append("train.freeze_backbone_epochs=0")
        if conflicts:
            command = " ".join(f"--set {f}" for f in [f"train.epochs={self.epochs}", *fixes])
            raise ValueError(
                f"train.epochs={self.epochs} conflicts with {' and '.join(conflicts)}; change them "
                f"together, e.g. {command} (or the same keys in params.yaml)"
            )


class CheckpointConfig(_Frozen):
    """A model trained elsewhere (:mod:`oodgate.learning.importing`): imported instead of trained. ``path`` is
    relative to the project; with ``{seed}`` in it, one checkpoint per seed (``models/isomax_{seed}.pth``),
    without, one checkpoint for every seed (the gate's evidence then rests on the test samples alone).
    ``format``: ``oodgate``, ``torchvision``, ``entropic`` (the IsoMax/IsoMax+/DisMax papers' code) or
    ``logitnorm`` (the LogitNorm paper's code). ``mean``/``std``: the input normalisation the
    checkpoint was trained with (default: the training split's)."""

    path: str = Field(min_length=1)
    format: Literal["oodgate", "torchvision", "entropic", "logitnorm"]
    mean: list[float] | None = None
    std: list[float] | None = None

    @property
    def per_seed(self) -> bool:
        return "{seed}" in self.path

    @model_validator(mode="after")
    def _mean_with_std(self) -> CheckpointConfig:
        if (self.mean is None) != (self.std is None) or (
            self.mean is not None and len(self.mean) != len(cast("list[float]", self.std))
        ):
            raise ValueError("checkpoint.mean and checkpoint.std go together, one value per channel each")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"checkpoint.std must be positive, got {self.std}")
        return self


AUTO_SCORE = "auto"  # losses.<id>.score: the method's score with the lowest FPR95 on data.ood_val


class LossConfig(_Frozen):
    """One entry of ``losses:``; the key in params.yaml is the loss id (``dismax_fpr``)."""

    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    score: str | None = Field(
        default="auto",
        description="OOD score: auto (the method's score with the lowest FPR95 on data.ood_val), a score's "
        "name, or null (the method's default)",
    )
    checkpoint: CheckpointConfig | None = Field(
        default=None, description="a model trained elsewhere: imported instead of trained"
    )


class CalibrationConfig(_Frozen):
    objective: Literal["nll", "ece"] = "nll"


class CriterionConfig(_Frozen):
    """One gate criterion's test against the baseline: ``superior`` (the candidate must be better by
    more than ``margin``) or ``noninferior`` (it must not be worse by more than ``margin``, the
    tolerance)."""

    test: Literal["superior", "noninferior"]
    margin: float = Field(default=0.0, ge=0.0, le=1.0)

    @property
    def bound(self) -> float:
        """What the gain (or, with a confidence, its lower confidence bound) must exceed."""
        return self.margin if self.test == "superior" else -self.margin


class FPR95CriterionConfig(CriterionConfig):
    """``over``: which FPR95 is tested: the ``mean`` over all OOD sets, each OOD group's mean
    (``groups``: near and far, each a criterion), or the ``worst`` set."""

    test: Literal["superior", "noninferior"] = "superior"
    over: Literal["mean", "groups", "worst"] = "mean"


_OLD_GATE_KEYS = {
    "accuracy_margin": "gate.accuracy: {test: noninferior, margin: 0.005}",
    "ece_margin": "gate.ece: {test: noninferior, margin: 0.01}",
    "fpr95_margin": "gate.fpr95: {test: superior, margin: 0.0, over: mean}",
}


class GateConfig(_Frozen):
    """The promotion rule (``oodgate/deciding/gate.py`` states the tests). A candidate is promoted when, against
    the baseline, every criterion passes its test (``accuracy`` and ``ece``: not worse beyond their
    tolerance; ``fpr95``: better) with confidence ``confidence`` (null: on the point estimates only),
    Holm-adjusted over the run's candidates, and, with ``better_means``, its point estimates are
    better on all three (the rule "accuracy, ECE and FPR95 all beat SoftMax", literally).

    ``evidence``: ``models`` compares each loss's deployable model (one seed, chosen on validation
    data) with the baseline's, paired on the same test and OOD images; ``seeds`` compares the means
    over seeds (Welch over seeds plus the images' bootstrap). ``samples``: bootstrap resamples of the
    test and OOD images."""

    baseline: str = "softmax"
    evidence: Literal["models", "seeds"] = Field(
        default="models",
        description="models: the deployable models on the same images (paired); seeds: the means over seeds",
    )
    better_means: bool = Field(
        default=True,
        description="the point estimates (the deployable model's metrics, or the means over seeds) must "
        "be better than the baseline's on every criterion",
    )
    accuracy: CriterionConfig = CriterionConfig(test="noninferior", margin=0.005)
    ece: CriterionConfig = CriterionConfig(test="noninferior", margin=0.01)
    fpr95: FPR95CriterionConfig = FPR95CriterionConfig()
    confidence: float | None = Field(default=0.95, gt=0.5, lt=1.0)
    samples: int = Field(default=1000, ge=100, le=100_000)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        if "bootstrap" in v:
            raise ValueError(
                "gate.bootstrap was replaced: the gate always tests its evidence at gate.confidence "
                "(default 0.95; null compares means only) with gate.samples bootstrap resamples and "
                "gate.seed; remove the bootstrap section"
            )
        old = [k for k in _OLD_GATE_KEYS if k in v]
        if old:
            raise ValueError(
                f"gate.{old[0]} was replaced: each criterion has its own test and margin, e.g. "
                f"{_OLD_GATE_KEYS[old[0]]} (the defaults); remove {', '.join('gate.' + k for k in old)}"
            )
        if isinstance(v.get("fpr95"), str):
            raise ValueError(
                f"gate.fpr95 is a section now: write gate.fpr95: {{over: {v['fpr95']}}} (with test: superior "
                "and margin: 0.0 by default)"
            )
        return v


class RegistryConfig(_Frozen):
    model_name: str = Field(default="oodgate-classifier", min_length=1)
    experiment: str = Field(default="oodgate", min_length=1)


class ScheduleConfig(_Frozen):
    cron: str = "0 3 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"must be a 5-field cron expression like '0 3 * * *', got {v!r}")
        return v


# A batch of 100,000 images of 32x32x3 is 1.2 GB as float32; a 381 KB .npz of zeros held 500,000.
MAX_BATCH_IMAGES = 100_000


class MonitorConfig(_Frozen):
    """The monitoring flow (``flows/monitor.py``): score incoming batches with the champion.

    ``batch`` is the path the scheduled monitoring deployment scores (a folder of images or an
    ``.npz``; null: ``make serve`` serves no monitoring deployment). A batch's OOD rate is tested
    against ``expected_ood_rate`` (null: one minus the threshold's validation TPR, 0.05) with a
    two-sided exact test at level ``alpha``: ``binomial`` takes the expected rate as exact;
    ``beta_binomial`` also accounts for the threshold having been set on a finite validation set.
    """

    batch: str | None = None
    alias: str = Field(default="champion", min_length=1)
    experiment: str = Field(default="oodgate-monitor", min_length=1)
    alpha: float = Field(default=0.01, gt=0.0, lt=0.5)
    test: Literal["binomial", "beta_binomial"] = "beta_binomial"
    expected_ood_rate: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_images: int = Field(
        default=MAX_BATCH_IMAGES,
        ge=1,
        description="most images one batch may hold, checked before it is read (an .npz from its "
        "header, a folder by its file count): a small compressed file can hold gigabytes",
    )
    schedule: ScheduleConfig = ScheduleConfig(cron="0 * * * *")

    @model_validator(mode="after")
    def _expected_rate_or_validation(self) -> MonitorConfig:
        if self.test == "beta_binomial" and self.expected_ood_rate is not None:
            raise ValueError(
                "monitor.expected_ood_rate is set, but the beta_binomial test takes the expected rate "
                "from the champion's validation scores; set expected_ood_rate: null, or test: binomial"
            )
        return self


class OrchestrationConfig(_Frozen):
    """Where the flow's tasks run (no result depends on it): ``threads`` (one training at a time in
    the flow's process) or ``dask``: the Dask scheduler at ``address``, or a local cluster of
    ``workers`` processes when no address is given. The work directory must be a path every Dask
    worker sees (a shared file system on several machines)."""

    task_runner: Literal["threads", "dask"] = "threads"
    address: str | None = Field(
        default=None, min_length=1, description="tcp://host:8786 of a running scheduler"
    )
    workers: int = Field(default=2, ge=1, le=1024, description="processes of the local Dask cluster")

    @model_validator(mode="after")
    def _address_for_dask(self) -> OrchestrationConfig:
        if self.address is not None and self.task_runner != "dask":
            raise ValueError(
                f"orchestration.address={self.address!r} is a Dask scheduler, but task_runner is "
                f"{self.task_runner!r}; set orchestration.task_runner: dask, or remove the address"
            )
        return self


class NumericsConfig(_Frozen):
    """How the CPU computes (:mod:`oodgate.base.numerics`). ``portable``: the same bits on any x86-64 CPU
    with AVX2 (MKL, oneDNN, ATen and NumPy pinned to their AVX2 kernels, ``threads`` threads);
    ``native``: this machine's fastest kernels, results repeatable on the same CPU model only.
    Results depend on both keys, so both are in every fingerprint."""

    mode: Literal["portable", "native"] = "portable"
    threads: int | None = Field(
        default=2,
        ge=1,
        le=1024,
        description="intra-op threads of every computing process (null, native only: torch's default)",
    )

    @model_validator(mode="after")
    def _fixed_threads_when_portable(self) -> NumericsConfig:
        if self.mode == "portable" and self.threads is None:
            raise ValueError(
                "numerics.threads: null (the machine's core count) would make results depend on the "
                "machine; portable numerics need a fixed count (e.g. 2), or set numerics.mode: native"
            )
        return self


class Config(_Frozen):
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    losses: dict[str, LossConfig] = Field(min_length=1)
    calibration: CalibrationConfig = CalibrationConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    monitor: MonitorConfig = MonitorConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    numerics: NumericsConfig = NumericsConfig()
    workdir: str = "artifacts"

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("must be distinct non-negative integers")
        return v

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        # The names of backbones, datasets, OOD sets, methods and scores are checked against their
        # registries by oodgate.running.preflight.check_names: the registries import torch, the schema does not.
        seen: set[str] = set()
        for source in self.data.ood:
            if not OOD_NAME.fullmatch(source.name):
                raise ValueError(
                    f"data.ood: the name {source.name!r} is not allowed: it names files and metrics "
                    f"(ood/<name>/fpr95), so use {OOD_NAME_RULE} (e.g. "
                    f"{re.sub(r'[^A-Za-z0-9_.-]', '_', source.name).lstrip('.') or 'my_set'!r})"
                )
            if source.name in seen:
                raise ValueError(f"data.ood lists {source.name!r} twice; list each OOD set once")
            seen.add(source.name)
            if source.path is not None and source.group is None:
                raise ValueError(
                    f"data.ood: {source.name!r} needs a group: near (unseen classes, letters, other "
                    "datasets of the same kind) or far (photos, noise, unrelated images)"
                )
        val_seen: set[str] = set()
        for source in self.data.ood_val:
            if not OOD_NAME.fullmatch(source.name):
                raise ValueError(
                    f"data.ood_val: the name {source.name!r} is not allowed: it names metrics "
                    f"(selection/<score>/fpr95), so use {OOD_NAME_RULE}"
                )
            if source.name in val_seen:
                raise ValueError(
                    f"data.ood_val lists {source.name!r} twice; list each validation OOD set once"
                )
            val_seen.add(source.name)
            if source.name in seen:
                raise ValueError(
                    f"data.ood_val: {source.name!r} is also a test OOD set (data.ood); validation OOD data must be "
                    "disjoint from every test OOD set, or choosing a score on it would tune on the test: "
                    "use another set (the demo's: glyphs, portrait_patches)"
                )
        for key in self.losses:
            if not key.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"losses.{key}: loss ids may hold letters, digits, '_' and '-' only")
        if self.gate.evidence == "seeds" and self.gate.confidence is not None and len(self.seeds) < 2:
            raise ValueError(
                f"gate.evidence=seeds at gate.confidence={self.gate.confidence} needs at least 2 seeds to "
                f"measure the seed noise, got seeds={self.seeds}; list more seeds (3 or more recommended), "
                "set gate.evidence: models (the deployable models compared on the same images), or set "
                "gate.confidence: null to compare means without evidence"
            )
        base = self.losses.get(self.gate.baseline)
        if base is None:
            raise ValueError(
                f"gate.baseline={self.gate.baseline!r} is not a key of losses "
                f"({', '.join(self.losses)}); add a softmax entry under that key"
            )
        if base.method != "softmax":
            raise ValueError(
                f"gate.baseline={self.gate.baseline!r} must use method 'softmax', got {base.method!r}"
            )
        return self

    def in_project(self, project: str | Path) -> Config:
        """This config with ``model.weights`` and the losses' checkpoints taken from ``project`` when
        relative (the flow runs from any working directory; fingerprints hold the files' digests,
        not their paths)."""
        update: dict[str, Any] = {}
        w = self.model.weights
        if w is not None and not Path(w).is_absolute():
            update["model"] = self.model.model_copy(update={"weights": str(Path(project) / w)})
        losses = dict(self.losses)
        for key, loss in self.losses.items():
            c = loss.checkpoint
            if c is not None and not Path(c.path).is_absolute():
                moved = c.model_copy(update={"path": str(Path(project) / c.path)})
                losses[key] = loss.model_copy(update={"checkpoint": moved})
        if losses != dict(self.losses):
            update["losses"] = losses
        return self.model_copy(update=update) if update else self

    def seeds_of(self, loss_id: str) -> list[int]:
        """The seeds of a loss: every seed, but one for a single imported checkpoint (the same model)."""
        c = self.losses[loss_id].checkpoint
        return list(self.seeds[:1]) if c is not None and not c.per_seed else list(self.seeds)

    def loss_ids(self) -> list[str]:
        return list(self.losses)

    def candidates(self) -> list[str]:
        return [k for k in self.losses if k != self.gate.baseline]


def _format_errors(err: ValidationError, source: str) -> str:
    """One line, whatever the number of problems: the entry points print it after ``error:``."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml in the repository for valid keys)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        # a section's own check names its keys already (train.epochs=2 conflicts with ...)
        named = not key or re.match(rf"{re.escape(key)}[.=: ]", msg)
        problems.append(f"{msg}{shown}" if named else f"{key}: {msg}{shown}")
    return f"invalid configuration in {source}: {'; '.join(problems)}"


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


class _AliasRefused(Exception):
    def __init__(self, alias: str, line: int) -> None:
        self.alias, self.line = alias, line


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing every alias (``*a``): 9 levels of 10 aliases, a few hundred
    bytes, expand to 10**9 values ("billion laughs": 1 GB in 24 s, then killed). Anchors (``&a``)
    alone are allowed: nothing refers to them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # PyYAML stub: unannotated
            raise _AliasRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` for YAML a user wrote (``params.yaml``, a ``--set`` value), refusing
    what can expand without bound: an alias, or nesting deeper than Python recurses, is a one-line
    :class:`ConfigError` naming ``source``; a syntax error is raised as ``yaml.YAMLError``."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    except _AliasRefused as e:
        raise ConfigError(
            f"{source}: line {e.line}: a YAML alias (*{e.alias}) is not allowed: aliases can expand "
            "without bound; write the value out (an anchor &name alone is allowed)"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{source}: the YAML is nested too deeply to read (over Python's recursion limit of "
            f"{sys.getrecursionlimit()}); write it with fewer levels"
        ) from None
    finally:
        loader.dispose()


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=2", "seeds=[0,1]"]`` -> ``{"train.epochs": 2, "seeds": [0, 1]}`` (YAML values)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {item!r}")
        try:
            shown = item if len(item) <= 80 else f"{item[:60]}... ({len(item)} characters)"
            overrides[key] = load_yaml(value, f"--set {shown!r}")
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: {value!r} is not a YAML value ({problem}); quote it, or write a list as [0, 1]"
            ) from None
    return overrides


def program_params(
    argv: list[str], default_root: str | Path | None = None, strict: bool = True
) -> tuple[Path, dict[str, Any]]:
    """The params file and the overrides a program's arguments name, read before its own parser runs:
    ``--params`` (relative to ``--root``, else to ``default_root``, else to the working directory) and
    ``--set KEY=VALUE``; other arguments are left to the program. A ``--set`` that is not ``KEY=VALUE``
    with a YAML value raises :class:`ConfigError`, or is left out when not ``strict``."""
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--root", default=None)
    p.add_argument("--set", action="append", default=[])
    known, _ = p.parse_known_args(argv)
    root = Path(known.root) if known.root else Path(default_root or Path.cwd())
    overrides: dict[str, Any] = {}
    for item in known.set:
        try:
            overrides.update(parse_overrides([item]))
        except ConfigError:
            if strict:
                raise
    return root / known.params, overrides


_LOADED: dict[tuple[str, str, str], Config] = {}  # (path, text, overrides) -> the validated config


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate ``params.yaml``; ``overrides`` are dotted keys (``train.epochs``).

    Parsed once per process: the same file text with the same overrides returns the config validated
    the first time (a program's entry point, its flow and its Dask re-entry all ask for it). The key
    is the text itself, so an edited file is parsed again."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} not found; run from the repository root or pass its path"
        )
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        # e.g. an image or a model file given as --params: its bytes are not UTF-8 text
        raise ConfigError(
            f"{path} is not a text YAML file (byte {e.start} is not UTF-8: {e.object[e.start : e.start + 1]!r}); "
            "pass the params file, e.g. --params params.yaml"
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror or e})") from None
    key = (str(path.resolve()), text, json.dumps(overrides or {}, sort_keys=True, default=repr))
    if key not in _LOADED:
        if len(_LOADED) >= 32:
            _LOADED.clear()
        _LOADED[key] = _parse_text(text, path, overrides)
    return _LOADED[key]


def _parse_text(text: str, path: Path, overrides: dict[str, Any] | None) -> Config:
    try:
        raw = load_yaml(text, str(path)) or {}
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())  # YAML's message spans lines; the entry points print one
        raise ConfigError(f"{path} is not valid YAML: {problem}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                prefix = ".".join(parents[: i + 1])
                raise ConfigError(
                    f"override {dotted}={value!r}: {prefix} is a value ({node!r}), not a section; "
                    f"set {prefix}=... instead"
                )
        node[leaf] = value
    return parse_config(raw, str(path))
