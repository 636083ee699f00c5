"""Everything knowable before work starts is refused then, in one line, before Prefect or any data
loading: a missing GPU, a class index the dataset lacks, an unreadable or wrong-shaped OOD file, a
bad override. Each case: exit status 2, the key, the value and the fix, no traceback."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from conftest import tiny_params

from oodgate import cli


@pytest.fixture
def params(tmp_path, embedded_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(embedded_root, tmp_path / "w")))
    np.savez(tmp_path / "objects.npz", x=np.array([object(), 1], dtype=object))
    np.savez(tmp_path / "floats.npz", x=np.zeros((3, 28, 28), np.float32))
    np.savez(tmp_path / "no_x.npz", y=np.zeros((3, 28, 28), np.uint8))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 28, 28), np.uint8))
    (tmp_path / "not_a_zip.npz").write_text("hello")
    (tmp_path / "no_images").mkdir()
    return path


def _ood(path: str) -> str:
    return f"data.ood=[{{name: mine, path: {path}, group: far}}]"


CASES = [
    ("train.device=cuda", r"train\.device: 'cuda', but this machine has no CUDA device.*use 'auto'"),
    (
        "data.classes=[0,1,12]",
        r"data\.classes: 12 is out of range for data\.dataset 'embedded_mnist'.*0\.\.9",
    ),
    (_ood("nowhere.npz"), r"'mine' points to 'nowhere\.npz', which does not exist"),
    (_ood("objects.npz"), r"'objects\.npz': array 'x' holds Python objects.*never loaded"),
    (_ood("floats.npz"), r"'floats\.npz': array 'x' is float32 of shape \(3, 28, 28\); expected uint8"),
    (_ood("no_x.npz"), r"'no_x\.npz' holds no array 'x' \(found: y\)"),
    (_ood("empty.npz"), r"'empty\.npz': array 'x' holds no images"),
    (_ood("not_a_zip.npz"), r"'not_a_zip\.npz' is not an \.npz archive"),
    (_ood("no_images"), r"folder 'no_images' holds no images"),
    (_ood("params.yaml"), r"'params\.yaml' must be a folder of images or an \.npz file"),
    ("train.lr.x=1", r"override train\.lr\.x=1: train\.lr is a value \(0\.05\), not a section"),
]


@pytest.mark.parametrize(("override", "message"), CASES, ids=[c[0][:30] for c in CASES])
def test_refused_before_any_work_with_one_line(params, override, message, capsys):
    if "cuda" in override:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    assert cli.main(["train", "--params", str(params), "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (params.parent / "w").exists()  # nothing prepared, trained or written


def test_the_flow_entry_point_refuses_before_prefect_starts(params, capsys):
    from flows.pipeline import main

    assert main(["--params", str(params), "--set", "data.classes=[0, 99]"]) == 2
    err = capsys.readouterr().err
    assert "data.classes: 99 is out of range" in err and "Traceback" not in err
