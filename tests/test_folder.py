"""Bring your own images: folder datasets, any image size, torchvision backbones, local weights.

The image folders are generated here (three classes of coloured noise, two sizes, JPEG and PNG, a
grayscale, an RGBA and an EXIF-rotated image, and a corrupt file). The end-to-end test runs the
real Prefect flow (test server), a real SQLite MLflow store and real `dvc` on a project whose
images are versioned with `dvc add`, then DVC's prepare stage on the same params.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from oodgate.base.config import ConfigError, parse_config
from oodgate.data import folder
from oodgate.data.load import load_data
from oodgate.learning.models import create_backbone
from oodgate.learning.models.torchvision_models import WeightsError, load_weights
from oodgate.running.preflight import PreflightError, check_names, preflight

CLASSES = ("cat", "dog", "fox")
REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, per_class: int = 24, classes=CLASSES, corrupt: bool = True) -> Path:
    """``root/<class>/<i>.(png|jpg)``: class c has its colour channel c high; sizes 48x64 and 70x50."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (48, 64) if i % 2 else (70, 50)
            base = np.zeros((h, w, 3), np.uint8)
            base[..., c % 3] = 180
            img = Image.fromarray((base + rng.integers(0, 70, (h, w, 3))).astype(np.uint8))
            if i == 3:
                img = img.convert("L")
            elif i == 5:
                img = img.convert("RGBA")
            img.save(d / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
    if corrupt:
        (root / classes[1] / "999.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def folder_params(root: str, workdir: str, **data) -> dict:
    return {
        "seeds": [0],
        "data": {
            "dataset": "folder",
            "root": root,
            "image_size": 32,
            "on_bad_image": "skip",
            "ood": ["gaussian_noise"],
            **data,
        },
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "milestones": [], "warmup_epochs": 0},
        "losses": {"softmax": {"method": "softmax"}, "isomax": {"method": "isomax"}},
        "gate": {"confidence": None},
        "workdir": workdir,
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images") / "photos")


# ------------------------------------------------------------------ decoding
def test_decode_applies_exif_orientation_alpha_and_centre_crop(tmp_path):
    # 40 wide x 20 high, left half red; EXIF orientation 6 (rotate 90 clockwise to display)
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20, 0] = 255
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    x = folder.decode_image(tmp_path / "rotated.jpg", 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.uint8
    # displayed upright it is 20 wide x 40 high with the red half on top; the centre crop keeps rows 10..30
    top, bottom = x[0, :4].mean(), x[0, -4:].mean()
    assert top > 200 and bottom < 60, (top, bottom)

    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent: white after compositing
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (folder.decode_image(tmp_path / "clear.png", 8) == 255).all()
    Image.fromarray(np.full((10, 30), 7, np.uint8), "L").save(tmp_path / "gray.png")
    g = folder.decode_image(tmp_path / "gray.png", 8)
    assert g.shape == (3, 8, 8) and (g == 7).all()


def test_folder_dataset_splits_sizes_and_channels(images):
    cfg = parse_config(folder_params(str(images), "w")).data
    b = load_data(cfg, images)
    assert b.class_names == list(CLASSES) and b.num_classes == 3
    assert b.in_channels == 3 and b.image_size == 32
    assert b.train.x.shape[1:] == (3, 32, 32) and b.ood["gaussian_noise"].x.shape[1:] == (3, 32, 32)
    assert len(b.train) + len(b.val) + len(b.test) == 3 * 24  # the corrupt file skipped
    assert sorted(b.test.y.unique().tolist()) == [0, 1, 2]  # stratified
    # the normalisation statistics are the training split's
    t = b.train.x.double() / 255
    assert np.allclose(b.mean, t.mean((0, 2, 3)).numpy(), atol=1e-6)
    # decoding in worker processes gives the same bytes
    b2 = load_data(cfg.model_copy(update={"workers": 2}), images)
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(b, s).x, getattr(b2, s).x) and torch.equal(
            getattr(b, s).y, getattr(b2, s).y
        )


def test_a_corrupt_image_fails_by_default_naming_it(images):
    cfg = parse_config(folder_params(str(images), "w", on_bad_image="fail")).data
    with pytest.raises(folder.BadImagesError, match=r"1 of 73 images .* cannot be read: .*dog/999\.jpg"):
        load_data(cfg, images)


@pytest.mark.parametrize("side", [12, 16], ids=["pillow-warns", "pillow-raises"])
def test_an_image_over_pillows_pixel_limit_is_a_bad_image_named_with_its_size(tmp_path, monkeypatch, side):
    """Pillow's decompression-bomb guard: over twice its limit its error had no file name; between
    the limit and twice it Pillow only warned and decoded the image. Both are a bad image here."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # an 8x8 image (64 pixels) is within it
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "big.png")
    paths = [tmp_path / "big.png", tmp_path / "ok.png"]
    x, kept, bad = folder.decode_files(paths, 8)
    assert kept.tolist() == [1] and x.shape == (1, 3, 8, 8)
    why = (
        f"ImageTooLargeError: {side * side} pixels, over Pillow's limit of 100 pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
    )
    assert bad == [(paths[0], why)]
    with pytest.raises(
        folder.BadImagesError,
        match=rf"^1 of 2 images under .* cannot be read: .*big\.png \({re.escape(why)}\); fix or remove "
        r"them, or set data\.on_bad_image: skip to leave them out$",
    ):
        folder.report_bad(bad, 2, tmp_path, "fail")
    folder.report_bad(bad, 2, tmp_path, "skip")  # data.on_bad_image: skip leaves it out


def test_classes_by_name_select_and_order(images):
    cfg = parse_config(folder_params(str(images), "w", classes=["fox", "cat"])).data
    b = load_data(cfg, images)
    assert b.class_names == ["fox", "cat"]
    # fox (channel 2 high) is label 0
    x0 = b.train.x[b.train.y == 0].double()
    assert x0[:, 2].mean() > x0[:, 0].mean() + 50


def test_presplit_layout_keeps_the_given_splits(tmp_path):
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        make_images(tmp_path / "ds" / split, per_class=n, classes=("a", "b"), corrupt=False)
    cfg = parse_config(folder_params(str(tmp_path / "ds"), "w")).data
    b = load_data(cfg, tmp_path / "ds")
    assert (len(b.train), len(b.val), len(b.test)) == (20, 6, 8)
    # train + test only: validation is carved from train
    shutil.rmtree(tmp_path / "ds" / "val")
    b = load_data(cfg, tmp_path / "ds")
    assert (len(b.train), len(b.val), len(b.test)) == (18, 2, 8)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", r"does not exist"),
        ("loose", r"holds no class folders \(2 loose images\)"),
        ("single", r"single class folder \('a'\)"),
        ("empty", r"class folder\(s\) b hold no images \(images per class: a: 2, b: 0\)"),
        ("unknown", r"no class folder 'zebra' .* found: a, b"),
        ("val_only", r"val but no train/ folder"),
    ],
)
def test_bad_layouts_fail_before_any_work_saying_what_was_found(tmp_path, layout, message):
    ds = tmp_path / "ds"
    params = folder_params(str(ds), "w")
    if layout == "loose":
        ds.mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(ds / f"{i}.png")
    elif layout in ("single", "empty", "unknown"):
        make_images(ds, per_class=2, classes=("a",) if layout == "single" else ("a", "b"), corrupt=False)
        if layout == "empty":
            for f in (ds / "b").iterdir():
                f.unlink()
        if layout == "unknown":
            params["data"]["classes"] = ["a", "zebra"]
    elif layout == "val_only":
        make_images(ds / "val", per_class=2, classes=("a", "b"), corrupt=False)
    cfg = parse_config(params)
    with pytest.raises(PreflightError, match=message):
        preflight(cfg, training=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"image_size": None}}, r"folder needs data.image_size"),
        ({"data": {"dataset": "embedded_mnist"}}, r"data.image_size applies to data.dataset: folder only"),
        ({"model": {"backbone": "torchvision:resnet_nine"}}, r"or torchvision:<name>"),
        ({"model": {"backbone": "torchvision:resnet18", "options": {"depth": 3}}}, r"'depth' rejected"),
        ({"model": {"backbone": "torchvision:vit_b_16"}}, r"does not take 32x32 images"),
        (
            {"train": {"epochs": 2, "freeze_backbone_epochs": 2}},
            r"freeze_backbone_epochs=2 \(must be below epochs",
        ),
        ({"train": {"crop_scale": [0.5, 0.2]}}, r"crop_scale must be 0 < low <= high <= 1"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path, change, message):
    """Refused when the config is loaded, or by the name checks every entry point runs next."""
    params = folder_params(str(tmp_path), "w")
    for section, values in change.items():
        params[section] = values if section == "model" else {**params[section], **values}
    with pytest.raises((ConfigError, PreflightError), match=message):
        check_names(parse_config(params))


# ------------------------------------------------------------------ backbones and weights
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small"])
def test_torchvision_backbones_give_features_at_any_size(arch):
    net = create_backbone(f"torchvision:{arch}", in_channels=3, image_size=64).eval()
    with torch.no_grad():
        for size in (32, 64):
            assert net(torch.rand(2, 3, size, size)).shape == (2, net.out_features)
    gray = create_backbone(f"torchvision:{arch}", in_channels=1, image_size=32).eval()
    with torch.no_grad():
        assert gray(torch.rand(2, 1, 32, 32)).shape == (2, gray.out_features)


def test_weights_load_from_a_torchvision_state_dict_and_bad_files_are_named(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(num_classes=7)  # its fc is not ours: ignored
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    net = create_backbone("torchvision:resnet18", in_channels=3, image_size=32)
    counts = load_weights(net, tmp_path / "r18.pth")
    assert counts["ignored"] == 2 and torch.equal(net.net.conv1.weight, source.conv1.weight)

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(
        WeightsError, match=r"does not fit backbone resnet18: .*unexpected \(layer1\.2\.conv1"
    ):
        load_weights(net, tmp_path / "r34.pth")
    sd = source.state_dict()
    sd["conv1.weight"] = sd["conv1.weight"][:, :1]
    torch.save(sd, tmp_path / "gray.pth")
    with pytest.raises(WeightsError, match=r"of another shape \(file vs model: conv1.weight \(64, 1, 7, 7\)"):
        load_weights(net, tmp_path / "gray.pth")
    with pytest.raises(WeightsError, match=r"does not exist"):
        load_weights(net, tmp_path / "absent.pth")
    torch.save({"model": object()}, tmp_path / "pickled.pth")  # anything but tensors is refused unread
    with pytest.raises(WeightsError, match=r"cannot be loaded as plain tensors"):
        load_weights(net, tmp_path / "pickled.pth")


def test_fine_tuning_freezes_the_backbone_then_trains_it_slower(images, tmp_path):
    import torchvision
    from conftest import interrupted_after

    from oodgate.running import steps

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "pre.pth")
    params = folder_params(str(images), str(tmp_path / "w"))
    params["model"] = {"backbone": "torchvision:resnet18", "weights": str(tmp_path / "pre.pth")}
    params["train"].update(epochs=2, freeze_backbone_epochs=1, backbone_lr=0.1, augment="resized_crop_flip")
    cfg = parse_config(params)
    steps.prepare(cfg, tmp_path / "prepared", images)
    pre = torch.load(tmp_path / "pre.pth", weights_only=True)
    interrupted_after(
        1, lambda hooks: steps.train(cfg, "softmax", 0, tmp_path / "prepared", tmp_path / "t1", hooks)
    )
    after1 = torch.load(tmp_path / "t1" / "last.pt", weights_only=True)["model"]
    # epoch 1: the backbone (weights and batch-norm statistics) is the pretrained file's, the head moved
    for k, v in pre.items():
        if not k.startswith("fc."):
            assert torch.equal(after1[f"backbone.net.{k}"], v), k
    two = steps.train(cfg, "softmax", 0, tmp_path / "prepared", tmp_path / "t1")
    after2 = torch.load(Path(two.dir) / "last.pt", weights_only=True)
    assert not torch.equal(after2["model"]["backbone.net.conv1.weight"], pre["conv1.weight"])
    groups = after2["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.005, 0.05])
    # the fingerprint holds the weights' bytes: another file of the same name trains again
    from oodgate.running.steps.inputs import train_fingerprint

    fp = train_fingerprint(cfg, "softmax", 0, "x")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "pre.pth")
    assert train_fingerprint(cfg, "softmax", 0, "x") != fp


def test_resized_crop_is_seeded_and_keeps_the_shape():
    from oodgate.learning.training.engine import augment

    x = torch.rand(8, 3, 16, 16)
    a = augment(x, "resized_crop_flip", torch.Generator().manual_seed(1), scale=(0.2, 1.0))
    b = augment(x, "resized_crop_flip", torch.Generator().manual_seed(1), scale=(0.2, 1.0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    flat = torch.full((4, 3, 16, 16), 0.3)
    assert torch.allclose(augment(flat, "resized_crop", torch.Generator().manual_seed(0)), flat)


def test_monitoring_fits_folder_images_like_the_training_images(images):
    from oodgate.watching.monitoring import load_batch

    batch = load_batch(images / "cat", (3, 32, 32), fit=True)
    assert batch.x.shape == (24, 3, 32, 32) and batch.x.dtype == np.float32
    expected = folder.decode_image(images / "cat" / "000.jpg", 32) / 255.0
    assert np.allclose(batch.x[0], expected)


# ------------------------------------------------------------------ the user's path, end to end
def _dvc(root: Path, *args: str) -> str:
    import os

    # the stages run `python -m oodgate ...`: this interpreter's environment first on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(root), "PATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_flow_and_dvc_on_a_folder_dataset_with_a_pretrained_torchvision_backbone(
    prefect_harness, mlflow_db, tmp_path
):
    import os

    import mlflow
    import torchvision
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    project = tmp_path / "project"
    make_images(project / "images" / "photos", per_class=16)
    (project / "images" / "weights").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), project / "images" / "weights" / "resnet18.pth")
    shutil.copytree(REPO / "oodgate", project / "oodgate", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    params = folder_params("images", "artifacts", path="photos")
    params["model"] = {"backbone": "torchvision:resnet18", "weights": "images/weights/resnet18.pth"}
    params["train"].update(epochs=2, freeze_backbone_epochs=1, backbone_lr=0.1, augment="resized_crop_flip")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(project, "init", "--no-scm", "-q")
    _dvc(project, "add", "-q", "images")

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the flow takes every relative path from its project, not the working directory
    try:
        result = pipeline(root=str(project))
    finally:
        os.chdir(cwd)
    assert not result.failed
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    children = {
        r.info.run_name: r
        for r in client.search_runs([parent.info.experiment_id])
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"softmax", "isomax"}
    for run in children.values():
        assert run.info.status == "FINISHED" and np.isfinite(run.data.metrics["ood/mean/fpr95"])
    assert parent.data.params["model.backbone"] == "torchvision:resnet18"

    # the logged model takes 3x32x32 images, uint8 or float, and says so
    uri = children["isomax"].data.tags["oodgate.model_uri"]
    info = mlflow.models.get_model_info(uri)
    assert info.metadata["input_shape"] == [-1, 3, 32, 32] and info.metadata["preprocessing"] == "fit"
    model = mlflow.pyfunc.load_model(uri)
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    table = model.predict(x)
    assert list(table["predicted"].unique()) and set(table["predicted"]) <= set(CLASSES)
    assert np.allclose(model.predict(x.astype(np.float32) / 255)["score"], table["score"], atol=1e-5)

    # dvc repro of the same params prepares the same bytes from the versioned folder (the stages
    # downstream reuse the flow's results under the same fingerprints: test_dvc covers them)
    out = _dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in out
    flow_prepared = next((project / "artifacts" / "cache").glob("prepared-*"))
    for name in ("id.pt", "ood.pt"):
        assert (project / "artifacts" / "prepared" / name).read_bytes() == (flow_prepared / name).read_bytes()
    assert "Data and pipelines are up to date" in _dvc(project, "status", "prepare")
