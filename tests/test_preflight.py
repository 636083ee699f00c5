"""Everything knowable before work starts is refused then, in one line, before Prefect or any data
loading: a missing GPU, a class index the dataset lacks, an unreadable or wrong-shaped OOD file, a
bad override. Each case: exit status 2, the key, the value and the fix, no traceback."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_params

from oodgate.running import cli


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
    ("model.backbone=resnet99", r"model\.backbone='resnet99' is not a known backbone; valid backbones: "),
    ("data.ood=[nope]", r"data\.ood: 'nope' is not a known OOD set; valid sets: "),
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


# ------------------------------------------------------------------ the work directory
def _refused_in_one_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


def _header_only_npz(path: Path, shape: tuple[int, ...]) -> None:
    """An .npz whose array 'x' is only a header claiming uint8 images of ``shape``: all a reader may
    look at before deciding to decompress (a real file of zeros is as small: 381 KB held 392 MB)."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue())


def test_an_ood_npz_over_the_size_cap_is_refused_from_its_header(params, monkeypatch, capsys):
    """Its decompressed size, from the header, is checked by preflight and by the loader itself
    before anything is decompressed: a small .npz can hold any number of zero images."""
    from oodgate.data.ood import load_path_source

    _header_only_npz(params.parent / "huge.npz", (20_000_000, 28, 28))  # 14.6 GiB, in 128 bytes
    assert cli.main(["train", "--params", str(params), "--set", _ood("huge.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    _refused_in_one_line(
        err,
        "error: data.ood: 'mine' points to 'huge.npz': array 'x' (uint8, shape (20000000, 28, 28)) is "
        "14.6 GiB decompressed, over the limit of 8.0 GiB for an OOD set (MAX_OOD_BYTES in "
        "oodgate/data/npz.py); save fewer images in it, or split it into several OOD sets",
    )
    assert not (params.parent / "w").exists()
    with pytest.raises(ValueError, match=r"^OOD file 'huge\.npz': array 'x' .* is 14\.6 GiB decompressed"):
        load_path_source("huge.npz", 1, 28)  # a direct library call is refused as well
    # a real file over a lowered cap, as a validation OOD set
    from oodgate.data import npz

    monkeypatch.setattr(npz, "MAX_OOD_BYTES", 1000)
    np.savez_compressed(params.parent / "small.npz", x=np.zeros((2, 28, 28), np.uint8))  # 1568 bytes
    ood_val = "data.ood_val=[{name: mine_val, path: small.npz, group: far}]"
    assert cli.main(["train", "--params", str(params), "--set", ood_val, "--quiet"]) == 2
    _refused_in_one_line(
        capsys.readouterr().err,
        "error: data.ood_val: 'mine_val' points to '",
        "small.npz': array 'x' (uint8, shape (2, 28, 28)) is 1.5 KiB decompressed, over the limit of 1000 bytes",
    )
    with pytest.raises(ValueError, match=r"OOD file 'small\.npz': .* over the limit of 1000 bytes"):
        load_path_source("small.npz", 1, 28)


def test_a_workdir_that_is_a_file_is_refused_before_any_run(params, capsys):
    """It used to fail only after the flow had created its MLflow run."""
    workdir = params.parent / "w"
    workdir.write_text("not a directory")
    assert cli.main(["train", "--params", str(params), "--quiet"]) == 2
    _refused_in_one_line(capsys.readouterr().err, f"workdir: '{workdir}' is a file, not a directory")
    assert cli.main(["train", "--params", str(params), "--set", f"workdir={workdir}/sub", "--quiet"]) == 2
    _refused_in_one_line(capsys.readouterr().err, f"'{workdir}/sub' cannot be created: '{workdir}' is a file")


def test_the_flow_refuses_a_workdir_that_is_a_file_before_tracking_anything(project, capsys):
    from flows.pipeline import main

    (project / "artifacts").write_text("a file where the work directory goes")
    assert main(["--root", str(project)]) == 2
    _refused_in_one_line(capsys.readouterr().err, f"workdir: '{project / 'artifacts'}' is a file")
    assert not (project / "mlflow.db").exists()  # no MLflow run was created


def _read_only_command(directory: Path, command: list[str]) -> list[str]:
    """``command`` with ``directory`` read-only: for root (who writes through file modes) a read-only
    bind mount in a private mount namespace, gone with the process; else the directory's mode."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        directory.chmod(0o555)
        return command
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("root, and no private mount namespace for a read-only mount")
    # cd again: a working directory inside the mounted directory still points at the writable one below
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && cd "$PWD" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(directory), *command]


@pytest.mark.parametrize("exists", [True, False], ids=["read-only-workdir", "read-only-parent"])
def test_a_read_only_workdir_is_refused_up_front_by_both_entry_points(project, exists):
    """A read-only `artifacts/` used to give a traceback, and with a changed param a run that exited 0
    with every loss 'FAILED, not gated'. Now: exit 2, one line, before any server or run."""
    import subprocess
    import sys

    from conftest import REPO

    workdir = project / "artifacts"
    if exists:
        workdir.mkdir()
    locked = workdir if exists else project
    what = "is not writable" if exists else f"would be created in '{project}', which is not writable"
    try:
        for command in (
            [sys.executable, "-m", "flows.pipeline", "--root", str(project), "--set", "train.lr=0.01"],
            [sys.executable, "-m", "oodgate", "run", "--params", str(project / "params.yaml")],
        ):
            out = subprocess.run(
                _read_only_command(locked, command),
                cwd=project,  # the core CLI takes workdir relative to the working directory
                env=dict(__import__("os").environ, PYTHONPATH=str(REPO)),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
            _refused_in_one_line(out.stderr, f"workdir: '{workdir}' {what}", "--set workdir=DIR")
            assert out.stdout == ""
    finally:
        locked.chmod(0o755)
    assert not (project / "mlflow.db").exists()
    assert list(workdir.iterdir()) == [] if exists else not workdir.exists()


# ------------------------------------------------------------------ pretrained weights
@pytest.fixture
def weights(tmp_path):
    """Files a user might give as model.weights, for the tiny config's small_cnn of width 8."""
    import torch

    from oodgate.learning.models import create_backbone

    files = {}
    for width in (8, 4):
        files[f"width{width}"] = tmp_path / f"small_cnn_w{width}.pt"
        torch.save(create_backbone("small_cnn", 1, 28, width=width).state_dict(), files[f"width{width}"])
    files["lists"] = tmp_path / "lists.pt"
    torch.save({"features.0.weight": [1.0, 2.0], "epoch": 3}, files["lists"])
    files["pickled"] = tmp_path / "pickled.pt"
    torch.save({"model": Path("an object")}, files["pickled"])
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["cut"] = tmp_path / "cut.pt"  # an interrupted copy
    files["cut"].write_bytes(files["width8"].read_bytes()[:1000])
    return files


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (
            "width4",
            r"does not fit backbone SmallCNN: 15 of another shape \(file vs model: features\.0\.weight \(4, 1, 3, 3\) vs \(8, 1, 3, 3\)",
        ),
        ("lists", r"holds a dict, not a state dict of tensors; save it with torch\.save"),
        (
            "pickled",
            r"cannot be loaded as plain tensors \(UnpicklingError: it holds a pickled pathlib\.\w*Path object\); "
            r"pickled objects are never loaded, only tensors: save the weights alone, with torch\.save",
        ),
        ("empty", r"'[^']*empty\.pt' is empty \(0 bytes\): .*; copy the file again"),
        (
            "cut",
            r"'[^']*cut\.pt' is truncated or not a torch\.save file \(1000 bytes; RuntimeError: PytorchStreamReader "
            r"failed reading zip archive[^)]*\); copy it again from where it was written",
        ),
    ],
)
def test_weights_that_do_not_fit_are_refused_at_preflight(params, weights, file, message, capsys):
    """They used to fail once per training, after the data was prepared (exit 1, tracebacks); an
    empty or cut file was told to be saved with torch.save (`(EOFError: )`), and a pickled object
    came with PyTorch's advice that weights_only=False "will likely succeed"."""
    path = weights[file]
    assert cli.main(["train", "--params", str(params), "--set", f"model.weights={path}", "--quiet"]) == 2
    err = capsys.readouterr().err
    _refused_in_one_line(err, f"model.weights: '{path}'")
    assert re.search(message, err), err
    assert "weights_only" not in err and "likely succeed" not in err
    assert not (params.parent / "w").exists()  # nothing prepared


def test_weights_that_fit_pass_preflight(params, weights):
    from oodgate.base.config import load_config
    from oodgate.running.preflight import preflight

    preflight(load_config(params, {"model.weights": str(weights["width8"])}), project=params.parent)


# ------------------------------------------------------------------ a project that DVC does not know
def test_a_root_that_is_not_a_dvc_project_is_refused_with_the_fix(project, capsys):
    """`--root` on a directory without .dvc/ used to end in DVC's NotDvcRepoError traceback."""
    import shutil

    from flows.pipeline import main
    from oodgate.running.preflight import PreflightError
    from tasks.data import check_data

    shutil.rmtree(project / ".dvc")
    assert main(["--root", str(project)]) == 2
    _refused_in_one_line(
        capsys.readouterr().err,
        f"'{project}' is not a DVC project (no .dvc directory in it or above it",
        "`dvc init` there (`dvc init --no-scm` outside git) and `dvc add data`, or pass the project's "
        "directory as --root",
    )
    assert not (project / "mlflow.db").exists()
    with pytest.raises(PreflightError, match="is not a DVC project"):  # a deployment's run says the same
        check_data.fn(str(project))


# ------------------------------------------------------------------ an imported oodgate checkpoint
def _oodgate_checkpoint(path: Path, **changes) -> Path:
    """A checkpoint written by oodgate's save_classifier for the tiny config's dismax_fpr loss (small_cnn
    of width 8, 3 classes of 1x28x28 images), with ``changes`` to its spec."""
    from dataclasses import replace

    from oodgate.learning.classifier import ModelSpec, build_classifier, save_classifier

    spec = ModelSpec("small_cnn", "dismax", 3, 1, 28, (0.5,), (0.25,), "mps", {"width": 8}, {"fpr": True})
    spec = replace(spec, **changes)
    if spec.in_channels != 1:
        spec = replace(spec, mean=(0.5,) * spec.in_channels, std=(0.25,) * spec.in_channels)
    save_classifier(build_classifier(spec, 0), path)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_classes": 10},
            r"holds a model with num_classes 10, but the data's class count is 3 \(data\.classes\); select "
            r"the classes it was trained on \(data\.classes\), or give a checkpoint that fits the config",
        ),
        (
            {"method": "isomax_plus", "method_options": {}},
            r"holds a model with method 'isomax_plus', but the loss's method is 'dismax' "
            r"\(losses\.dismax_fpr\.method\); declare method: isomax_plus for this loss",
        ),
        (
            {"in_channels": 3},
            r"holds a model with in_channels 3, but the data's image channels is 1 \(the images of "
            r"data\.dataset 'embedded_mnist'\)",
        ),
        ({"image_size": 32}, r"holds a model with image_size 32, but the data's image size is 28"),
        (  # as many classes, other ones: known before the data is prepared for the digit datasets
            {"class_names": ("0", "1", "4")},
            r"holds a model with class_names \['0', '1', '4'\], but the data's classes is \['0', '1', '2'\] "
            r"\(data\.classes\); select the classes it was trained on, in its order \(data\.classes\)",
        ),
    ],
    ids=["classes", "method", "channels", "size", "class names"],
)
def test_an_oodgate_checkpoint_of_another_model_is_refused_before_anything_trains(
    params, changes, message, capsys
):
    """Its spec is read from the file and compared with the config at preflight; another class count
    used to fail only at import, after the baseline had trained, and the flow exited 0 with
    'mine: FAILED, not gated'."""
    checkpoint = _oodgate_checkpoint(params.parent / "mine.pt", **changes)
    raw = yaml.safe_load(params.read_text())
    raw["losses"]["dismax_fpr"]["checkpoint"] = {"path": str(checkpoint), "format": "oodgate"}
    params.write_text(yaml.safe_dump(raw))
    assert cli.main(["import", "--params", str(params), "--quiet"]) == 2
    err = capsys.readouterr().err
    _refused_in_one_line(err, f"losses.dismax_fpr.checkpoint '{checkpoint}' holds a model with")
    assert re.search(message, err), err
    assert not (params.parent / "w").exists()  # nothing prepared, trained or imported


def test_an_oodgate_checkpoint_that_fits_passes_preflight(params):
    from oodgate.base.config import load_config
    from oodgate.running.preflight import preflight

    checkpoint = _oodgate_checkpoint(params.parent / "mine.pt")
    key = "losses.dismax_fpr.checkpoint"
    preflight(
        load_config(params, {key: {"path": str(checkpoint), "format": "oodgate"}}), project=params.parent
    )
