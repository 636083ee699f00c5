"""Data-parallel training (``train.processes: 2``) on the CPU with the gloo backend.

Real processes: the train step launches 2 training processes that meet through a file in a private
directory and listen on loopback only. Against one process with the same global batch, the
per-epoch mean training loss agrees within the tolerance measured for this setup (small_cnn, batch
64 split 32 + 32, 3 epochs; measured 1 vs 2 processes:
0.8886 vs 0.8930, 0.4528 vs 0.4637, 0.2326 vs 0.2518): each process normalises its own 32 images in
the batch-norm layers, which the CPU cannot synchronise, so the trajectories drift apart slowly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import torch
from conftest import tiny_params

from oodgate.base.config import ConfigError, parse_config
from oodgate.learning.training.distributed import DistributedTrainingError
from oodgate.running import steps
from oodgate.running.steps.inputs import train_fingerprint

REPO = Path(__file__).resolve().parents[1]
FIRST_EPOCH_RTOL = 0.02  # measured 0.5%
LATER_EPOCH_RTOL = 0.15  # measured 2.4% and 8.3%


def _history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_loss_curve_and_resume(embedded_root, tmp_path):
    curves = {}
    for n in (1, 2):
        cfg = parse_config(tiny_params(embedded_root, tmp_path / f"w{n}", epochs=3, processes=n))
        steps.prepare(cfg, tmp_path / "prepared")
        t = steps.train(cfg, "softmax", 0, tmp_path / "prepared", tmp_path / f"t{n}")
        assert t.epochs == 3 and t.best_val_accuracy > 0.5
        curves[n] = [h["train_loss"] for h in _history(tmp_path / f"t{n}")]
    one, two = curves[1], curves[2]
    assert one != two  # really two processes: the batch-norm statistics differ
    assert two[0] == pytest.approx(one[0], rel=FIRST_EPOCH_RTOL)
    assert two[1:] == pytest.approx(one[1:], rel=LATER_EPOCH_RTOL)
    assert two[-1] < two[0]

    # the first process wrote the checkpoints; a finished training is reused, not relaunched
    ckpt = torch.load(tmp_path / "t2" / "best.pt", weights_only=True)
    assert ckpt["spec"]["backbone"] == "small_cnn"
    again = steps.train(cfg, "softmax", 0, tmp_path / "prepared", tmp_path / "t2")
    assert again.train_seconds == 0.0

    # stopped after epoch 2, then run again: it resumes from last.pt in both processes and ends
    # with the uninterrupted run's weights and curve. The stop: a 2-epoch run under the 3-epoch
    # run's fingerprint (the schedule does not depend on train.epochs) leaves the 3-epoch run's
    # last.pt of epoch 2; without its record, that is what an interrupt after epoch 2 leaves.
    part = tmp_path / "t2-resumed"
    fingerprint = train_fingerprint(cfg, "softmax", 0, steps.file_digest(tmp_path / "prepared" / "id.pt"))
    two_epochs = parse_config(tiny_params(embedded_root, tmp_path / "w2", epochs=2, processes=2))
    stopped = steps.train(two_epochs, "softmax", 0, tmp_path / "prepared", part, fingerprint=fingerprint)
    assert stopped.epochs == 2
    (part / "train.json").unlink()
    resumed = steps.train(cfg, "softmax", 0, tmp_path / "prepared", part)
    assert resumed.resumed_from_epoch == 2
    assert [h["train_loss"] for h in _history(part)] == two
    a = torch.load(tmp_path / "t2" / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distributed_training_refuses_what_it_cannot_do(embedded_root, tmp_path):
    with pytest.raises(ConfigError, match=r"freezing the backbone is not supported in distributed training"):
        parse_config(tiny_params(embedded_root, tmp_path, epochs=3, processes=2, freeze_backbone_epochs=1))
    with pytest.raises(
        ConfigError, match=r"batch_size=2 is the global batch: it must be at least train.processes=4"
    ):
        parse_config(tiny_params(embedded_root, tmp_path, processes=4, batch_size=2))


LOOPBACK = ("127.0.0.1", "::1")
LAUNCHER = """
import json, sys
from oodgate.base import numerics
numerics.apply()
from oodgate.running import steps
from oodgate.base.config import parse_config
steps.train(parse_config(json.loads(sys.argv[1])), "softmax", 0, sys.argv[2], sys.argv[3])
"""


@pytest.mark.slow
def test_the_training_processes_listen_on_loopback_only_meet_in_a_private_directory_and_end_with_the_launcher(
    embedded_root, tmp_path
):
    params = tiny_params(embedded_root, tmp_path / "w", epochs=500, processes=2)
    steps.prepare(parse_config(params), tmp_path / "prepared")
    out = tmp_path / "t"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-c", LAUNCHER, json.dumps(params), str(tmp_path / "prepared"), str(out)]
    launcher = subprocess.Popen(cmd, env=env, start_new_session=True)  # a flow, dvc repro, oodgate train
    store = None
    try:
        t0 = time.monotonic()
        while not (out / "last.pt").exists():  # an epoch done: the group is up and training
            assert launcher.poll() is None and time.monotonic() - t0 < 300, launcher.returncode
            time.sleep(0.2)
        launched = psutil.Process(launcher.pid).children(recursive=True)
        listening = {
            f"{p.pid} {' '.join(p.cmdline()[1:4])}": [
                c.laddr for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
            ]
            for p in launched
        }
        print(f"listening sockets of the launched processes: {listening}")
        for addresses in listening.values():
            assert all(a.ip in LOOPBACK for a in addresses), listening
        training = [
            p for p in launched if p.cmdline()[1:3] == ["-m", "oodgate.learning.training.distributed"]
        ]
        assert len(training) == 2, [p.cmdline() for p in launched]
        # the rendezvous is a file in a directory only this user can enter
        store = Path(urlparse(training[0].cmdline()[training[0].cmdline().index("--init") + 1]).path)
        assert store.parent.stat().st_mode & 0o777 == 0o700, oct(store.parent.stat().st_mode)

        # the launcher killed (a SIGKILL of the flow): the processes end instead of training on
        launcher.kill()
        launcher.wait(30)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(training, timeout=30)
        print(f"the training processes ended {time.monotonic() - t0:.1f} s after their launcher's SIGKILL")
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        if store is not None:  # a killed launcher could not remove its private directory
            shutil.rmtree(store.parent, ignore_errors=True)


@pytest.mark.slow
def test_a_failed_training_process_s_output_is_in_the_error(embedded_root, tmp_path):
    cfg = parse_config(tiny_params(embedded_root, tmp_path / "w", processes=2))
    with pytest.raises(DistributedTrainingError, match=r"(?s)process \d exited with exit status 1:.*nowhere"):
        steps.train(cfg, "softmax", 0, tmp_path / "nowhere", tmp_path / "t", fingerprint="f" * 16)
