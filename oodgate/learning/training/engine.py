"""One training loop for every method, and the batched inference used by evaluation.

The loop never branches on the method: it calls ``head.transform_batch``, ``head.loss`` and
``head.hard_targets`` and nothing else method-specific. All randomness (shuffling, augmentation,
DisMax's mosaics) comes from one ``torch.Generator`` seeded by the run's seed and saved in every
checkpoint, so on the CPU the same inputs give the same weights to the last bit, and a run resumed
from its last checkpoint equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
import torch.utils.data

from oodgate.base import numerics
from oodgate.base.config import Config, TrainConfig
from oodgate.data.bundle import ImageSet
from oodgate.learning.classifier import Classifier, build_classifier, read_checkpoint, save_classifier

LAST = "last.pt"  # full training state, rewritten every epoch (resume)
BEST = "best.pt"  # weights of the epoch with the best validation accuracy (the model)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; training stops instead of logging garbage."""


class TrainingInterrupted(RuntimeError):
    """:data:`STOP` was set (SIGINT/SIGTERM in the entry point): training stopped after the batch it
    was in, leaving the last epoch's checkpoint to resume from."""


class Stop(threading.Event):
    """An event that keeps what set it first (``SIGTERM``), for the messages of whoever unwinds."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self._first = threading.Lock()

    def set(self, reason: str = "") -> None:
        with self._first:
            if not self.is_set():
                self.reason = reason
            super().set()


# Set by an entry point's signal handler (or the flow, when Prefect's own SIGTERM handler raised
# instead); every training loop in the process checks it per batch, so an interrupt stops a run
# within one batch instead of after the epoch (or the whole run).
STOP = Stop()


def stop(reason: str) -> None:
    """Set :data:`STOP` in this process; a function of the module, so that a flow can run it in the
    processes of its Dask workers (``Client.run``), which its signal never reaches."""
    STOP.set(reason)


def resolve_device(requested: str = "auto") -> torch.device:
    """``cuda`` (the local rank's GPU in a data-parallel launch) or ``cpu``."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(requested)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel launch (``oodgate.learning.training.distributed``, or ``torchrun`` across
    machines): ``rank`` of ``world`` processes (1: alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed() -> Distributed:
    """The initialised default process group, if any (``oodgate.learning.training.distributed`` initialises it)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Distributed(td.get_rank(), td.get_world_size())
    return Distributed()


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.5) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < fraction * free


def to_float(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on ``device``."""
    out = x.to(device, non_blocking=True).float().div_(255.0)
    if channels_last and device.type == "cuda" and out.ndim == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-image random resized crop (torchvision's ``RandomResizedCrop`` sampling: area fraction in
    ``scale``, log-uniform aspect ratio in ``ratio``, up to 10 tries, else the whole image), resized
    back to the input size by bilinear sampling (``roi_align``), all images of the batch at once."""
    from torchvision.ops import roi_align

    b, _, h, w = x.shape
    tries = 10
    area = h * w * torch.empty(b, tries).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    u = torch.rand(b, 2, generator=generator)
    rows = torch.arange(b)
    cw = torch.where(first >= 0, cw[rows, first.clamp(min=0)], torch.full((b,), float(w)))
    ch = torch.where(first >= 0, ch[rows, first.clamp(min=0)], torch.full((b,), float(h)))
    x0 = (u[:, 0] * (w - cw + 1)).floor()
    y0 = (u[:, 1] * (h - ch + 1)).floor()
    boxes = torch.stack([rows.float(), x0, y0, x0 + cw, y0 + ch], 1).to(x.device, x.dtype)
    return cast(
        torch.Tensor,
        roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True),
    )


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(
    x: torch.Tensor,
    kind: str,
    generator: torch.Generator,
    padding: int = 4,
    scale: tuple[float, float] = (0.25, 1.0),
) -> torch.Tensor:
    """Per-image augmentation driven by ``generator``: ``crop`` (random crop with zero padding
    ``padding``), ``resized_crop`` (:func:`resized_crop` with area fraction ``scale``), each
    optionally followed by a horizontal flip (``*_flip``)."""
    if kind == "none":
        return x
    if kind.startswith("resized_crop"):
        out = resized_crop(x, scale, generator)
        return _flip(out, generator) if kind.endswith("_flip") else out
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    return _flip(out, generator) if kind == "crop_flip" else out


@dataclass
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_nll: float
    val_accuracy: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    device: str
    seconds: float
    resumed_from_epoch: int = 0


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict_logits(
    model: Classifier,
    x: torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> torch.Tensor:
    """Model outputs (calibrated logits) for uint8 images, as float32 on the CPU."""
    device = torch.device(device)
    model.eval().to(device)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        with _autocast(device, amp):
            out = model(to_float(x[i : i + batch_size], device, channels_last=True))
        outs.append(out.float().cpu())
    if not outs:
        return torch.empty(0, model.spec.num_classes)
    return torch.cat(outs)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``train.lr``.

    ``min(1, (step + 1) / (warmup_epochs * steps_per_epoch)) * gamma ** (milestones passed)``: a
    linear warm-up over the first ``warmup_epochs`` epochs (Goyal et al., 2017), then ``gamma`` at
    the start of every epoch listed in ``milestones`` (epochs counted from 1, as ``MultiStepLR``).
    The warm-up matters for scale-invariant losses: LogitNorm's loss ignores ``||z||``, so its
    gradient scales with ``1 / ||z||``; at initialisation ``||z||`` is below 1, and the first
    full-size steps throw it to hundreds, after which every step is hundreds of times too small.
    """
    warm = cfg.warmup_epochs * steps_per_epoch
    ramp = min(1.0, (step + 1) / warm) if warm else 1.0
    epoch = step // steps_per_epoch  # 0-based: milestone m decays from epoch m + 1 on
    return ramp * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)


def _make_optimizer(
    model: Classifier, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    # Weight decay on every parameter, prototypes and distance_scale included (the papers' recipe).
    # Two groups: the backbone at train.backbone_lr * lr (fine-tuning), the head at lr.
    groups = [
        {"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr},
        {"params": [p for n, p in model.named_parameters() if not n.startswith("backbone.")], "lr": cfg.lr},
    ]
    opt = torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps_per_epoch, cfg))
    return opt, sched


def validate(model: Classifier, val: ImageSet, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """The validation NLL and accuracy training selects its epoch on."""
    # At the training batch size: ``eval_batch_size`` is an evaluation-only key, and selecting the
    # epoch must not depend on it (or changing it would have to retrain).
    logits = predict_logits(model, val.x, cfg.batch_size, device, cfg.amp)
    nll = F.cross_entropy(logits.double(), val.y).item()
    acc = (logits.argmax(1) == val.y).double().mean().item()
    return nll, acc


@dataclass
class Run:
    """The state of one training run: what ``last.pt`` saves and a resume restores, and what the
    :class:`Hook` objects of :func:`train` see."""

    model: Classifier
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    device: torch.device
    cfg: TrainConfig
    history: list[dict[str, float]]
    best_acc: float = -1.0
    best_epoch: int = 0
    start_epoch: int = 0
    net: torch.nn.Module | None = None  # what the forward pass goes through: the model, or its DDP wrapper
    dist: Distributed = Distributed()

    def restore(self, last_path: Path, fingerprint: str) -> None:
        """Resume from ``last.pt`` if it was written under the same ``fingerprint``; an unreadable
        one (truncated by a crash of the disk, not of the run: saves are atomic) starts over."""
        try:
            state = read_checkpoint(last_path) if last_path.is_file() else None
        except Exception as e:  # torch's zip reader raises RuntimeError, pickle others
            logging.getLogger("oodgate").warning("%s is unreadable (%s); training from scratch", last_path, e)
            state = None
        if state is None or state.get("fingerprint", "") != fingerprint:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["rng"])
        self.history, self.best_acc, self.best_epoch = (
            state["history"],
            state["best_val_accuracy"],
            state["best_epoch"],
        )
        self.start_epoch = state["epoch"]

    def save_last(self, path: Path, epoch: int, fingerprint: str) -> None:
        save_classifier(
            self.model,
            path,
            epoch=epoch,
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict(),
            rng=self.gen.get_state(),
            fingerprint=fingerprint,
            history=[without_timing(h) for h in self.history],
            best_val_accuracy=self.best_acc,
            best_epoch=self.best_epoch,
        )


def _start(model_factory: Callable[[], Classifier], cfg: TrainConfig, seed: int, steps_per_epoch: int) -> Run:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model_factory().to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = _make_optimizer(model, cfg, steps_per_epoch)
    return Run(
        model, opt, sched, torch.Generator().manual_seed(seed), device, cfg, history=[], dist=distributed()
    )


def _wrap(run: Run) -> None:
    """In a data-parallel launch: DistributedDataParallel around the model (after a resume restored its
    weights); on CUDA its batch-norm layers synchronise their statistics across processes."""
    if run.dist.world == 1:
        run.net = run.model
        return
    from torch.nn.parallel import DistributedDataParallel

    model = run.model
    if run.device.type == "cuda":
        # (torch's convert_sync_batchnorm is unannotated)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
        run.net = DistributedDataParallel(model, device_ids=[run.device.index])
    else:
        run.net = DistributedDataParallel(model)


class _Gather(torch.utils.data.Dataset[torch.Tensor]):
    """Batch ``i`` of an epoch: the images at ``batches[i]`` (read from a memory map in a worker)."""

    def __init__(self, x: torch.Tensor, batches: list[torch.Tensor]) -> None:
        self.x, self.batches = x, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[self.batches[i]]


def _batches(x_all: torch.Tensor, perm: torch.Tensor, bs: int, workers: int) -> Iterator[torch.Tensor]:
    """The uint8 batches of one epoch in ``perm`` order: gathered here, or by ``workers`` DataLoader
    processes that read ahead (images on the CPU only; the batches are the same either way)."""
    if workers == 0 or x_all.device.type != "cpu":
        return (x_all[perm[i : i + bs]] for i in range(0, perm.numel(), bs))
    loader = torch.utils.data.DataLoader(
        _Gather(x_all, list(perm.split(bs))),  # type: ignore[no-untyped-call]  # torch: Tensor.split untyped
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4,
    )
    return iter(loader)


def _train_epoch(
    run: Run, x_all: torch.Tensor, y_all: torch.Tensor, epoch: int, workers: int = 0
) -> tuple[float, float]:
    """One pass over the training split; returns (mean loss, accuracy on the hard targets)."""
    model, device, gen, head, cfg = run.model, run.device, run.gen, run.model.head, run.cfg
    model.train()
    frozen = epoch <= cfg.freeze_backbone_epochs
    model.backbone.requires_grad_(not frozen)  # frozen: no gradients, no updates, no weight decay
    if frozen:
        model.backbone.eval()  # and its batch-norm statistics stay those of the pretrained weights
    n, bs = x_all.shape[0], cfg.batch_size
    net = run.net or model
    perm = torch.randperm(n, generator=gen).to(x_all.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    for i, xu in zip(range(0, n, bs), _batches(x_all, perm, bs, workers)):
        if STOP.is_set():
            raise TrainingInterrupted(f"training interrupted at epoch {epoch}, batch {i // bs + 1}")
        idx = perm[i : i + bs]
        xb = to_float(xu, device)
        yb = y_all[idx.to(device)]
        xb = augment(xb, cfg.augment, gen, scale=cfg.crop_scale)
        xb, yb, weight = _share(run, xb, yb)
        if cfg.channels_last and device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            logits = net(xb)
            loss = head.loss(logits.float(), yb)
            if weight != 1.0:
                loss = loss * weight
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss {loss.item()} at epoch {epoch}, batch {i // bs + 1} "
                f"(method {model.spec.method!r}, lr {run.sched.get_last_lr()[0]}); lower train.lr or check the data"
            )
        run.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward unannotated
        run.opt.step()
        run.sched.step()  # the schedule is per step: the warm-up ramps within the first epochs
        loss_sum += loss.detach().double() / weight * xb.shape[0]
        correct += (logits.detach().argmax(1) == head.hard_targets(yb)).sum()
        seen += xb.shape[0]
    return _epoch_figures(run.dist, loss_sum, correct, seen)


def _share(run: Run, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The part of the augmented global batch this process trains on, transformed by the method
    (``head.transform_batch``: DisMax's mosaics), and the weight of its loss."""
    head, dist, gen = run.model.head, run.dist, run.gen
    if dist.world == 1:
        xb, yb = head.transform_batch(xb, yb, generator=gen)
        return xb, yb, 1.0
    # Every process draws the whole global batch's permutation and augmentation from the same
    # generator, then trains on its contiguous share; mosaics (DisMax) are formed within the
    # share from a generator of its own, seeded from the shared one (which all keep in step).
    # Its loss is weighted by its share of the batch, so DDP's mean of the gradients is the
    # gradient of the global batch's mean loss (equal shares but for the last batch).
    share = torch.tensor_split(torch.arange(xb.shape[0]), dist.world)[dist.rank].to(run.device)
    weight = share.numel() * dist.world / xb.shape[0]
    xb, yb = xb[share], yb[share]
    local = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + dist.rank)
    xb, yb = head.transform_batch(xb, yb, generator=local)
    return xb, yb, weight


def _epoch_figures(
    dist: Distributed, loss_sum: torch.Tensor, correct: torch.Tensor, seen: torch.Tensor
) -> tuple[float, float]:
    """(mean loss, accuracy) of the epoch, over every process's share in a data-parallel launch."""
    if dist.world > 1:
        import torch.distributed as td

        totals = torch.stack([loss_sum, correct.double(), seen.double()])
        td.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], totals[2]
    return (loss_sum / seen).item(), correct.item() / seen.item()


class Hook:
    """A part of :func:`train`'s loop that is not training itself (detectron2's hooks): each method is
    called with the :class:`Run`. ``before_train`` runs in every process, after the model and the
    optimiser are built and before a data-parallel wrapper is put around the model;
    ``after_epoch`` runs in the first process only (the one that validates and selects), after the
    epoch's selection; ``after_train`` runs in every process once the last epoch is done. Hooks run
    in the order given."""

    def before_train(self, run: Run) -> None:
        pass

    def after_epoch(self, run: Run, stats: EpochStats) -> None:
        pass

    def after_train(self, run: Run) -> None:
        pass


class Checkpointer(Hook):
    """``out_dir/last.pt`` (everything needed to resume) after every epoch and ``out_dir/best.pt``
    (the selected weights) when an epoch is selected. Before training, resumes from a ``last.pt``
    written under the same ``fingerprint`` (of everything training depends on); one written under
    other inputs is ignored and overwritten."""

    def __init__(self, out_dir: str | Path, fingerprint: str = "") -> None:
        self.dir = Path(out_dir)
        self.fingerprint = fingerprint

    def before_train(self, run: Run) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        run.restore(self.dir / LAST, self.fingerprint)

    def after_epoch(self, run: Run, stats: EpochStats) -> None:
        if run.best_epoch == stats.epoch:
            save_classifier(run.model, self.dir / BEST, epoch=stats.epoch)
        run.save_last(self.dir / LAST, stats.epoch, self.fingerprint)


#: A prototype head's prototypes have "not moved" when each one's cosine with its initial direction
#: is still at least this at the end of training (every one turned by less than 8.1 degrees).
PROTOTYPES_STILL = 0.99


def prototype_figures(prototypes: torch.Tensor, initial: torch.Tensor) -> dict[str, float]:
    """The prototypes' mean norm and, where they started away from 0, each prototype's cosine with
    its initial direction (min and mean over the prototypes); IsoMax's start at 0, which has no
    direction, so only its norm is reported."""
    p, p0 = prototypes.detach().double().cpu(), initial.detach().double().cpu()
    out = {"prototype_norm": float(p.norm(dim=1).mean())}
    if bool((p0.norm(dim=1) > 0).all()):
        cos = torch.nn.functional.cosine_similarity(p, p0, dim=1)
        out["prototype_cosine_min"] = float(cos.min())
        out["prototype_cosine_mean"] = float(cos.mean())
    return out


class PrototypeWatch(Hook):
    """For a head with prototypes (IsoMax, IsoMax+, DisMax): after every epoch, their mean norm and
    cosine with their initial directions (:func:`prototype_figures`) in the epoch's history. Put it
    before the :class:`Checkpointer`, so that it sees the prototypes a resumed run started from."""

    def __init__(self) -> None:
        self.initial: torch.Tensor | None = None

    def before_train(self, run: Run) -> None:
        prototypes = getattr(run.model.head, "prototypes", None)
        self.initial = prototypes.detach().clone().cpu() if prototypes is not None else None

    def after_epoch(self, run: Run, stats: EpochStats) -> None:
        if self.initial is not None:
            run.history[-1].update(
                prototype_figures(cast(torch.Tensor, run.model.head.prototypes), self.initial)
            )


def prototypes_still(history: Sequence[dict[str, float]]) -> str | None:
    """One line when the last epoch's prototypes have not moved (:data:`PROTOTYPES_STILL`): what it
    means and what to change; None when they moved or there are none."""
    if not history or "prototype_cosine_min" not in history[-1]:
        return None
    last = history[-1]
    if last["prototype_cosine_min"] < PROTOTYPES_STILL:
        return None
    return (
        f"the prototypes have not moved: after {len(history)} epochs each is within 8 degrees of its random "
        f"start (cosine >= {last['prototype_cosine_min']:.3f}, norm {last['prototype_norm']:.2f}), so the "
        "distance scores (mmles, mds) measure features against random directions; train longer (the papers: "
        "300 epochs with weight decay, which shrinks the prototypes so they turn) or choose the score on "
        "validation OOD data (score: auto)"
    )


class ProgressBar(Hook):
    """A tqdm bar over the epochs with the last epoch's loss and accuracies (first process only)."""

    def __init__(self) -> None:
        self.bar = None

    def before_train(self, run: Run) -> None:
        if run.dist.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=run.cfg.epochs, initial=run.start_epoch, unit="epoch", leave=False, dynamic_ncols=True
            )

    def after_epoch(self, run: Run, stats: EpochStats) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{stats.train_loss:.4f}",
                acc=f"{stats.train_accuracy:.3f}",
                val_acc=f"{stats.val_accuracy:.3f}",
            )
            self.bar.update(1)

    def after_train(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()


def _epoch(
    run: Run, x_all: torch.Tensor, y_all: torch.Tensor, val_set: ImageSet, epoch: int, workers: int
) -> EpochStats | None:
    """Train one epoch, then (first process) validate it and select it if its accuracy is the best
    so far; the epoch's figures, or None in the other processes (which only train)."""
    te = time.perf_counter()
    lr = cast(float, run.sched.get_last_lr()[0])
    train_loss, train_acc = _train_epoch(run, x_all, y_all, epoch, workers)
    if not run.dist.main:
        run.history.append({"epoch": epoch, "train_loss": train_loss})
        return None
    val_nll, val_acc = validate(run.model, val_set, run.cfg, run.device)
    stats = EpochStats(epoch, lr, train_loss, train_acc, val_nll, val_acc, time.perf_counter() - te)
    run.history.append(stats.as_dict())
    if val_acc > run.best_acc:
        run.best_acc, run.best_epoch = val_acc, epoch
    return stats


def train(
    model_factory: Callable[[], Classifier],
    train_set: ImageSet,
    val_set: ImageSet,
    cfg: TrainConfig,
    seed: int,
    hooks: Sequence[Hook] = (),
    workers: int = 0,
) -> TrainResult:
    """Train with SGD (+Nesterov) and :func:`lr_factor`'s schedule; select the epoch by validation accuracy.

    Everything besides training goes through ``hooks`` (:class:`Hook`): :class:`Checkpointer` resumes
    and writes the checkpoints, :class:`ProgressBar` shows progress. Training stops early only by
    :data:`STOP` (:class:`TrainingInterrupted`). ``workers`` DataLoader processes read the training
    batches ahead when the images stay on the CPU (a memory-mapped dataset larger than memory).
    """
    run = _start(model_factory, cfg, seed, steps_per_epoch=math.ceil(len(train_set) / cfg.batch_size))
    for hook in hooks:
        hook.before_train(run)
    _wrap(run)
    on_device = fits_on_device(train_set.x.numel() + val_set.x.numel(), run.device)
    x_all = train_set.x.to(run.device) if on_device else train_set.x
    y_all = train_set.y.to(run.device)
    t0 = time.perf_counter()
    for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
        stats = _epoch(run, x_all, y_all, val_set, epoch, workers)
        for hook in hooks if stats is not None else ():
            hook.after_epoch(run, cast(EpochStats, stats))  # not None: hooks is () then
    for hook in hooks:
        hook.after_train(run)
    if run.dist.main and (not math.isfinite(run.best_acc) or run.best_acc < 0):
        raise RuntimeError("no epoch finished; nothing to select")
    return TrainResult(
        history=run.history,
        best_epoch=run.best_epoch,
        best_val_accuracy=run.best_acc,
        device=str(run.device),
        seconds=time.perf_counter() - t0,
        resumed_from_epoch=run.start_epoch,
    )


# ---------------------------------------------------------------- where and how a process computes
def activate_numerics(cfg: Config, processes: int = 1) -> None:
    """Compute under ``cfg.numerics`` in this process (:func:`oodgate.base.numerics.activate`), each of
    ``processes`` data-parallel processes with its share of the threads."""
    threads = cfg.numerics.threads
    if threads is not None and processes > 1:
        threads = max(1, threads // processes)
    numerics.activate(cfg.numerics.mode, threads, resolve_device(cfg.train.device).type)


def inference_device(cfg: Config) -> tuple[str, bool]:
    """Where calibration, evaluation and export run: the device training resolved
    (``train.device``), with bf16 autocast exactly where training used it (``train.amp`` on CUDA)."""
    device = resolve_device(cfg.train.device)
    return str(device), cfg.train.amp and device.type == "cuda"


def without_timing(h: dict[str, float]) -> dict[str, float]:
    # Files that DVC versions hold no wall-clock times: the same inputs give the same bytes.
    return {k: v for k, v in h.items() if k != "seconds"}


__all__ = [
    "BEST",
    "LAST",
    "STOP",
    "Checkpointer",
    "EpochStats",
    "Hook",
    "NonFiniteLossError",
    "ProgressBar",
    "PrototypeWatch",
    "Run",
    "TrainResult",
    "TrainingInterrupted",
    "augment",
    "build_classifier",
    "lr_factor",
    "predict_logits",
    "resolve_device",
    "train",
    "without_timing",
]
