"""What each step depends on (oodgate.running.steps.inputs): exactly its params keys, its code, its upstream.

Every defect pinned here made a result recompute when nothing it reads had changed (at full scale,
GPU-days) or return a result computed from other inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import evaluate_one

from oodgate.base.config import parse_config
from oodgate.running import steps
from oodgate.running.steps import inputs

PACKAGE = Path(inputs.__file__).resolve().parents[2]


def _cfg(repo_params, **sections):
    p = {**repo_params}
    for dotted, value in sections.items():
        *parents, leaf = dotted.split("__")
        node = p
        for part in parents:
            node[part] = dict(node[part])
            node = node[part]
        node[leaf] = value
    return parse_config(p)


def _fps(cfg, loss="dismax_fpr", seed=0, id_digest="i", ood_digest="o"):
    t = inputs.train_fingerprint(cfg, loss, seed, id_digest)
    c = inputs.calibrate_fingerprint(cfg, loss, seed, t)
    others = [
        inputs.calibrate_fingerprint(cfg, loss, s, inputs.train_fingerprint(cfg, loss, s, id_digest))
        for s in cfg.seeds_of(loss)
    ]
    sel = inputs.select_fingerprint(cfg, loss, others, ood_digest)
    return t, c, inputs.evaluate_fingerprint(cfg, loss, seed, c, sel, ood_digest)


def test_training_depends_on_its_keys_and_not_on_scores_calibration_ood_or_the_gate(repo_params):
    cfg = parse_config(repo_params)
    record = inputs.train_inputs(cfg, "dismax_fpr", 0)
    assert set(record) == {
        *("step", "data", "model", "weights", "train", "method", "options", "seed", "numerics", "code")
    }
    assert set(record["data"]) == set(inputs.ID_SECTIONS)  # no OOD sets, sizes or data root
    assert "eval_batch_size" not in record["train"] and record["options"] == {"fpr": True, "alpha": 1.0}
    train, cal, ev = _fps(cfg)

    def fps(**changes):
        return _fps(_cfg(repo_params, **changes))

    # evaluation-only: the OOD score and the evaluation batch size
    t, c, e = fps(
        losses__dismax_fpr={"method": "dismax", "options": {"fpr": True, "alpha": 1.0}, "score": "mds"}
    )
    assert (t, c) == (train, cal) and e != ev
    t, c, e = fps(train__eval_batch_size=256)
    assert t == train and c != cal and e != ev
    # calibration, OOD sets, the gate, the registry: no retraining, and the gate nothing at all upstream
    t, c, e = fps(calibration={"objective": "ece"})
    assert t == train and c != cal
    for change in (
        {"data__ood": ["uniform_noise"]},
        {"data__ood_size": 10},
        {"gate__ece": {"test": "noninferior", "margin": 0.02}},
        {"registry__model_name": "x"},
    ):
        assert fps(**change) == (train, cal, ev), change
    # what training reads
    for change in (
        {"train__epochs": 30},
        {"train__lr": 0.01},
        {"numerics": {"threads": 1}},
        {"numerics": {"mode": "native"}},
        {"model__options": {"width": 8}},
        {"data__split_seed": 1},
    ):
        assert fps(**change)[0] != train, change
    assert _fps(cfg, seed=1)[0] != train and _fps(cfg, id_digest="i2")[0] != train
    assert _fps(cfg, ood_digest="o2")[:2] == (train, cal) and _fps(cfg, ood_digest="o2")[2] != ev
    # score: auto chooses over every seed of the loss: another seed re-evaluates, never retrains
    t, c, e = fps(seeds=[0, 1, 2, 3])
    assert (t, c) == (train, cal) and e != ev
    # a named score keeps each seed's evaluation independent of the other seeds
    named = {"method": "dismax", "options": {"fpr": True, "alpha": 1.0}, "score": "mps"}
    assert fps(losses__dismax_fpr=named)[2] == fps(losses__dismax_fpr=named, seeds=[0, 1, 2, 3])[2]
    # the validation OOD sets are in ood.pt: choosing on others changes its digest, so evaluates again
    assert fps(data__ood_val=["glyphs"])[:2] == (train, cal)


def test_code_versions_ignore_docstrings_and_comments_and_cover_only_the_code_a_step_runs(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text('"""Module doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 1  # comment\n')
    b.write_text('"""Another doc."""\n# a comment\n\n\ndef f(x):\n    return x + 1\n')
    c.write_text("def f(x):\n    return x + 2\n")
    version = inputs._module_version
    assert version(str(a), 0) == version(str(b), 0) != version(str(c), 0)

    train = {p.relative_to(PACKAGE).as_posix() for p in inputs.step_files("train")}
    assert {
        "learning/training/engine.py",
        "learning/classifier.py",
        "running/steps/train_step.py",
        "learning/methods/dismax.py",
        "learning/models/resnet.py",
    } <= train
    for never in (
        "measuring/plots.py",
        "deciding/gate.py",
        "measuring/evaluation.py",
        "measuring/calibration.py",
        "data/ood.py",
        "running/steps/gate_step.py",
    ):
        assert never not in train, never
    assert "measuring/plots.py" in {p.relative_to(PACKAGE).as_posix() for p in inputs.step_files("evaluate")}


# Files a step may execute without being part of its code version: the config (its values are in the
# records), the records themselves (compared, not used), lazy re-exports and paths.
EXEMPT = {
    "base/config.py",
    "running/steps/inputs.py",
    "running/steps/__init__.py",
    "__init__.py",
    "running/layout.py",
}


def _executed(fn) -> set[str]:
    """The oodgate files whose code runs while ``fn()`` runs (imports included)."""
    seen: set[str] = set()
    prefix = str(PACKAGE) + "/"

    def profile(frame, event, arg):
        if event == "call":
            name = frame.f_code.co_filename
            if name.startswith(prefix):
                seen.add(name[len(prefix) :])

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_every_file_a_step_executes_is_in_its_code_version(tiny_config, embedded_root, tmp_path):
    """Traces each step: a file it runs but its code version does not hash would let an edit of that
    file return a stale result."""
    cfg, prep = tiny_config, tmp_path / "prepared"
    ran = {
        "prepare": _executed(lambda: steps.prepare(cfg, prep, embedded_root)),
        "train": _executed(lambda: steps.train(cfg, "dismax_fpr", 0, prep, tmp_path / "t")),
        "calibrate": _executed(
            lambda: steps.calibrate(cfg, "dismax_fpr", 0, tmp_path / "t", prep, tmp_path / "c")
        ),
        "select": _executed(
            lambda: steps.select(cfg, "dismax_fpr", {0: tmp_path / "c"}, prep, tmp_path / "s")
        ),
        "evaluate": _executed(
            lambda: steps.evaluate(cfg, "dismax_fpr", 0, tmp_path / "c", prep, tmp_path / "e", tmp_path / "s")
        ),
    }
    for loss in cfg.loss_ids():  # the gate reads every loss
        if loss != "dismax_fpr":
            steps.train(cfg, loss, 0, prep, tmp_path / f"t-{loss}")
            steps.calibrate(cfg, loss, 0, tmp_path / f"t-{loss}", prep, tmp_path / f"c-{loss}")
            evaluate_one(cfg, loss, 0, tmp_path / f"c-{loss}", prep, tmp_path / f"e-{loss}", plots=False)

    def evaluate_dir(loss, seed):
        return tmp_path / ("e" if loss == "dismax_fpr" else f"e-{loss}")

    def gate():
        found = steps.collect(cfg, evaluate_dir, prep)
        metrics = {k: [e.metrics for e in found if e.loss == k] for k in cfg.loss_ids()}
        samples = {k: [steps.load_samples(evaluate_dir(k, 0))] for k in cfg.loss_ids()}
        steps.gate(cfg, metrics, samples)

    ran["gate"] = _executed(gate)
    for step, files in ran.items():
        declared = {p.relative_to(PACKAGE).as_posix() for p in inputs.step_files(step)}
        assert files, step
        missing = files - declared - EXEMPT
        assert not missing, f"{step} runs {sorted(missing)} but STEP_CODE[{step!r}] does not hash them"


def test_a_stale_upstream_result_is_refused_naming_what_changed(embedded_root, prepared_dir, tmp_path):
    """The issue's case: train with epochs=1, then calibrate under epochs=3 and lr=0.01 without
    training again; likewise an evaluation made with another score is not gated."""
    from conftest import tiny_params

    def cfg(**train):
        return parse_config(tiny_params(embedded_root, tmp_path / "w", **train))

    steps.train(cfg(epochs=1), "softmax", 0, prepared_dir, tmp_path / "t")
    with pytest.raises(steps.StaleResultError, match=r"train\.epochs: 1 -> 3; train\.lr: 0\.05 -> 0\.01"):
        steps.calibrate(cfg(epochs=3, lr=0.01), "softmax", 0, tmp_path / "t", prepared_dir, tmp_path / "c")
    c = steps.calibrate(cfg(epochs=1), "softmax", 0, tmp_path / "t", prepared_dir, tmp_path / "c")
    again = steps.calibrate(cfg(epochs=1), "softmax", 0, tmp_path / "t", prepared_dir, tmp_path / "c")
    assert again == c.__class__(**{**c.__dict__, "seconds": 0.0})  # reused from its record
    evaluate_one(cfg(epochs=1), "softmax", 0, tmp_path / "c", prepared_dir, tmp_path / "e", plots=False)
    energy = parse_config(
        {
            **tiny_params(embedded_root, tmp_path / "w", epochs=1),
            "losses": {"softmax": {"method": "softmax", "score": "energy"}},
        }
    )
    with pytest.raises(steps.StaleResultError, match=r"score: auto -> energy"):
        steps.collect(energy, lambda loss, seed: tmp_path / "e", prepared_dir)
    e = evaluate_one(energy, "softmax", 0, tmp_path / "c", prepared_dir, tmp_path / "e", plots=False)
    assert e.score == "energy" and steps.collect(energy, lambda loss, seed: tmp_path / "e", prepared_dir)


def test_inputs_stage_writes_one_record_per_step_loss_and_seed(tiny_config, tmp_path):
    cfg = parse_config({**tiny_config.model_dump(mode="json"), "seeds": [0, 1]})
    written = inputs.write_inputs(cfg, tmp_path / "inputs")
    names = {p.relative_to(tmp_path / "inputs").as_posix() for p in written}
    assert names == {"prepare.json", "gate.json"} | {f"select/{k}.json" for k in cfg.loss_ids()} | {
        f"{s}/{k}/seed{seed}.json"
        for s in ("train", "calibrate", "evaluate")
        for k in cfg.loss_ids()
        for seed in (0, 1)
    }
    assert steps.read_json(tmp_path / "inputs/train/softmax/seed1.json") == inputs.train_inputs(
        cfg, "softmax", 1
    )
