"""Each method at its best without the test: the validation OOD sets (``data.ood_val``), the score
chosen on them (``score: auto``), the proof that the test OOD sets cannot change the choice, the
refusals of validation data that overlaps the test, and the prototypes' training made visible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_params

from oodgate.base.config import ConfigError, parse_config
from oodgate.data import embedded
from oodgate.learning.training import engine
from oodgate.measuring.evaluation import ScoreChoice, choose_score
from oodgate.running import steps
from oodgate.running.preflight import PreflightError, preflight


# ---------------------------------------------------------------- the choice, on validation figures
def test_auto_takes_the_lowest_validation_fpr95_over_the_seeds_then_auroc_then_the_method_order():
    per_seed = {
        0: {"mmles": (0.60, 0.80), "mps": (0.30, 0.90), "entropic": (0.25, 0.91)},
        1: {"mmles": (0.56, 0.82), "mps": (0.20, 0.93), "entropic": (0.27, 0.90)},
    }
    c = choose_score("auto", ("mmles", "mps", "entropic"), per_seed, ("glyphs",))
    # means: mmles 0.58, mps 0.25, entropic 0.26: mps, although seed 0 alone would take entropic
    assert c.score == "mps" and c.mode == "auto" and c.validation["mps"] == pytest.approx((0.25, 0.915))
    assert c.text() == "mps (auto: 0.25 vs mmles 0.58 on glyphs)"
    assert c.metrics(1) == {
        "selection/mmles/fpr95": 0.56,
        "selection/mmles/auroc": 0.82,
        "selection/mps/fpr95": 0.20,
        "selection/mps/auroc": 0.93,
        "selection/entropic/fpr95": 0.27,
        "selection/entropic/auroc": 0.90,
    }
    tie = {0: {"a": (0.3, 0.8), "b": (0.3, 0.9), "c": (0.3, 0.9)}}
    assert choose_score("auto", ("a", "b", "c"), tie, ("v",)).score == "b"  # AUROC, then the order
    default_wins = choose_score("auto", ("a", "b"), {0: {"a": (0.1, 0.9), "b": (0.2, 0.9)}}, ("v",))
    assert default_wins.text() == "a (auto: 0.10, the default, vs b 0.20 on v)"
    assert choose_score("energy", ("a", "b"), per_seed, ("v",)).text() == "energy (named)"
    assert choose_score(None, ("a", "b"), {}, ("v",)).text() == "a (the method's default)"
    unvalidated = choose_score("auto", ("a", "b"), {}, ())
    assert unvalidated.score == "a" and "no data.ood_val" in unvalidated.text()
    assert ScoreChoice.of(json.loads(json.dumps(c.record()))) == c  # what choice.json holds


# ---------------------------------------------------------------- the validation OOD sets
def test_the_validation_sets_are_the_same_bytes_every_time_and_share_no_image_with_the_test_sets(
    embedded_root,
):
    glyphs, portraits = embedded.glyph_array(), embedded.portrait_patch_array()
    assert glyphs.shape == (1000, 28, 28) and portraits.shape == (500, 28, 28)
    assert glyphs.dtype == portraits.dtype == np.uint8
    assert np.array_equal(glyphs, np.load(Path(embedded_root) / "embedded" / embedded.GLYPHS))
    # MNIST-style: every glyph has ink, centred by mass within a pixel of the middle
    assert (glyphs.reshape(1000, -1).max(axis=1) > 200).all()
    ys, xs = np.indices((28, 28))
    mass = glyphs.reshape(1000, -1).sum(axis=1)
    cy = (glyphs * ys).reshape(1000, -1).sum(axis=1) / mass
    cx = (glyphs * xs).reshape(1000, -1).sum(axis=1) / mass
    assert np.abs(cy - 13.5).max() < 1.5 and np.abs(cx - 13.5).max() < 1.5
    tests = {
        img.tobytes()
        for name in (embedded.PHOTO_PATCHES, embedded.MNIST_IMAGES)
        for img in np.load(Path(embedded_root) / "embedded" / name)
    }
    assert not any(img.tobytes() in tests for img in (*glyphs, *portraits))


def test_validation_data_overlapping_a_test_set_is_refused(embedded_root, tmp_path):
    raw = tiny_params(embedded_root, tmp_path / "w")
    with pytest.raises(ConfigError, match=r"data\.ood_val: 'gaussian_noise' is also a test OOD set"):
        parse_config({**raw, "data": {**raw["data"], "ood_val": ["gaussian_noise"]}})
    with pytest.raises(ConfigError, match=r"data\.ood_val lists 'glyphs' twice"):
        parse_config({**raw, "data": {**raw["data"], "ood_val": ["glyphs", "glyphs"]}})
    # by path: the same folder, or one inside the other
    folder = tmp_path / "mine"
    (folder / "val").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / f"{i}.png")
        Image.fromarray(np.full((28, 28), 40 * i + 1, np.uint8)).save(folder / "val" / f"{i}.png")
    ood = [{"name": "mine", "path": str(folder), "group": "far"}]
    for val_path in (folder, folder / "val"):
        cfg = parse_config(
            {**raw, "data": {**raw["data"], "ood": ood, "ood_val": [{"name": "v", "path": str(val_path)}]}}
        )
        with pytest.raises(PreflightError, match=r"data\.ood_val: 'v' .* overlaps the test OOD set 'mine'"):
            preflight(cfg, training=False, project=tmp_path)
    # by content: the same images under another name are refused when the data is read
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "x.png").write_bytes((folder / "1.png").read_bytes())
    cfg = parse_config(
        {**raw, "data": {**raw["data"], "ood": ood, "ood_val": [{"name": "v", "path": str(copy)}]}}
    )
    preflight(cfg, training=False, project=tmp_path)  # other paths: only the pixels tell
    with pytest.raises(
        ValueError, match=r"data\.ood_val: 'v' shares 1 images .* with the test OOD set 'mine'"
    ):
        steps.prepare(cfg, tmp_path / "prepared")


def test_the_test_ood_sets_cannot_change_the_choice(embedded_root, tmp_path):
    """The same models and validation sets, two entirely different sets of test OOD data: the
    choice and every validation figure it rests on are the same to the last digit, although the
    prepared OOD file (and so every evaluation) differs. The test images never reach the choice."""
    raw = tiny_params(embedded_root, tmp_path / "w", epochs=1)
    raw["seeds"] = [0, 1]
    results = {}
    for name, ood in {
        "a": ["mnist_unseen", "gaussian_noise"],
        "b": ["uniform_noise", "photo_patches"],
    }.items():
        cfg = parse_config({**raw, "data": {**raw["data"], "ood": ood}})
        prep = tmp_path / name / "prepared"
        steps.prepare(cfg, prep)
        calibrated = {}
        for seed in cfg.seeds:
            steps.train(cfg, "dismax_fpr", seed, prep, tmp_path / name / f"t{seed}")
            steps.calibrate(
                cfg, "dismax_fpr", seed, tmp_path / name / f"t{seed}", prep, tmp_path / name / f"c{seed}"
            )
            calibrated[seed] = tmp_path / name / f"c{seed}"
        chosen = steps.select(cfg, "dismax_fpr", calibrated, prep, tmp_path / name / "s")
        results[name] = (chosen, (prep / "ood.pt").read_bytes())
    (a, ood_a), (b, ood_b) = results["a"], results["b"]
    assert ood_a != ood_b and a.fingerprint != b.fingerprint  # another prepared file: chosen again
    assert a.choice == b.choice  # the same score, from the same figures, to the last digit
    assert a.choice["mode"] == "auto" and set(a.choice["validation"]) == {
        "mmles",
        "mps",
        "entropic",
        "mds",
        "energy",
    }


# ---------------------------------------------------------------- the prototypes' training
def test_prototype_figures_are_the_norm_and_the_cosine_with_the_start():
    start = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    now = torch.tensor([[6.0, 8.0], [0.0, 2.0]])  # the first only grew; the second turned 90 degrees
    f = engine.prototype_figures(now, start)
    assert f["prototype_norm"] == pytest.approx((10.0 + 2.0) / 2)
    assert f["prototype_cosine_min"] == pytest.approx(0.0, abs=1e-12)
    assert f["prototype_cosine_mean"] == pytest.approx(0.5)
    assert set(engine.prototype_figures(now, torch.zeros(2, 2))) == {"prototype_norm"}  # IsoMax starts at 0
    still = [{"prototype_norm": 8.0, "prototype_cosine_min": 0.995}] * 15
    warning = engine.prototypes_still(still)
    assert warning.startswith("the prototypes have not moved: after 15 epochs") and "300 epochs" in warning
    assert engine.prototypes_still([{"prototype_norm": 3.0, "prototype_cosine_min": 0.5}]) is None
    assert engine.prototypes_still([{"prototype_norm": 3.0}]) is None and engine.prototypes_still([]) is None


def test_training_records_the_prototypes_each_epoch_and_warns_when_they_never_moved(
    embedded_root, prepared_dir, tmp_path, caplog
):
    cfg = parse_config(tiny_params(embedded_root, tmp_path / "w", epochs=2))
    t = steps.train(cfg, "dismax_fpr", 0, prepared_dir, tmp_path / "d")
    history = json.loads((tmp_path / "d" / "history.json").read_text())
    assert [
        set(h) >= {"prototype_norm", "prototype_cosine_min", "prototype_cosine_mean"} for h in history
    ] == [True] * 2
    assert t.prototypes["cosine_min"] == history[-1]["prototype_cosine_min"] >= engine.PROTOTYPES_STILL
    assert t.prototypes["warning"].startswith("the prototypes have not moved")
    assert "the prototypes have not moved" in caplog.text
    assert json.loads((tmp_path / "d" / "train.json").read_text())["prototypes"] == t.prototypes
    s = steps.train(cfg, "softmax", 0, prepared_dir, tmp_path / "s")
    assert (
        s.prototypes == {}
        and "prototype_norm" not in json.loads((tmp_path / "s" / "history.json").read_text())[0]
    )
    assert math.isfinite(t.prototypes["norm"])
