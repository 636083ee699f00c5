"""Images per second of a folder dataset on an ImageNet-style backbone: decoding, training, evaluation.

Writes a folder dataset of ``--images`` JPEGs (320x256, smooth colour fields with noise, like
photos in size and entropy), then for each ``--sizes`` side:

- **prepare**: the prepare step decoding the folder (EXIF, RGB, shorter side + centre crop) into
  the memory-mapped ``id.pt``, with ``--decode-workers`` processes: images/s;
- **train**: ``--steps`` SGD steps of the training loop's work on batches read from ``id.pt``
  (gather from the memory map, uint8 -> float, random resized crop + flip, forward, loss, backward,
  step), each phase timed: images/s, and the **data-loading share** = (gather + to-float +
  augmentation) / step time;
- **eval**: ``predict_logits`` over the test split: images/s.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_images.py                    # resnet18, 64 and 224, CPU
    PYTHONPATH=. .venv/bin/python benchmarks/bench_images.py --device cuda --batch-size 256 --steps 30

Decoding happens once, in the prepare step; every epoch then reads uint8 arrays. The prepare row
is what a pipeline that decodes JPEGs every epoch would pay per epoch instead. Medians over steps
after ``--warmup`` untimed ones; on CUDA every phase is bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from oodgate.base import numerics

numerics.apply()  # before NumPy and torch load: the kernels the pipeline computes with (oodgate.base.numerics)

import numpy as np
import torch


def write_folder(root: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:320] / 256.0
    for i in range(n):
        c = i % classes
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, ph = rng.uniform(1, 6, 3)
        field = np.stack([np.sin(a * xx + ph + k) * np.cos(b * yy + c) for k in range(3)], -1)
        img = (127 + 100 * field + rng.normal(0, 12, field.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_size(args: argparse.Namespace, folder: Path, work: Path, size: int) -> dict[str, float]:
    from oodgate.base.config import parse_config
    from oodgate.data.prepared import load_prepared
    from oodgate.learning.classifier import build_classifier
    from oodgate.learning.training import engine
    from oodgate.learning.training.driver import model_spec
    from oodgate.running import steps

    cfg = parse_config(
        {
            "seeds": [0],
            "data": {
                "dataset": "folder",
                "root": str(folder),
                "image_size": size,
                "workers": args.decode_workers,
                "ood": ["gaussian_noise"],
                "ood_size": 10,
            },
            "model": {"backbone": f"torchvision:{args.arch}"},
            "train": {"batch_size": args.batch_size, "augment": "resized_crop_flip", "device": args.device},
            "losses": {"softmax": {"method": "softmax"}},
            "gate": {"confidence": None},
        }
    )
    out = work / f"prepared{size}"
    t0 = time.perf_counter()
    summary = steps.prepare(cfg, out, folder)
    decode_s = time.perf_counter() - t0
    n_images = sum(v for k, v in summary["sizes"].items() if not k.startswith("ood/"))

    bundle = load_prepared(out, with_ood=False)
    device = engine.resolve_device(args.device)
    model = build_classifier(model_spec(cfg, "softmax", bundle), 0).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x_all, y_all = bundle.train.x, bundle.train.y
    bs = args.batch_size
    load_t, step_t = [], []
    for s in range(args.warmup + args.steps):
        idx = torch.randperm(len(y_all), generator=gen)[:bs]
        _sync(device)
        t0 = time.perf_counter()
        xb = engine.to_float(x_all[idx], device)
        xb = engine.augment(xb, "resized_crop_flip", gen)
        yb = y_all[idx].to(device)
        _sync(device)
        t1 = time.perf_counter()
        with engine._autocast(device, True):
            loss = model.head.loss(model(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        if s >= args.warmup:
            load_t.append(t1 - t0)
            step_t.append(t2 - t0)

    test = bundle.test.x
    engine.predict_logits(model, test[: args.batch_size], args.batch_size, device, amp=True)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    engine.predict_logits(model, test, args.batch_size, device, amp=True)
    _sync(device)
    eval_s = time.perf_counter() - t0
    step = statistics.median(step_t)
    return {
        "prepare_ips": n_images / decode_s,
        "train_ips": bs / step,
        "load_share": statistics.median(load_t) / step,
        "eval_ips": len(test) / eval_s,
        "device": str(device),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", help="a torchvision classification model")
    p.add_argument("--sizes", default="64,224")
    p.add_argument("--images", type=int, default=400, help="JPEGs in the generated folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decode-workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_folder(folder, args.images)
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            r = bench_size(args, folder, Path(tmp), size)
            rows.append(
                f"| {args.arch} | {size} | {r['device']} | {r['prepare_ips']:.0f} | {r['train_ips']:.1f} "
                f"| {100 * r['load_share']:.1f}% | {r['eval_ips']:.1f} |"
            )
    print(
        f"{args.images} JPEGs (320x256), batch {args.batch_size}, {args.steps} timed steps, "
        f"{args.decode_workers} decode workers, torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| backbone | size | device | prepare (decode) img/s | train img/s | data-loading share | eval img/s |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
