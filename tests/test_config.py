"""The typed config: every bad value is named, with the value and what is allowed."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from oodgate.base.config import ConfigError, load_config, parse_config
from oodgate.running.cli import main
from oodgate.running.preflight import check_names


def _checked(raw: dict, source: str = "<dict>"):
    """The config as every entry point has it before work starts: parsed, and its names checked."""
    cfg = parse_config(raw, source)
    check_names(cfg)
    return cfg


def test_repository_params_are_valid(repo_params):
    cfg = _checked(repo_params)
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
        (
            "train.milestones",
            [20],
            r"train\.epochs=15 conflicts with train\.milestones=\[20\] \(each must be below",
        ),
        (
            "train.milestones",
            [5, 2],
            r"milestones must be increasing epochs in \(0, epochs=15\), got \[5, 2\]",
        ),
        ("data.val_fraction", 0.7, r"data\.val_fraction: .*less than 0\.5 \(got 0\.7\)"),
        ("data.classes", [1, 1], r"data\.classes: needs at least 2 distinct"),
        ("seeds", [0, 0], r"seeds: must be distinct"),
        ("seeds", [], r"seeds: .*at least 1"),
        ("schedule.cron", "every day", r"schedule\.cron: must be a 5-field cron expression"),
        ("calibration.objective", "brier", r"calibration\.objective: .*'nll' or 'ece' \(got 'brier'\)"),
        ("gate.baseline", "softmax2", r"gate\.baseline='softmax2' is not a key of losses"),
        ("gate.confidence", 1.5, r"gate\.confidence: .*less than 1 \(got 1\.5\)"),
        (
            "gate.bootstrap",
            {"enabled": True},
            r"in params\.yaml: gate\.bootstrap was replaced.*gate\.confidence",
        ),
        ("gate.fpr95.over", "median", r"gate\.fpr95\.over: .*'mean', 'groups' or 'worst' \(got 'median'\)"),
        ("gate.fpr95", "worst", r"gate\.fpr95 is a section now: write gate\.fpr95: \{over: worst\}"),
        (
            "gate.accuracy_margin",
            0.01,
            r"gate\.accuracy_margin was replaced.*gate\.accuracy: \{test: noninferior",
        ),
        ("gate.ece.test", "better", r"gate\.ece\.test: .*'superior' or 'noninferior' \(got 'better'\)"),
        ("gate.accuracy.margin", -0.1, r"gate\.accuracy\.margin: .*greater than or equal to 0"),
        (
            "gate.evidence",
            "seeds",  # the repository's params have 3 seeds: made 1 below
            r"gate\.evidence=seeds at gate\.confidence=0\.95 needs at least 2 seeds.*gate\.evidence: models",
        ),
        ("gate.evidence", "runs", r"gate\.evidence: .*'models' or 'seeds' \(got 'runs'\)"),
        ("train.warmup_epochs", 99, r"conflicts with train\.warmup_epochs=99 \(must be below epochs\)"),
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
    raw = _with(repo_params, key, value)
    if value == "seeds":
        raw["seeds"] = [0]
    with pytest.raises(ConfigError, match=match):
        _checked(raw, "params.yaml")


def test_one_seed_is_enough_for_model_level_evidence(repo_params):
    """gate.evidence: models compares two models on the same images: no seed spread is needed."""
    raw = _with(repo_params, "seeds", [0])
    assert parse_config(raw).gate.evidence == "models"


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
        check_names(load_config(f))


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
def test_names_the_code_cannot_honour_fail_before_any_work(repo_params, section, value, message):
    raw = {**repo_params, section: {**repo_params[section], **value}}
    with pytest.raises(ConfigError, match=message):
        _checked(raw)


def test_an_ood_set_with_a_path_may_have_any_name(repo_params):
    raw = {
        **repo_params,
        "data": {**repo_params["data"], "ood": [{"name": "letters", "path": "x.npz", "group": "near"}]},
    }
    assert _checked(raw).data.ood[0].name == "letters"


def test_a_rejected_value_is_shown_once(repo_params):
    with pytest.raises(ConfigError) as e:
        parse_config({**repo_params, "data": {**repo_params["data"], "classes": [0]}})
    assert str(e.value).count("[0]") == 1 and "(got [0])" in str(e.value)


# ------------------------------------------------------------------ names, epochs, files, --set
@pytest.mark.parametrize("name", ["my/set", "../up", ".hidden", "two words", "x\\y"])
def test_an_ood_set_name_that_cannot_name_a_file_is_refused_with_the_rule(repo_params, name):
    """It names files (roc_<name>.csv) and metrics (ood/<name>/fpr95): 'my/set' used to be accepted
    and the run crashed after training."""
    raw = _with(repo_params, "data.ood", [{"name": name, "path": "x.npz", "group": "far"}])
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "params.yaml")
    message = str(e.value)
    assert f"data.ood: the name {name!r} is not allowed" in message
    assert "letters, digits, '_', '-' and '.' only, not starting with '.'" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["letters", "letters.v2", "my-set_1", "SVHN"])
def test_an_ood_set_name_of_letters_digits_and_dots_is_accepted(repo_params, name):
    raw = _with(repo_params, "data.ood", [{"name": name, "path": "x.npz", "group": "near"}])
    assert parse_config(raw).data.ood[0].name == name


def test_a_bad_ood_name_is_refused_by_the_cli_in_one_line(tmp_path, repo_params, capsys):
    p = tmp_path / "params.yaml"
    raw = _with(repo_params, "workdir", str(tmp_path / "artifacts"))
    p.write_text(
        yaml.safe_dump(_with(raw, "data.ood", [{"name": "my/set", "path": "x.npz", "group": "far"}]))
    )
    assert main(["run", "--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration in ") and err.count("\n") == 1, err
    assert "'my/set' is not allowed" in err
    assert not (tmp_path / "artifacts").exists()


def test_shortening_a_run_names_every_conflict_and_the_overrides_that_work(tmp_path, repo_params):
    """`--set train.epochs=2` on the default params conflicts with train.milestones ([10]) and
    train.warmup_epochs (3); it used to take three refusals to find out."""
    from oodgate.base.config import parse_overrides

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(repo_params))
    with pytest.raises(ConfigError) as e:
        load_config(p, parse_overrides(["train.epochs=2"]))
    message = str(e.value)
    assert "\n" not in message
    assert "train.epochs=2 conflicts with train.milestones=[10] (each must be below epochs)" in message
    assert "and train.warmup_epochs=3 (must be below epochs)" in message
    command = "--set train.epochs=2 --set train.milestones=[] --set train.warmup_epochs=0"
    assert command in message
    items = command.replace("--set ", "").split()
    assert load_config(p, parse_overrides(items)).train.epochs == 2  # the advice works as given


def test_a_conflict_keeps_the_milestones_that_still_fit(repo_params):
    raw = _with(_with(repo_params, "train.milestones", [3, 10]), "train.epochs", 5)
    with pytest.raises(ConfigError, match=r"--set train\.epochs=5 --set train\.milestones=\[3\] \(or"):
        parse_config(raw)


@pytest.mark.parametrize(
    "content",
    [
        # the first bytes of a PNG image
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89",
        bytes(range(256)) * 4,
    ],
    ids=["png", "random-bytes"],
)
def test_a_binary_params_file_is_refused_with_its_path(tmp_path, content, capsys):
    """It used to end in a UnicodeDecodeError traceback."""
    p = tmp_path / "image.png"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"{p} is not a text YAML file .*pass the params file"):
        load_config(p)
    assert main(["run", "--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p} is not a text YAML file") and err.count("\n") == 1, err
    from flows.pipeline import main as flow_main

    assert flow_main(["--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p} is not a text YAML file" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "command",
    [["oodgate", "run"], ["flows.pipeline"], ["flows.monitor"]],
    ids=["oodgate-run", "flows.pipeline", "flows.monitor"],
)
def test_a_set_value_that_is_not_yaml_is_one_line_in_every_entry_point(tmp_path, command):
    """`--set 'seeds=[0,1'`: the program, as a user starts it, says which value in one line, exit 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", *command, "--set", "seeds=[0,1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stderr.startswith("error: --set 'seeds=[0,1': '[0,1' is not a YAML value"), out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------ YAML that expands without bound
def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    """A "billion laughs": each level lists the one before ``width`` times, so the last one stands for
    ``width ** levels`` values in a few hundred bytes."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_milliseconds_in_one_line(tmp_path, capsys):
    """9 levels of 10 aliases, as --set or as the params file, printed nothing and grew to 1 GB in
    24 s before it was killed: any alias is refused where the YAML is read, naming the line."""
    import time

    from oodgate.base.config import load_yaml, parse_overrides

    bomb = _alias_bomb()
    flow = "{" + ", ".join(bomb.splitlines()) + "}"  # the same on one line, as a --set value
    t0 = time.perf_counter()
    with pytest.raises(
        ConfigError,
        match=r"^--set 'seeds=\{a0: &a0 \[\"lol\"\].*\.\.\. \(\d+ characters\)': line 1: a YAML alias "
        r"\(\*a0\) is not allowed: aliases can expand without bound; write the value out "
        r"\(an anchor &name alone is allowed\)$",
    ):
        parse_overrides([f"seeds={flow}"])
    p = tmp_path / "params.yaml"
    p.write_text(bomb)
    message = f"{p}: line 2: a YAML alias (*a0) is not allowed: aliases can expand without bound"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(p)
    assert time.perf_counter() - t0 < 1.0
    # the entry point, which reads the numerics from the same file first: one line, exit 2
    assert main(["run", "--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert main(["run", "--params", str(p), "--set", f"seeds={flow}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set 'seeds={a0: &a0") and err.count("\n") == 1, err
    # an anchor that nothing refers to expands nothing: read as before
    assert load_yaml("seeds: &s [0, 1]\nworkdir: w\n", "params.yaml") == {"seeds": [0, 1], "workdir": "w"}


def test_yaml_nested_deeper_than_python_recurses_is_refused_in_one_line(tmp_path):
    """100,000 nested brackets ended in a RecursionError traceback."""
    from oodgate.base.config import parse_overrides

    with pytest.raises(
        ConfigError, match=r"^--set 'seeds=\[\[\[.*: the YAML is nested too deeply to read .*fewer levels$"
    ):
        parse_overrides(["seeds=" + "[" * 100_000])
    p = tmp_path / "params.yaml"
    p.write_text("seeds: " + "[" * 100_000 + "0" + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: the YAML is nested too deeply"):
        load_config(p)
