"""Bring your own trained model: checkpoints in each supported layout, written here from random
tensors under the key names the papers' public code uses, are imported, and the imported model's
logits equal an independent computation from the same tensors (the heads' formulas); an imported
loss then goes through the pipeline (gated, registered) like a trained one; a checkpoint trained by
oodgate itself, imported as if it came from elsewhere, gives the trained one's metrics bit for bit."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import evaluate_one, tiny_params

from oodgate.learning.classifier import ModelSpec, build_classifier
from oodgate.learning.importing import CheckpointError, import_model

C = 3  # classes


def _spec(backbone: str, method: str, channels: int = 1, size: int = 28, **options) -> ModelSpec:
    return ModelSpec(
        backbone, method, C, channels, size, (0.5,) * channels, (0.25,) * channels, "mps", options
    )


def _theirs_resnet(key: str) -> str:
    """oodgate's CIFAR ResNet key -> the papers' ResNet34 (``conv1``, ``bn1``, ``shortcut``)."""
    key = key.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.")
    return key.replace(".downsample.", ".shortcut.")


def _theirs_densenet(key: str) -> str:
    """oodgate's DenseNet-BC key -> the papers' DenseNet3 (``block1.layer.0.bn1``, ``trans1``, ``bn1``)."""
    m = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.(norm|conv)(\d)\.(.*)", key)
    if m:
        kind = "bn" if m[3] == "norm" else "conv"
        return f"block{m[1]}.layer.{int(m[2]) - 1}.{kind}{m[4]}.{m[5]}"
    m = re.match(r"features\.transition(\d+)\.(norm|conv)\.(.*)", key)
    if m:
        return f"trans{m[1]}.{'bn1' if m[2] == 'norm' else 'conv1'}.{m[3]}"
    return key.replace("features.conv0.", "conv1.").replace("features.norm_final.", "bn1.")


def _theirs_wrn(key: str) -> str:
    """oodgate's WideResNet key -> the LogitNorm code's (``block1.layer.0``, ``convShortcut``, ``bn1``)."""
    m = re.match(r"block(\d+)\.(\d+)\.(.*)", key)
    if m:
        return f"block{m[1]}.layer.{m[2]}.{m[3].replace('shortcut.', 'convShortcut.')}"
    return key.replace("bn.", "bn1.", 1) if key.startswith("bn.") else key


def _random_backbone(backbone: str, rename, channels: int = 1) -> dict[str, torch.Tensor]:
    """A backbone's tensors under the papers' names, random values (running stats positive)."""
    g = torch.Generator().manual_seed(1)
    own = build_classifier(_spec(backbone, "softmax", channels), 0).backbone.state_dict()
    out = {}
    for k, v in own.items():
        if v.dtype == torch.long:
            out[rename(k)] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[rename(k)] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[rename(k)] = torch.randn(v.shape, generator=g) * 0.1
    return out


def _images(channels: int = 1, size: int = 28) -> torch.Tensor:
    return torch.rand(5, channels, size, size, generator=torch.Generator().manual_seed(2))


def _save(tmp_path: Path, state: dict, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def _head(features: torch.Tensor, method: str, h: dict[str, torch.Tensor]) -> torch.Tensor:
    """The papers' head formulas, written out."""
    if method == "softmax":
        return features @ h["weights"].T + h["bias"]
    if method == "isomax":
        return -torch.cdist(features, h["prototypes"], compute_mode="donot_use_mm_for_euclid_dist")
    d = torch.cdist(
        F.normalize(features), F.normalize(h["prototypes"]), compute_mode="donot_use_mm_for_euclid_dist"
    )
    if method == "isomax_plus":
        return -h["distance_scale"].abs() * d
    iso = h["distance_scale"].abs() * d / math.sqrt(2.0)  # dismax
    return -(iso + iso.mean(dim=1, keepdim=True))


@pytest.mark.parametrize(
    ("backbone", "rename", "method"),
    [
        ("resnet34", _theirs_resnet, "isomax_plus"),
        ("resnet34", _theirs_resnet, "softmax"),
        ("densenet_bc_100", _theirs_densenet, "dismax"),
        ("densenet_bc_100", _theirs_densenet, "isomax"),
    ],
)
def test_entropic_layout_gives_the_heads_logits(tmp_path, backbone, rename, method):
    state = _random_backbone(backbone, rename)
    f = 342 if backbone == "densenet_bc_100" else 512
    g = torch.Generator().manual_seed(3)
    if method == "softmax":
        head = {"weights": torch.randn(C, f, generator=g), "bias": torch.randn(C, generator=g)}
    else:
        head = {"prototypes": torch.randn(C, f, generator=g)}
        if method != "isomax":
            head["distance_scale"] = torch.tensor([3.7])
    if method == "dismax":  # saved by the DisMax code, not part of the model oodgate runs
        head.update(
            temperature=torch.tensor([1.0]),
            validationset_available=torch.tensor([True]),
            precomputed_thresholds=torch.randn(2, 25, generator=g),
        )
    assert "classifier.prototypes" in {f"classifier.{k}" for k in head} or method == "softmax"
    path = _save(tmp_path, {**state, **{f"classifier.{k}": v for k, v in head.items()}}, "model1.pth")
    imported = import_model(path, "entropic", _spec(backbone, method))
    if method == "dismax":
        assert set(imported.ignored) == {
            "classifier.temperature",
            "classifier.validationset_available",
            "classifier.precomputed_thresholds",
        }
    model = imported.model
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _head(model.features(x), method, head), rtol=1e-5, atol=1e-5)
        # the backbone holds the file's tensors under oodgate's names
        first = next(k for k in state if "conv" in k and k.endswith("weight"))
        assert any(torch.equal(v, state[first]) for v in model.backbone.state_dict().values())


def test_logitnorm_layout_is_the_wideresnet_with_a_linear_head(tmp_path):
    state = _random_backbone("wrn_40_2", _theirs_wrn)
    assert "block1.layer.0.convShortcut.weight" in state and "bn1.running_mean" in state
    g = torch.Generator().manual_seed(4)
    fc = {"fc.weight": torch.randn(C, 128, generator=g), "fc.bias": torch.randn(C, generator=g)}
    path = _save(tmp_path, {"state_dict": {f"module.{k}": v for k, v in {**state, **fc}.items()}})
    model = import_model(path, "logitnorm", _spec("wrn_40_2", "logitnorm")).model
    x = _images()
    with torch.no_grad():
        expected = model.features(x) @ fc["fc.weight"].T + fc["fc.bias"]
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"holds a linear head.*not 'isomax_plus'"):
        import_model(path, "logitnorm", _spec("wrn_40_2", "isomax_plus"))


def test_torchvision_classifier_becomes_the_softmax_head(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=C)
    path = _save(tmp_path, net.state_dict())
    model = import_model(path, "torchvision", _spec("torchvision:resnet18", "softmax", 3, 32)).model
    x = _images(3, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - 0.5) / 0.25), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_that_does_not_fit_names_the_keys_and_shapes(tmp_path):
    state = _random_backbone("resnet34", _theirs_resnet)
    state["classifier.prototypes"] = torch.randn(C + 1, 512)  # another class count
    state["classifier.distance_scale"] = torch.tensor([1.0])
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        import_model(path, "entropic", _spec("resnet34", "isomax_plus"), source="losses.mine.checkpoint")
    message = str(e.value)
    assert "losses.mine.checkpoint does not fit resnet34 with a isomax_plus head for 3 classes" in message
    assert "1 missing (backbone.layer1.0.conv1.weight)" in message
    assert "1 unexpected (backbone.extra.weight)" in message
    assert "head.prototypes (4, 512) vs (3, 512)" in message
    # a backbone the format has no mapping of: the setting named, the backbones it maps, the way on
    for fmt, what, mapped, method in (
        ("entropic", "the papers' CIFAR backbones", "densenet_bc_100, resnet34", "isomax_plus"),
        ("logitnorm", "the LogitNorm code's WideResNets", "wrn_28_10, wrn_40_2", "logitnorm"),
    ):
        with pytest.raises(CheckpointError) as e:
            import_model(path, fmt, _spec("small_cnn", method), source="losses.mine.checkpoint")
        assert str(e.value) == (
            f"losses.mine.checkpoint: checkpoint.format {fmt!r} maps {what} ({mapped}), not model.backbone "
            "'small_cnn'; set model.backbone to one of them"
        )


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot be read as plain tensors"):
        import_model(path, "entropic", _spec("resnet34", "isomax"))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        import_model(tmp_path / "nope.pth", "entropic", _spec("resnet34", "isomax"))


def test_a_pickled_object_is_refused_without_pytorchs_advice_to_unpickle_it(tmp_path):
    """PyTorch's own message says that loading with weights_only=False "will likely succeed": running
    the file's pickle is exactly what must never happen, so the message says what to save instead."""
    torch.save({"model": _Payload(tmp_path / "ran"), "w": torch.zeros(2)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as e:
        import_model(tmp_path / "evil.pth", "entropic", _spec("resnet34", "isomax"))
    message = str(e.value)
    assert re.search(
        r"'.*evil\.pth' cannot be read as plain tensors \(UnpicklingError: it holds a pickled \S+ object\); "
        r"pickled objects are never loaded, only tensors: save the weights alone, with "
        r"torch\.save\(model\.state_dict\(\), path\)$",
        message,
    ), message
    assert "weights_only" not in message and "likely succeed" not in message and "\n" not in message
    assert not (tmp_path / "ran").exists()


class _Command:
    """What an attacker's checkpoint pickles: a call that runs a command."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_a_checkpoint_that_would_run_a_command_is_named_as_such_not_as_truncated(tmp_path):
    """PyTorch words a global from a module it blocks (os, posix, subprocess) differently from one
    outside its allow-list; the message named that file "truncated or not a torch.save file"."""
    torch.save({"state_dict": _Command()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        import_model(tmp_path / "evil.pt", "entropic", _spec("resnet34", "isomax"))
    message = str(e.value)
    assert "it holds a pickled posix.system object" in message, message
    assert "truncated" not in message and "likely succeed" not in message


def test_an_empty_or_truncated_checkpoint_says_which_with_its_size(tmp_path):
    """They used to share the advice to save with torch.save(model.state_dict(), path); the empty
    file's message was `(EOFError: )`. A legacy (non-zip) file cut inside its pickle makes PyTorch's
    unpickler read a cut name as a "global": still truncated, not a pickled object."""
    spec = _spec("resnet34", "isomax")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"'.*empty\.pth' is empty \(0 bytes\): .*; copy the file again"
    ):
        import_model(tmp_path / "empty.pth", "entropic", spec)
    whole = _save(tmp_path, {"w": torch.zeros(1000)}).read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        CheckpointError,
        match=rf"'.*cut\.pth' is truncated or not a torch\.save file \({len(whole) // 2} bytes; RuntimeError: "
        r"PytorchStreamReader failed reading zip archive[^)]*\); copy it again from where it was written",
    ):
        import_model(tmp_path / "cut.pth", "entropic", spec)
    torch.save({"w": torch.zeros(100)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pth").read_bytes()
    from oodgate.learning.classifier import save_classifier

    ours = save_classifier(build_classifier(_spec("small_cnn", "softmax", width=8), 0), tmp_path / "best.pt")
    ours = ours.read_bytes()  # an oodgate checkpoint, as `format: oodgate` reads
    # cut anywhere: torch raises RuntimeError, OSError (Invalid argument), EOFError, UnpicklingError, ...
    cuts = [(whole, n) for n in range(1, len(whole), 97)] + [(legacy, n) for n in range(1, len(legacy), 7)]
    cuts += [(ours, n) for n in range(1, len(ours), len(ours) // 40)]
    for data, n in cuts:
        (tmp_path / "cut.pth").write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=rf"is truncated or not a torch\.save file \({n} bytes; "):
            import_model(tmp_path / "cut.pth", "entropic", spec)


def test_every_backbone_a_format_maps_is_registered():
    """A layout mapped for a backbone oodgate does not have (wrn_16_8 and wrn_28_2 were) could never
    be used: preflight refuses the backbone's name first."""
    from oodgate.learning import models
    from oodgate.learning.importing import _BACKBONES

    mapped = {name for _, name in _BACKBONES}
    assert mapped and mapped <= set(models.names()), sorted(mapped - set(models.names()))


def test_an_isomax_plus_file_declared_dismax_or_the_reverse_is_refused_naming_both(embedded_root, tmp_path):
    """The two heads hold the same prototypes and distance scale but compute other logits; the DisMax
    code saves its temperature (and validation thresholds) with the head, the IsoMax+ code does not:
    the file says which it is, at config load too."""
    from oodgate.base.config import parse_config
    from oodgate.running.preflight import PreflightError, preflight

    state = _random_backbone("resnet34", _theirs_resnet)
    state.update(
        {"classifier.prototypes": torch.randn(C, 512), "classifier.distance_scale": torch.tensor([2.0])}
    )
    iso = _save(tmp_path, state, "isomax_plus.pth")
    extras = {
        "temperature": [1.0],
        "validationset_available": [False],
        "precomputed_thresholds": [[0.0] * 25] * 2,
    }
    dis = _save(
        tmp_path, {**state, **{f"classifier.{k}": torch.tensor(v) for k, v in extras.items()}}, "dismax.pth"
    )
    for path, saved, declared in ((iso, "IsoMax\\+", "dismax"), (dis, "DisMax", "isomax_plus")):
        found = "isomax_plus" if path == iso else "dismax"
        with pytest.raises(
            CheckpointError,
            match=rf"holds the head of {saved} \(classifier\.prototypes, classifier\.distance_scale.*\), not that of "
            rf".*, the loss's method \(method: {declared}, .*\); set the loss's method: {found}, or give",
        ):
            import_model(path, "entropic", _spec("resnet34", declared))
    raw = tiny_params(embedded_root, tmp_path / "w")
    raw["model"] = {"backbone": "resnet34"}
    raw["losses"]["dismax_fpr"]["checkpoint"] = {"path": str(iso), "format": "entropic"}
    with pytest.raises(
        PreflightError,
        match=rf"losses\.dismax_fpr\.checkpoint '{re.escape(str(iso))}' holds the head of IsoMax\+",
    ):
        preflight(parse_config(raw), project=tmp_path)
    assert (
        import_model(iso, "entropic", _spec("resnet34", "isomax_plus")).ignored == ()
    )  # as declared: imported


def test_the_demo_keeps_its_checkpoints_under_data_root_where_dvc_sees_them():
    """Outside data.root (the demo's models/ was), replacing a checkpoint left `dvc status` clean and
    `dvc repro` re-imported nothing: the inputs stage depends on data.root, not on other folders."""
    from conftest import REPO

    from oodgate.base.config import load_config

    cfg = load_config(REPO / "params" / "own_model.yaml")
    paths = [loss.checkpoint.path for loss in cfg.losses.values() if loss.checkpoint is not None]
    assert paths
    for path in paths:
        assert Path(cfg.data.root) in Path(path).parents, f"{path} is outside data.root {cfg.data.root!r}"


# ------------------------------------------------------------------ through the steps and the flow
def _imported_params(root, workdir, checkpoint: dict, **extra) -> dict:
    raw = tiny_params(root, workdir, epochs=1)
    raw["losses"] = {
        "softmax": {"method": "softmax"},
        "dismax_fpr": {"method": "dismax", "options": {"fpr": True}, "checkpoint": checkpoint},
    }
    raw.update(extra)
    return raw


@pytest.mark.slow
def test_a_checkpoint_trained_by_oodgate_imports_with_the_same_metrics_bit_for_bit(embedded_root, tmp_path):
    from oodgate.base.config import parse_config
    from oodgate.running import steps
    from oodgate.running.layout import Layout

    trained_cfg = parse_config(tiny_params(embedded_root, tmp_path / "trained", epochs=1))
    lay = Layout(Path(trained_cfg.workdir))
    steps.prepare(trained_cfg, lay.prepared)
    steps.train(trained_cfg, "dismax_fpr", 0, lay.prepared, lay.train("dismax_fpr", 0))
    steps.calibrate(
        trained_cfg, "dismax_fpr", 0, lay.train("dismax_fpr", 0), lay.prepared, lay.calibrate("dismax_fpr", 0)
    )
    trained = evaluate_one(
        trained_cfg,
        "dismax_fpr",
        0,
        lay.calibrate("dismax_fpr", 0),
        lay.prepared,
        lay.evaluate("dismax_fpr", 0),
    )
    outside = tmp_path / "elsewhere" / "model_seed{seed}.pt"  # as if another team handed it over
    outside.parent.mkdir()
    (outside.parent / "model_seed0.pt").write_bytes((lay.train("dismax_fpr", 0) / "best.pt").read_bytes())
    cfg = parse_config(
        _imported_params(embedded_root, tmp_path / "imported", {"path": str(outside), "format": "oodgate"})
    )
    ilay = Layout(Path(cfg.workdir))
    steps.prepare(cfg, ilay.prepared)
    t = steps.train(cfg, "dismax_fpr", 0, ilay.prepared, ilay.train("dismax_fpr", 0))
    assert t.imported["format"] == "oodgate" and t.epochs == 0 and t.inputs["step"] == "import"
    steps.calibrate(
        cfg, "dismax_fpr", 0, ilay.train("dismax_fpr", 0), ilay.prepared, ilay.calibrate("dismax_fpr", 0)
    )
    imported = evaluate_one(
        cfg, "dismax_fpr", 0, ilay.calibrate("dismax_fpr", 0), ilay.prepared, ilay.evaluate("dismax_fpr", 0)
    )
    assert imported.metrics == trained.metrics  # every metric, to the last digit
    # the fingerprint is the file's bytes, not its path or the training keys
    moved = parse_config(
        _imported_params(
            embedded_root,
            tmp_path / "imported",
            {"path": str(outside), "format": "oodgate"},
            train={"lr": 0.5},
        )
    )
    from oodgate.running.steps import inputs

    assert inputs.train_fingerprint(moved, "dismax_fpr", 0, "i") == inputs.train_fingerprint(
        cfg, "dismax_fpr", 0, "i"
    )
    before = inputs.train_fingerprint(cfg, "dismax_fpr", 0, "i")
    (outside.parent / "model_seed0.pt").write_bytes(b"other bytes")  # another file at the same path
    assert inputs.train_fingerprint(cfg, "dismax_fpr", 0, "i") != before
    with pytest.raises(CheckpointError, match=r"is truncated or not a torch\.save file \(11 bytes"):
        import_model(outside.parent / "model_seed0.pt", "oodgate", _spec("small_cnn", "dismax"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["entropic", "logitnorm", "torchvision"])
def test_the_pipeline_gates_and_registers_an_imported_loss(
    fmt, prefect_harness, project, mlflow_db, tmp_path
):
    """A loss whose weights come from a file, in each layout, through the real flow: imported (not
    trained), calibrated, evaluated, gated against the trained SoftMax baseline, and registered as
    the run's challenger; one checkpoint for every seed: the gate says its evidence is the test
    samples alone."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    raw = yaml.safe_load((project / "params.yaml").read_text())
    # Both losses imported where the format has a SoftMax head (entropic: a linear classifier;
    # logitnorm: its plain linear head): nothing is trained on these CIFAR-size backbones, which
    # would take minutes on a CPU and prove nothing more about importing.
    if fmt == "entropic":
        method, state = "isomax_plus", _random_backbone("resnet34", _theirs_resnet)
        base = dict(state, **{"classifier.weights": torch.randn(C, 512), "classifier.bias": torch.zeros(C)})
        state.update(
            {"classifier.prototypes": torch.randn(C, 512), "classifier.distance_scale": torch.tensor([2.0])}
        )
        raw["model"] = {"backbone": "resnet34"}
    elif fmt == "logitnorm":
        method, state = "logitnorm", _random_backbone("wrn_40_2", _theirs_wrn)
        base = dict(state, **{"fc.weight": torch.randn(C, 128) * 0.1, "fc.bias": torch.zeros(C)})
        state.update({"fc.weight": torch.randn(C, 128) * 0.1, "fc.bias": torch.zeros(C)})
        raw["model"] = {"backbone": "wrn_40_2"}
    else:
        import torchvision

        method, base = "softmax", None
        state = torchvision.models.mobilenet_v3_small(num_classes=C).state_dict()
        raw["model"] = {"backbone": "torchvision:mobilenet_v3_small"}
    (project / "models").mkdir()
    torch.save(state, project / "models" / "theirs.pth")
    raw["seeds"] = [0, 1]
    raw["gate"] = {"confidence": 0.95, "samples": 100}
    # a hundred-odd images per split: a CIFAR-size backbone's forward passes dominate this test on a CPU
    raw["data"].update(ood=["gaussian_noise"], ood_size=30, test_fraction=0.05, val_fraction=0.05)
    raw["losses"] = {
        "softmax": {"method": "softmax"},
        "theirs": {"method": method, "checkpoint": {"path": "models/theirs.pth", "format": fmt}},
    }
    if base is not None:
        torch.save(base, project / "models" / "base.pth")
        raw["losses"]["softmax"]["checkpoint"] = {"path": "models/base.pth", "format": fmt}
    if fmt == "torchvision":  # the imported model is the baseline; a trained LogitNorm the candidate
        raw["losses"] = {
            "softmax": {"method": "softmax", "checkpoint": {"path": "models/theirs.pth", "format": fmt}},
            "theirs": {"method": "logitnorm", "options": {"tau": 0.04}},
        }
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = pipeline(root=str(project))
    assert not result.failed, result.failed
    imported = "softmax" if fmt == "torchvision" else "theirs"
    decision = result.report.decisions["theirs"]
    assert len(decision.reasons) == 3
    # one checkpoint is one model: the comparison is of the two models on the same images, and the
    # seed-level evidence beside it says why there is none
    assert "Tango's paired score test" in decision.reasons[0]
    assert all("paired bootstrap, 100 resamples of the same " in r for r in decision.reasons[1:])
    single = "2 vs 1" if fmt == "torchvision" else "1 vs 1"  # both imported, or only the baseline
    assert decision.seed_level == (f"seed-level: not computed ({single} seeds; it needs 2 or more of each)",)
    assert result.registration is not None and result.registration.loss == "theirs"
    version = MlflowClient().get_model_version_by_alias("oodgate-classifier", "challenger")
    assert version.tags["oodgate.loss"] == "theirs"
    cache = list((project / "artifacts" / "cache").glob("train-*/train.json"))
    records = [yaml.safe_load(p.read_text()) for p in cache]
    (record,) = [r for r in records if r["loss"] == imported]  # one model for both seeds: imported once
    assert record["imported"]["format"] == fmt and record["epochs"] == 0
    assert np.isfinite(result.report.means[imported]["test/accuracy"])
