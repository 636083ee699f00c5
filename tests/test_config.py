"""The typed config: every bad value is named, with the value and what is allowed."""

from __future__ import annotations

import copy

import pytest
import yaml

from oodgate.cli import main
from oodgate.config import ConfigError, load_config, parse_config


def test_repository_params_are_valid(repo_params):
    cfg = parse_config(repo_params)
    assert cfg.gate.baseline == "softmax"
    assert cfg.losses["dismax_fpr"].options == {"fpr": True, "alpha": 1.0}
    assert cfg.candidates() == ["isomax", "dismax_fpr", "logitnorm"]
    assert cfg.seeds == [0, 1, 2] and cfg.gate.confidence == 0.95
    with pytest.raises(Exception, match="frozen"):
        cfg.train.epochs = 3  # type: ignore[misc]


def _with(base: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(base)
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return raw


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("train.epochs", 0, r"train\.epochs: Input should be greater than or equal to 1 \(got 0\)"),
        ("train.lr", -0.1, r"train\.lr: .*greater than 0 \(got -0\.1\)"),
        ("train.epochs_typo", 3, r"train\.epochs_typo: unknown key"),
        (
            "train.augment",
            "mixup",
            r"train\.augment: .*'none', 'crop_flip', 'crop', 'resized_crop_flip' or 'resized_crop' \(got 'mixup'\)",
        ),
        ("train.milestones", [20], r"milestones must be increasing epochs in \(0, epochs=15\), got \[20\]"),
        ("data.val_fraction", 0.7, r"data\.val_fraction: .*less than 0\.5 \(got 0\.7\)"),
        ("data.classes", [1, 1], r"data\.classes: needs at least 2 distinct"),
        ("seeds", [0, 0], r"seeds: must be distinct"),
        ("seeds", [], r"seeds: .*at least 1"),
        ("schedule.cron", "every day", r"schedule\.cron: must be a 5-field cron expression"),
        ("calibration.objective", "brier", r"calibration\.objective: .*'nll' or 'ece' \(got 'brier'\)"),
        ("gate.baseline", "softmax2", r"gate\.baseline='softmax2' is not a key of losses"),
        ("gate.confidence", 1.5, r"gate\.confidence: .*less than 1 \(got 1\.5\)"),
        ("gate.bootstrap", {"enabled": True}, r"gate: gate\.bootstrap was replaced.*gate\.confidence"),
        ("gate.fpr95.over", "median", r"gate\.fpr95\.over: .*'mean', 'groups' or 'worst' \(got 'median'\)"),
        ("gate.fpr95", "worst", r"gate\.fpr95 is a section now: write gate\.fpr95: \{over: worst\}"),
        (
            "gate.accuracy_margin",
            0.01,
            r"gate\.accuracy_margin was replaced.*gate\.accuracy: \{test: noninferior",
        ),
        ("gate.ece.test", "better", r"gate\.ece\.test: .*'superior' or 'noninferior' \(got 'better'\)"),
        ("gate.accuracy.margin", -0.1, r"gate\.accuracy\.margin: .*greater than or equal to 0"),
        ("seeds", [0], r"gate\.confidence=0\.95 needs at least 2 seeds.*gate\.confidence: null"),
        ("train.warmup_epochs", 99, r"train\.warmup_epochs=99 must be below train\.epochs"),
        ("data.ood", [{"name": "letters", "path": "x.npz"}], r"'letters' needs a group: near .* or far"),
        ("data.ood", ["mnist_unseen", "worst"], r"data\.ood: 'worst' names a summary over OOD sets"),
        ("data.ood", [{"name": "x", "path": "x.npz", "group": "middle"}], r"group: .*'near' or 'far'"),
        (
            "losses.dismax",
            {"method": "dismaxx"},
            r"losses\.dismax: unknown method 'dismaxx'; valid methods: dismax",
        ),
        (
            "losses.dismax",
            {"method": "dismax", "options": {"fp": True}},
            r"losses\.dismax: method 'dismax': unknown option 'fp'",
        ),
        (
            "losses.isomax",
            {"method": "isomax", "score": "msp"},
            r"losses\.isomax: unknown score 'msp'; valid scores: energy",
        ),
        ("losses", {}, r"losses: .*at least 1"),
    ],
)
def test_bad_values_are_named(repo_params, key, value, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_with(repo_params, key, value), "params.yaml")


def test_baseline_must_be_softmax(repo_params):
    raw = _with(repo_params, "gate.baseline", "dismax_fpr")
    with pytest.raises(
        ConfigError, match=r"gate.baseline='dismax_fpr' must use method 'softmax', got 'dismax'"
    ):
        parse_config(raw)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_overrides_use_dotted_keys(tmp_path, repo_params):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(repo_params))
    cfg = load_config(p, {"train.epochs": 3, "train.milestones": [], "train.warmup_epochs": 1})
    assert cfg.train.epochs == 3


def test_cli_rejects_bad_params_before_any_work(tmp_path, repo_params, capsys):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(_with(repo_params, "train.batch_size", 1)))
    raw = _with(repo_params, "workdir", str(tmp_path / "artifacts"))
    p.write_text(yaml.safe_dump(_with(raw, "train.batch_size", 1)))
    assert main(["run", "--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "(got 1)" in err
    assert not (tmp_path / "artifacts").exists()  # nothing was written


def test_every_shipped_params_file_is_valid():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "params").glob("*.yaml"))
    assert files, "params/ holds the full-scale configurations"
    for f in files:
        load_config(f)


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        (
            "model",
            {"backbone": "resnet99"},
            r"model\.backbone='resnet99' is not a known backbone; valid backbones: .*small_cnn",
        ),
        (
            "model",
            {"backbone": "small_cnn", "options": {"depth": 3}},
            r"model\.options: unknown option\(s\) 'depth' .*valid options: width",
        ),
        (
            "data",
            {"dataset": "imagenet"},
            r"data\.dataset='imagenet' is not a known dataset; valid datasets: .*embedded_mnist",
        ),
        (
            "data",
            {"ood": ["mnist_unseen", "nope"]},
            r"data\.ood: 'nope' is not a known OOD set; valid sets: .*photo_patches",
        ),
        ("data", {"ood": ["gaussian_noise", "gaussian_noise"]}, r"data\.ood lists 'gaussian_noise' twice"),
        ("data", {"ood": []}, r"data\.ood is empty: .*nothing could ever be promoted"),
    ],
    ids=["backbone", "backbone-option", "dataset", "ood-name", "ood-twice", "no-ood"],
)
def test_names_the_code_cannot_honour_fail_at_load(repo_params, section, value, message):
    raw = {**repo_params, section: {**repo_params[section], **value}}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_an_ood_set_with_a_path_may_have_any_name(repo_params):
    raw = {
        **repo_params,
        "data": {**repo_params["data"], "ood": [{"name": "letters", "path": "x.npz", "group": "near"}]},
    }
    assert parse_config(raw).data.ood[0].name == "letters"


def test_a_rejected_value_is_shown_once(repo_params):
    with pytest.raises(ConfigError) as e:
        parse_config({**repo_params, "data": {**repo_params["data"], "classes": [0]}})
    assert str(e.value).count("[0]") == 1 and "(got [0])" in str(e.value)
