"""Seeds: metrics aggregated as mean ± sample std, the means-only gate compares them, the table shows both."""

from __future__ import annotations

import math

import pytest
from conftest import evaluate_one

from oodgate.base.config import parse_config
from oodgate.measuring.metrics import aggregate
from oodgate.running import steps


def _m(acc, ece, fpr):
    return {"test/accuracy": acc, "test/ece": ece, "ood/mean/fpr95": fpr}


def test_aggregate_is_mean_and_sample_std():
    mean, std = aggregate([_m(0.90, 0.02, 0.5), _m(0.94, 0.04, 0.3)])
    assert mean == pytest.approx({"test/accuracy": 0.92, "test/ece": 0.03, "ood/mean/fpr95": 0.4})
    assert std["test/accuracy"] == pytest.approx(math.sqrt(2 * 0.02**2))  # ddof=1
    assert aggregate([_m(0.9, 0.02, 0.5)])[1]["test/accuracy"] == 0.0
    with pytest.raises(ValueError, match="at least one report"):
        aggregate([])


def test_means_only_gate_compares_means_over_seeds(repo_params):
    cfg = parse_config({**repo_params, "seeds": [0, 1], "gate": {"confidence": None, "evidence": "seeds"}})
    # seed 1 of the candidate is worse than the baseline's, but the means are better
    report = steps.gate(
        cfg,
        {
            "softmax": [_m(0.90, 0.03, 0.6), _m(0.90, 0.03, 0.6)],
            "dismax": [_m(0.95, 0.01, 0.2), _m(0.89, 0.04, 0.7)],
        },
    )
    assert report.decisions["dismax"].promote is True
    assert report.means["dismax"]["test/accuracy"] == pytest.approx(0.92)
    assert report.promoted == ("dismax",) and report.best == "dismax"
    table = steps.comparison_table(report.means, report.stds, {"softmax": "mps", "dismax": "mmles"})
    assert "| dismax | mmles | 0.9200 ± 0.0424 |" in table


def test_means_only_model_level_gate_compares_the_deployable_models(repo_params):
    """gate.evidence: models with gate.confidence: null compares the models chosen on validation
    data (the lowest validation NLL), not the means."""
    cfg = parse_config({**repo_params, "seeds": [0, 1], "gate": {"confidence": None}})
    report = steps.gate(
        cfg,
        {
            "softmax": [{**_m(0.90, 0.03, 0.6), "val/nll": 0.2}, {**_m(0.95, 0.01, 0.1), "val/nll": 0.1}],
            "dismax": [{**_m(0.95, 0.01, 0.2), "val/nll": 0.3}, {**_m(0.92, 0.02, 0.3), "val/nll": 0.1}],
        },
    )
    assert report.models["softmax"].seed == 1 and report.models["dismax"].seed == 1
    assert report.points["dismax"]["test/accuracy"] == 0.92
    assert report.decisions["dismax"].promote is False  # 0.92 against the baseline model's 0.95
    assert report.record()["models"]["dismax"]["seed"] == 1


def test_gate_needs_the_baseline(repo_params):
    cfg = parse_config(repo_params)
    with pytest.raises(ValueError, match="no metrics for the baseline 'softmax'"):
        steps.gate(cfg, {"dismax": [_m(0.9, 0.01, 0.2)]})


def test_calibration_and_evaluation_run_on_the_device_training_resolved(
    tiny_config, prepared_dir, tmp_path, monkeypatch
):
    """Every inference call of calibrate and evaluate receives the resolved device and AMP flag
    (at full scale, ResNet-34 inference over every split on the CPU would cost hours)."""
    import torch

    from oodgate.learning.training import engine
    from oodgate.measuring import evaluation

    steps.train(tiny_config, "softmax", 0, prepared_dir, tmp_path / "t")
    resolved = torch.device("cuda", 0)  # what `auto` resolves to on a GPU machine (no GPU is used here)
    monkeypatch.setattr(engine, "resolve_device", lambda requested="auto": resolved)
    seen = []
    real = evaluation.predict_logits

    def recording(model, x, batch_size=1024, device="cpu", amp=False):
        seen.append((str(device), amp))
        return real(model, x, batch_size, "cpu", amp)

    monkeypatch.setattr(evaluation, "predict_logits", recording)
    steps.calibrate(tiny_config, "softmax", 0, tmp_path / "t", prepared_dir, tmp_path / "c")
    evaluate_one(tiny_config, "softmax", 0, tmp_path / "c", prepared_dir, tmp_path / "e", plots=False)
    assert len(seen) >= 4  # validation, test, the validation scores and every OOD set
    assert set(seen) == {("cuda:0", True)}  # the device and bf16 autocast that training used


def test_a_result_trained_under_other_params_is_never_returned(embedded_root, prepared_dir, tmp_path):
    """`python -m oodgate train` twice into the same directory with other params: the second call
    trains again (it used to return the first result), and never resumes the other run's last.pt."""
    from conftest import interrupted_after, tiny_params

    def cfg(**train):
        return parse_config(tiny_params(embedded_root, tmp_path / "w", **train))

    out = tmp_path / "train"
    one = steps.train(cfg(epochs=1), "softmax", 0, prepared_dir, out)
    assert one.epochs == 1 and one.fingerprint
    again = steps.train(cfg(epochs=1), "softmax", 0, prepared_dir, out)
    assert again.fingerprint == one.fingerprint and again.train_seconds == 0.0  # reused
    three = steps.train(cfg(epochs=3, lr=0.01), "softmax", 0, prepared_dir, out)
    assert three.epochs == 3 and three.resumed_from_epoch == 0
    assert three.fingerprint != one.fingerprint
    assert steps.read_json(out / "train.json")["epochs"] == 3

    # an interrupted run under params A leaves last.pt; a run under params B starts from scratch
    partial = tmp_path / "partial"
    interrupted_after(1, lambda hooks: steps.train(cfg(epochs=2), "softmax", 0, prepared_dir, partial, hooks))
    other = steps.train(cfg(epochs=2, lr=0.02), "softmax", 0, prepared_dir, partial)
    assert other.resumed_from_epoch == 0 and other.epochs == 2
    fresh = steps.train(cfg(epochs=2, lr=0.02), "softmax", 0, prepared_dir, tmp_path / "fresh")
    assert fresh.best_val_accuracy == other.best_val_accuracy
    same = tmp_path / "same"
    interrupted_after(1, lambda hooks: steps.train(cfg(epochs=2), "softmax", 0, prepared_dir, same, hooks))
    assert steps.train(cfg(epochs=2), "softmax", 0, prepared_dir, same).resumed_from_epoch == 1


def test_two_runs_training_the_same_model_at_once_train_it_once(tiny_config, prepared_dir, tmp_path):
    """Two pipeline runs of one project reach the same (loss, seed) at once: the train step's lock
    lets one train while the other waits, then reuses the finished result (it trains nothing)."""
    import threading

    results, barrier = [], threading.Barrier(2)

    def one() -> None:
        barrier.wait()
        results.append(steps.train(tiny_config, "softmax", 0, prepared_dir, tmp_path / "t"))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.train_seconds > 0 for r in results) == [False, True]  # one trained, one reused
    assert results[0].record() == results[1].record()


def test_two_runs_reaching_every_later_step_at_once_compute_each_once(
    tiny_config, prepared_dir, tmp_path, monkeypatch
):
    """Calibrate, select and evaluate take the same lock as training: two runs of one project that
    reach them at once compute each once, and the second reuses the first's result (before, both
    computed, and one's evaluation failed moving the other's temporary file)."""
    import threading

    from oodgate.measuring import evaluation

    one = tiny_config.model_copy(update={"seeds": [0]})
    steps.train(one, "softmax", 0, prepared_dir, tmp_path / "t")
    calls = {"calibrate": 0, "evaluate": 0, "choose_score": 0}
    for name in calls:  # the real functions, counted
        real = getattr(evaluation, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(evaluation, name, counted)
    results, errors, barrier = [], [], threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            c = steps.calibrate(one, "softmax", 0, tmp_path / "t", prepared_dir, tmp_path / "c")
            s = steps.select(one, "softmax", {0: c.dir}, prepared_dir, tmp_path / "s")
            e = steps.evaluate(one, "softmax", 0, c.dir, prepared_dir, tmp_path / "e", s.dir)
            results.append((c.record(), s.record(), e.metrics))
        except BaseException as exc:  # reported below, with the other thread's result
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls == {"calibrate": 1, "evaluate": 1, "choose_score": 1}
    assert results[0] == results[1]


def test_two_writers_of_one_file_never_move_each_other_s_temporary_file(tmp_path):
    """Each writer has its own temporary name: both finish, and the file is one writer's whole."""
    import threading

    from oodgate.base.files import atomic

    target, barrier, errors = tmp_path / "samples.pt", threading.Barrier(2), []

    def write(byte: bytes) -> None:
        try:
            with atomic(target) as f:
                f.write(byte * 1000)
                barrier.wait()  # both temporary files open before either is moved
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert target.read_bytes() in (b"a" * 1000, b"b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.pt"]  # no temporary file left


def test_two_runs_packaging_the_same_model_at_once_export_it_once(
    tiny_config, prepared_dir, tmp_path, monkeypatch
):
    """The package task writes the loss's serving model into a directory named by the loss's
    fingerprint: two runs of one project wrote it at once, one failed (the directory removed or
    half-written under it) and went on to register another loss. It holds the steps' lock: the
    second run waits, then reuses the export."""
    import threading

    from conftest import evaluate_one

    from oodgate_mlflow import tracking
    from tasks.track import package_model

    one = tiny_config.model_copy(update={"seeds": [0]})
    t = steps.train(one, "softmax", 0, prepared_dir, tmp_path / "t")
    c = steps.calibrate(one, "softmax", 0, tmp_path / "t", prepared_dir, tmp_path / "c")
    e = evaluate_one(one, "softmax", 0, tmp_path / "c", prepared_dir, tmp_path / "e")
    calls, real = [], tracking.export_model

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, "export_model", counted)
    results, errors, barrier = [], [], threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            results.append(package_model.fn("softmax", [t], [c], [e], str(tmp_path / "package-x")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(calls) == 1 and results[0] == results[1]
    assert (tmp_path / "package-x" / "torch_model" / "MLmodel").is_file()
