"""Time one training step and one inference pass of every loss method on the same backbone and batch.

Each method is the backbone plus the method's head; only the head (and, for ``dismax_fpr``, the
mosaic ``transform_batch``) differs, so the ratios to SoftMax are the methods' overhead. The target
is inference <= 1.05x SoftMax: a drop-in replacement must not slow serving down.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_methods.py                      # CPU default, < 1 min
    PYTHONPATH=. .venv/bin/python benchmarks/bench_methods.py --backbone resnet34 \\
        --image-size 32 --channels 3 --batch-size 128 --device cuda

Timings are the median of ``--repeats`` runs after ``--warmup`` untimed ones. The methods are timed
round-robin (one run of each in turn), so a slow spell of a shared machine hits them all alike.
On CUDA the model runs in channels_last with bf16 autocast, as in training, and every timing is
bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from oodgate.base import numerics

numerics.apply()  # before NumPy and torch load: the kernels the pipeline computes with (oodgate.base.numerics)

import torch
from torch import nn

from oodgate.learning import methods, models

#: benchmark row -> (registered method, options)
VARIANTS: dict[str, tuple[str, dict]] = {
    "softmax": ("softmax", {}),
    "isomax": ("isomax", {}),
    "isomax_plus": ("isomax_plus", {}),
    "dismax": ("dismax", {}),
    "dismax_fpr": ("dismax", {"fpr": True}),
    "logitnorm": ("logitnorm", {}),
}
BASELINE = "softmax"
INFERENCE_TARGET = 1.05


@dataclass
class Candidate:
    backbone: nn.Module
    head: methods.Head
    optimizer: torch.optim.Optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="small_cnn", choices=models.names())
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--methods", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in VARIANTS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    if BASELINE not in args.methods:
        args.methods.insert(0, BASELINE)
    for name in ("batch_size", "repeats", "classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def build(args: argparse.Namespace, device: torch.device) -> dict[str, Candidate]:
    """One candidate per method, all starting from the same backbone weights."""
    torch.manual_seed(args.seed)
    backbone = models.create_backbone(args.backbone, args.channels, args.image_size)
    out: dict[str, Candidate] = {}
    for name in args.methods:
        method, options = VARIANTS[name]
        net = copy.deepcopy(backbone)
        head = methods.create(method, in_features=net.out_features, num_classes=args.classes, **options)
        net, head = net.to(device), head.to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        params = list(net.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        out[name] = Candidate(net, head, opt)
    return out


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    c: Candidate, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, device: torch.device
) -> None:
    """transform_batch + forward (backbone + head) + loss + backward + SGD step, as the engine does."""
    xb, yb = c.head.transform_batch(x, y, generator=gen)
    if device.type == "cuda":
        xb = xb.contiguous(memory_format=torch.channels_last)
    with autocast(device):
        logits = c.head(c.backbone(xb))
        loss = c.head.loss(logits.float(), yb)
    c.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    c.optimizer.step()


def inference(c: Candidate, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Forward (backbone + head) and the method's default OOD score."""
    with torch.inference_mode(), autocast(device):
        return c.head.score(c.head(c.backbone(x)).float())


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def round_robin(
    runs: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median milliseconds of each callable, interleaving the callables run by run."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(timed_ms(fn, device))
    return {name: statistics.median(s) for name, s in samples.items()}


def head_inference(c: Candidate, features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The head and its score alone, on cached features: the part that differs between methods."""
    with torch.inference_mode(), autocast(device):
        return c.head.score(c.head(features).float())


def benchmark(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    candidates = build(args, device)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.channels, args.image_size, args.image_size, generator=gen)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=gen)
    x, y = x.to(device), y.to(device)
    x_infer = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

    for c in candidates.values():
        c.backbone.train()
        c.head.train()
    train_ms = round_robin(
        {n: (lambda c=c: train_step(c, x, y, gen, device)) for n, c in candidates.items()},
        device,
        args.warmup,
        args.repeats,
    )
    for c in candidates.values():
        c.backbone.eval()
        c.head.eval()
    infer_ms = round_robin(
        {n: (lambda c=c: inference(c, x_infer, device)) for n, c in candidates.items()},
        device,
        args.warmup,
        args.repeats,
    )
    with torch.inference_mode(), autocast(device):
        features = candidates[BASELINE].backbone(x_infer)
    head_ms = round_robin(
        {n: (lambda c=c: head_inference(c, features, device)) for n, c in candidates.items()},
        device,
        args.warmup,
        args.repeats,
    )
    return {"train": train_ms, "inference": infer_ms, "head": head_ms}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}), bf16 autocast, channels_last"
    return "cpu, float32"


def table(ms: dict[str, dict[str, float]]) -> str:
    train, infer = ms["train"], ms["inference"]
    rows = [
        "| method | train step ms | train × softmax | inference ms | inference × softmax |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in train:
        rows.append(
            f"| {name} | {train[name]:.2f} | {train[name] / train[BASELINE]:.3f} "
            f"| {infer[name]:.2f} | {infer[name] / infer[BASELINE]:.3f} |"
        )
    return "\n".join(rows)


def head_table(ms: dict[str, dict[str, float]]) -> str:
    head, infer = ms["head"], ms["inference"]
    rows = ["| method | head + score ms | share of inference |", "|---|---:|---:|"]
    rows += [f"| {n} | {head[n]:.3f} | {head[n] / infer[n]:.1%} |" for n in head]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    ms = benchmark(args)
    print(f"device: {describe_device(resolve_device(args.device))}")
    print(f"torch: {torch.__version__}, threads: {torch.get_num_threads()}")
    print(
        f"backbone: {args.backbone} ({args.channels}x{args.image_size}x{args.image_size}), "
        f"batch: {args.batch_size}, classes: {args.classes}, "
        f"median of {args.repeats} runs after {args.warmup} warm-up runs"
    )
    print()
    print(table(ms))
    print()
    infer = ms["inference"]
    over = [n for n in infer if infer[n] > INFERENCE_TARGET * infer[BASELINE]]
    verdict = "all methods within it" if not over else f"over it: {', '.join(over)}"
    print(f"inference target <= {INFERENCE_TARGET:.2f}x softmax: {verdict}")
    print()
    print("head and score alone, on the cached features of the same batch:")
    print()
    print(head_table(ms))
    print()
    print(f"(benchmark took {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
