"""Data-parallel training of one (loss, seed) in N processes on this machine: ``train.processes: N``.

The train step (from the flow, ``python -m oodgate train`` or ``dvc repro``) starts N processes of
``python -m oodgate.learning.training.distributed ...`` for one (loss, seed) and reads the result the first process
wrote. Each process initialises the default process group (gloo on the CPU, NCCL on GPUs, one GPU per
process by ``LOCAL_RANK``) and runs :func:`oodgate.learning.training.driver.train_here`, the training the train step
runs in one process, in which :func:`oodgate.learning.training.engine.train` wraps the model in
``DistributedDataParallel``:

- ``train.batch_size`` is the global batch; every process draws the whole batch's permutation and
  augmentation from the run's one generator and trains on its contiguous share, with its loss
  weighted so that the averaged gradient is the global batch's;
- batch-norm statistics are synchronised across GPUs (``SyncBatchNorm``); on the CPU each process
  normalises its own share, which is what makes a CPU run differ from one process in the last digits;
- DisMax's mosaics are formed within each process's share (as with per-GPU batches in its paper's
  code): a mosaic mixes images of one share only, so fewer distinct combinations per global batch;
- the first process validates, selects the epoch and writes ``best.pt``, ``last.pt``, the history
  and the record; a resumed run restores ``last.pt`` in every process (the same resume rules).

The processes are started here rather than by ``torchrun --standalone``, whose rendezvous store (a
TCPStore) listened on every network interface without authentication: anyone who reached the
machine could join or disturb the group. Here they meet through a file (``init_method="file://..."``)
in a private temporary directory (mode 0700: no other user can open it), and gloo's and NCCL's
connections between them are bound to the loopback interface, so nothing listens beyond it.

On several machines, run the same command on each with ``--nnodes`` and a rendezvous endpoint
(``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host:29400 -m
oodgate train --loss dismax --seed 0``), with the work directory on a file system all of them see.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from oodgate.base import numerics
from oodgate.base.config import parse_config
from oodgate.learning.training.driver import train_here
from oodgate.learning.training.engine import STOP, TrainingInterrupted


class DistributedTrainingError(RuntimeError):
    """A training process failed; the message holds the end of its output."""


PARENT_VARIABLE = "OODGATE_DDP_PARENT"  # the pid of the launching process
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10  # for the other processes to exit on SIGTERM before they are killed


def launch(
    cfg_json: dict[str, Any],
    inputs: dict[str, Any],
    loss_id: str,
    seed: int,
    prepared_dir: Path,
    out_dir: Path,
    fingerprint: str,
    n: int,
) -> None:
    """Run ``n`` training processes on this machine and wait for them. When one fails, the others
    (blocked in a collective with it) are stopped, and the error holds the end of its output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / "distributed-config.json"
    config.write_text(json.dumps({"config": cfg_json, "inputs": inputs}))
    # every process computes under the params' numerics, with its share of the threads
    mode, threads = cfg_json["numerics"]["mode"], cfg_json["numerics"]["threads"]
    per_process = max(1, threads // n) if threads is not None else _threads_per_process(n)
    loopback = _loopback_interface()
    common = {
        **os.environ,
        **numerics.environment(mode, per_process),
        # the processes' own connections (gloo's pairs, NCCL's bootstrap) on loopback only
        "GLOO_SOCKET_IFNAME": loopback,
        "NCCL_SOCKET_IFNAME": loopback,
        PARENT_VARIABLE: str(os.getpid()),
    }
    with tempfile.TemporaryDirectory(prefix="oodgate-ddp-") as private:  # mode 0700, as mkdtemp
        cmd = [
            sys.executable,
            "-m",
            "oodgate.learning.training.distributed",
            "--init",
            (Path(private) / "store").as_uri(),
        ]
        cmd += ["--config", str(config), "--loss", loss_id, "--seed", str(seed)]
        cmd += ["--prepared", str(prepared_dir), "--out", str(out_dir), "--fingerprint", fingerprint]
        logs = [Path(private) / f"process-{rank}.log" for rank in range(n)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank, log in enumerate(logs):
                ranks = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": n, "LOCAL_WORLD_SIZE": n}
                with log.open("w") as fh:  # a file, not a pipe: a process never blocks on its output
                    env = {**common, **{k: str(v) for k, v in ranks.items()}}
                    procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT))
            failed = _wait(procs)
        finally:
            _stop(procs)
        if failed:
            # each process that failed by itself (the others were stopped after), with its output's end
            parts = []
            for rank, status in failed:
                tail = "\n".join(logs[rank].read_text(errors="replace").splitlines()[-30:])
                parts.append(f"process {rank} exited with {_status(status)}:\n{tail}")
            raise DistributedTrainingError(
                f"distributed training of {loss_id} seed {seed} ({n} processes) failed: " + "\n".join(parts)
            )


def _wait(procs: list[subprocess.Popen[bytes]]) -> list[tuple[int, int]]:
    """Wait until every process has exited with status 0 ([]), or some have failed: [(rank,
    status)]. An interrupt of the launching process (STOP) stops them."""
    while True:
        # first: Ctrl-C reaches the processes too, and their exit is then no failure
        if STOP.is_set():  # the last epoch's checkpoint is there to resume from
            raise TrainingInterrupted(f"distributed training interrupted ({STOP.reason or 'STOP'})")
        statuses = [p.poll() for p in procs]
        failed = [(rank, status) for rank, status in enumerate(statuses) if status not in (None, 0)]
        if failed or all(status == 0 for status in statuses):
            return failed
        time.sleep(POLL_SECONDS)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """End the processes still running: SIGTERM, then SIGKILL after STOP_GRACE_SECONDS."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _status(status: int) -> str:
    if status < 0:
        return f"signal {signal.Signals(-status).name}"
    return f"exit status {status}"


def _loopback_interface() -> str:
    """The loopback interface's name: ``lo`` on Linux, ``lo0`` on macOS."""
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else next((x for x in names if x.startswith("lo")), "lo")


def _threads_per_process(n: int) -> int:
    """The CPU threads each of ``n`` processes gets with ``numerics.threads: null``: this process's
    share (torch's default is all)."""
    import torch

    return max(1, torch.get_num_threads() // n)


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as td

    p = argparse.ArgumentParser(
        prog="python -m oodgate.learning.training.distributed (started by oodgate.learning.training.distributed.launch)"
    )
    p.add_argument("--init", required=True, help="the process group's init_method, file://<private path>")
    p.add_argument("--config", required=True)
    p.add_argument("--loss", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fingerprint", required=True)
    args = p.parse_args(argv)
    given = json.loads(Path(args.config).read_text())
    cfg = parse_config(given["config"], args.config)
    _end_with_parent()
    td.init_process_group(
        backend="nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo",
        init_method=args.init,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    try:
        train_here(
            cfg, args.loss, args.seed, args.prepared, Path(args.out), args.fingerprint, given["inputs"]
        )
    finally:
        td.destroy_process_group()
    return 0


def _end_with_parent() -> None:
    """Exit when the launching process is gone (a SIGKILL of the flow): an orphaned training would
    go on, holding cores or a GPU, to its last epoch. A thread compares ``os.getppid()`` with the
    launcher's pid once a second (not ``PR_SET_PDEATHSIG``: Linux sends it when the launching
    *thread* ends, and the launcher runs in a task runner's thread)."""
    parent = os.environ.get(PARENT_VARIABLE, "")
    if not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os._exit(1)  # the last epoch's checkpoint is there to resume from

    threading.Thread(target=watch, name="oodgate-parent", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
