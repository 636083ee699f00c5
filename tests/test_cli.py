"""The core CLI: ``python -m oodgate run --loss/--seed`` gates what it has, or says why it cannot,
and never fails for it; a step interrupted stops in one line."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oodgate.base.config import parse_config
from oodgate.running.cli import _selection
from tests.conftest import shell_env, tiny_params

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, **gate):
    params = tiny_params(tmp_path / "data", tmp_path / "w")
    params["seeds"] = [0, 1, 2]
    params["gate"] = {"confidence": 0.95, "evidence": "seeds", **gate}
    return parse_config(params)


@pytest.mark.parametrize(
    ("loss", "seed", "why"),
    [
        ("softmax", None, "only the baseline 'softmax' was run: there is no candidate to compare"),
        ("dismax_fpr", None, "the baseline 'softmax' is not among --loss dismax_fpr"),
        (None, 0, "needs at least 2 seeds, --seed 0 gives 1 (--set gate.evidence=models compares"),
    ],
)
def test_a_selection_that_cannot_be_gated_says_why(tmp_path, loss, seed, why):
    cfg = _config(tmp_path)
    sub, reason = _selection(cfg, argparse.Namespace(loss=loss, seed=seed))
    assert reason is not None and why in reason
    assert sub.loss_ids() == ([loss] if loss else cfg.loss_ids())
    assert list(sub.seeds) == ([seed] if seed is not None else [0, 1, 2])


def test_one_seed_of_every_loss_is_gated_on_the_means(tmp_path):
    cfg = _config(tmp_path, confidence=None)
    sub, reason = _selection(cfg, argparse.Namespace(loss=None, seed=1))
    assert reason is None and list(sub.seeds) == [1] and sub.loss_ids() == cfg.loss_ids()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stage_interrupted_says_so_in_one_line_and_keeps_what_it_finished(tmp_path, embedded_root, sig):
    """Ctrl-C (SIGINT) or SIGTERM during `python -m oodgate train` (what `dvc repro` runs): one
    `error:` line, exit status 130, no traceback; the epochs it finished are there to resume."""
    params = tiny_params(embedded_root, tmp_path / "w", epochs=200)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = shell_env(PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "oodgate", "train", "--loss", "softmax", "--seed", "0", "--quiet"]
    prep = subprocess.run(
        [sys.executable, "-m", "oodgate", "prepare", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert prep.returncode == 0, prep.stderr
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    last = tmp_path / "w" / "train" / "softmax" / "seed0" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith(f"error: {sig.name} received: stopped; finished results are kept")
    assert last.is_file()  # a re-run resumes from it


# ------------------------------------------------------------------ `python -m oodgate import`
def _import_params(tmp_path: Path, embedded_root: Path, classes: list[int]) -> Path:
    """The tiny config, its dismax_fpr loss imported from an oodgate checkpoint of ``classes``."""
    from oodgate.learning.classifier import ModelSpec, build_classifier, save_classifier

    spec = ModelSpec(
        "small_cnn", "dismax", len(classes), 1, 28, (0.5,), (0.25,), "mps", {"width": 8}, {"fpr": True}
    )
    checkpoint = save_classifier(build_classifier(spec, 0), tmp_path / "mine.pt")
    raw = tiny_params(embedded_root, tmp_path / "w")
    raw["data"]["classes"] = classes
    raw["losses"]["dismax_fpr"]["checkpoint"] = {"path": str(checkpoint), "format": "oodgate"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_import_prepares_the_data_when_there_is_none(tmp_path, embedded_root, monkeypatch, capsys):
    """After `make run` the flow's prepared data is under artifacts/cache/, not in the fixed
    artifacts/prepared the CLI reads: the import used to fail with a raw `[Errno 2] ... id.pt`."""
    from oodgate.running import cli
    from oodgate.running.steps import read_json
    from oodgate.running.steps.inputs import prepare_inputs

    monkeypatch.chdir(tmp_path)
    params = _import_params(tmp_path, embedded_root, [0, 1, 2])
    assert cli.main(["import", "--params", str(params), "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"-> {tmp_path / 'w' / 'prepared'}" in out and "import dismax_fpr seed 0: " in out
    summary = read_json(tmp_path / "w" / "prepared" / "data.json")
    # what it was prepared from, recorded: deterministic (no paths, no times), as DVC versions it
    assert summary["inputs"] == prepare_inputs(parse_config(yaml.safe_load(params.read_text())))
    assert str(tmp_path) not in (tmp_path / "w" / "prepared" / "data.json").read_text()


def test_import_refuses_prepared_data_of_another_config(
    tmp_path, embedded_root, prepared_dir, monkeypatch, capsys
):
    """Prepared data of another class selection used to be imported on silently."""
    import shutil

    from oodgate.running import cli

    monkeypatch.chdir(tmp_path)
    shutil.copytree(prepared_dir, tmp_path / "w" / "prepared")  # classes [0, 1, 2]
    params = _import_params(tmp_path, embedded_root, [0, 1, 2, 3])
    assert cli.main(["import", "--params", str(params), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    summary = tmp_path / "w" / "prepared" / "data.json"
    assert (
        f"error: prepared data: '{summary}' does not match {params}: it was prepared from other inputs "
        f"(data.classes: [0, 1, 2] -> [0, 1, 2, 3]); prepare it again with `python -m oodgate prepare "
        f"--params {params}`\n"
    ) == err
    assert not (tmp_path / "w" / "train").exists()  # nothing imported


def test_why_says_where_a_step_is_reused_and_what_makes_it_compute_again(
    tmp_path, embedded_root, monkeypatch, capsys
):
    """`python -m oodgate why train --loss L --seed S`: the step's own record decides, and the
    answer names the changed params key, or the file that no longer matches its record."""
    from oodgate.running import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(embedded_root, tmp_path / "w")))
    assert cli.main(["inputs", "--quiet"]) == 0
    assert cli.main(["prepare", "--quiet"]) == 0
    assert cli.main(["train", "--loss", "softmax", "--seed", "0", "--quiet"]) == 0
    capsys.readouterr()

    def why(*extra: str) -> str:
        assert cli.main(["why", "train", "--loss", "softmax", "--seed", "0", *extra]) == 0
        return capsys.readouterr().out

    out = why()
    assert "train.json has this fingerprint and the files it lists are intact: reused" in out, out
    assert "inputs/train/softmax/seed0.json is current" in out, out
    assert "no data.dvc records the data's version" in out, out
    out = why("--set", "train.lr=0.5")
    assert "computed from other inputs (train.lr: " in out and "-> 0.5" in out, out
    assert "inputs/train/softmax/seed0.json differs from the params (train.lr: " in out, out
    (tmp_path / "w" / "train" / "softmax" / "seed0" / "best.pt").write_bytes(b"changed")
    out = why()
    assert "best.pt missing or changed since train.json was written: computed again" in out, out
