"""Data-parallel training of one (loss, seed) with ``torchrun``: ``train.processes: N``.

The train step (from the flow, ``python -m oodgate train`` or ``dvc repro``) launches
``torchrun --standalone --nproc_per_node N -m oodgate.distributed ...`` for one (loss, seed) and
reads the result the first process wrote. Each process initialises the default process group (gloo
on the CPU, NCCL on GPUs, one GPU per process by ``LOCAL_RANK``) and runs the same train step,
in which :func:`oodgate.engine.train` wraps the model in ``DistributedDataParallel``:

- ``train.batch_size`` is the global batch; every process draws the whole batch's permutation and
  augmentation from the run's one generator and trains on its contiguous share, with its loss
  weighted so that the averaged gradient is the global batch's;
- batch-norm statistics are synchronised across GPUs (``SyncBatchNorm``); on the CPU each process
  normalises its own share, which is what makes a CPU run differ from one process in the last digits;
- DisMax's mosaics are formed within each process's share (as with per-GPU batches in its paper's
  code): a mosaic mixes images of one share only, so fewer distinct combinations per global batch;
- the first process validates, selects the epoch and writes ``best.pt``, ``last.pt``, the history
  and the record; a resumed run restores ``last.pt`` in every process (the same resume rules).

On several machines, run the same command on each with ``--nnodes`` and a rendezvous endpoint
(``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host:29400 -m
oodgate train --loss dismax --seed 0``), with the work directory on a file system all of them see.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


class DistributedTrainingError(RuntimeError):
    """The torchrun launch failed; the message holds the end of its output."""


def launch(
    cfg_json: dict,
    loss_id: str,
    seed: int,
    prepared_dir: Path,
    out_dir: Path,
    fingerprint: str,
    n: int,
    max_epochs: int | None = None,
) -> None:
    """Run ``n`` training processes under ``torchrun`` on this machine and wait for them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / "distributed-config.json"
    config.write_text(json.dumps(cfg_json))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
        "-m",
        "oodgate.distributed",
        "--config",
        str(config),
        "--loss",
        loss_id,
        "--seed",
        str(seed),
        "--prepared",
        str(prepared_dir),
        "--out",
        str(out_dir),
        "--fingerprint",
        fingerprint,
        *(["--max-epochs", str(max_epochs)] if max_epochs is not None else []),
    ]
    from oodgate import numerics

    # every process computes under the params' numerics, with its share of the threads
    mode, threads = cfg_json["numerics"]["mode"], cfg_json["numerics"]["threads"]
    per_process = max(1, threads // n) if threads is not None else _threads_per_process(n)
    env = dict(os.environ, **numerics.environment(mode, per_process))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise DistributedTrainingError(
            f"distributed training of {loss_id} seed {seed} ({n} processes) failed with exit status "
            f"{proc.returncode}:\n{tail}"
        )


def _threads_per_process(n: int) -> int:
    """The CPU threads each of ``n`` processes gets with ``numerics.threads: null``: this process's
    share (torch's default is all)."""
    import torch

    return max(1, torch.get_num_threads() // n)


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as td

    from oodgate import steps
    from oodgate.config import parse_config

    p = argparse.ArgumentParser(prog="torchrun ... -m oodgate.distributed")
    p.add_argument("--config", required=True)
    p.add_argument("--loss", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fingerprint", required=True)
    p.add_argument("--max-epochs", type=int, default=None, help="stop after this many epochs (tests)")
    args = p.parse_args(argv)
    cfg = parse_config(json.loads(Path(args.config).read_text()), args.config)
    td.init_process_group(
        backend="nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    )
    try:
        steps.train(
            cfg,
            args.loss,
            args.seed,
            args.prepared,
            args.out,
            fingerprint=args.fingerprint,
            max_epochs=args.max_epochs,
        )
    finally:
        td.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
