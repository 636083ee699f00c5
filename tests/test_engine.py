"""The training engine: determinism, resume, NaN handling, weight decay, augmentation, all methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import interrupted_after

from oodgate.base.config import TrainConfig
from oodgate.data.bundle import ImageSet
from oodgate.learning import methods
from oodgate.learning.classifier import build_classifier, load_classifier, read_checkpoint
from oodgate.learning.training import engine
from oodgate.running import steps


def _subset(s: ImageSet, n: int) -> ImageSet:
    return ImageSet(x=s.x[:n], y=s.y[:n])


@pytest.fixture(scope="module")
def small(prepared_dir):
    bundle = steps.load_prepared(prepared_dir, with_ood=False)
    return bundle, _subset(bundle.train, 256), _subset(bundle.val, 64)


def _spec(bundle, method="dismax", **options):
    from oodgate.learning.classifier import ModelSpec

    return ModelSpec(
        backbone="small_cnn",
        method=method,
        num_classes=bundle.num_classes,
        in_channels=1,
        image_size=28,
        mean=bundle.mean,
        std=bundle.std,
        score="mmles" if method == "dismax" else "mps",
        backbone_options={"width": 8},
        method_options=options,
    )


CFG = TrainConfig(epochs=3, batch_size=32, lr=0.05, milestones=[2], augment="crop_flip")


def _weights(path):
    return read_checkpoint(path)["model"]


def _train(factory, train, val, cfg, seed, out, hooks=()):
    """engine.train writing its checkpoints to ``out`` (best.pt, last.pt)."""
    return engine.train(factory, train, val, cfg, seed, hooks=(engine.Checkpointer(out), *hooks))


def test_same_inputs_give_identical_weights_and_history(small, tmp_path):
    bundle, train, val = small
    spec = _spec(bundle, fpr=True)
    a = _train(lambda: build_classifier(spec, 7), train, val, CFG, 7, tmp_path / "a")
    b = _train(lambda: build_classifier(spec, 7), train, val, CFG, 7, tmp_path / "b")
    wa, wb = _weights(tmp_path / "a" / engine.BEST), _weights(tmp_path / "b" / engine.BEST)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    _train(lambda: build_classifier(spec, 8), train, val, CFG, 8, tmp_path / "c")
    assert not torch.equal(_weights(tmp_path / "c" / engine.LAST)["head.prototypes"], wa["head.prototypes"])


def test_resumed_run_equals_uninterrupted_run(small, tmp_path):
    bundle, train, val = small
    spec = _spec(bundle, fpr=True)
    full = _train(lambda: build_classifier(spec, 1), train, val, CFG, 1, tmp_path / "full")
    interrupted_after(
        1,
        lambda hooks: _train(lambda: build_classifier(spec, 1), train, val, CFG, 1, tmp_path / "cut", hooks),
    )
    assert len(read_checkpoint(tmp_path / "cut" / engine.LAST)["history"]) == 1
    resumed = _train(lambda: build_classifier(spec, 1), train, val, CFG, 1, tmp_path / "cut")
    assert resumed.resumed_from_epoch == 1
    wf, wr = _weights(tmp_path / "full" / engine.LAST), _weights(tmp_path / "cut" / engine.LAST)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert [h["val_accuracy"] for h in full.history] == [h["val_accuracy"] for h in resumed.history]


def test_nan_loss_stops_training_with_a_clear_error(small, tmp_path):
    bundle, train, val = small
    spec = _spec(bundle, method="softmax")

    def poisoned():
        model = build_classifier(spec, 0)
        with torch.no_grad():
            model.head.linear.bias.fill_(float("nan"))
        return model

    with pytest.raises(engine.NonFiniteLossError, match=r"non-finite training loss nan at epoch 1, batch 1"):
        _train(poisoned, train, val, CFG, 0, tmp_path / "nan")
    assert not (tmp_path / "nan" / engine.BEST).exists()


def test_weight_decay_applies_to_prototypes_and_distance_scale(small):
    bundle, *_ = small
    model = build_classifier(_spec(bundle), 0)
    opt, _ = engine._make_optimizer(model, CFG, steps_per_epoch=10)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.head.prototypes) in decayed and id(model.head.distance_scale) in decayed
    assert opt.param_groups[0]["nesterov"] is True


def test_augment_is_seeded_and_keeps_shape():
    x = torch.rand(5, 1, 8, 8)
    a = engine.augment(x, "crop_flip", torch.Generator().manual_seed(0))
    b = engine.augment(x, "crop_flip", torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert engine.augment(x, "none", torch.Generator()) is x
    # a crop is a translation of the zero-padded image: every output pixel is an input pixel or 0
    c = engine.augment(x, "crop", torch.Generator().manual_seed(1))
    assert set(c.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_checkpoint_rebuilds_the_model_and_loads_safely(small, tmp_path):
    bundle, train, val = small
    spec = _spec(bundle, fpr=True)
    _train(
        lambda: build_classifier(spec, 0),
        train,
        val,
        CFG.model_copy(update={"epochs": 1, "milestones": []}),
        0,
        tmp_path,
    )
    model = load_classifier(tmp_path / engine.BEST)  # weights_only=True inside
    assert model.spec == spec
    x = train.x[:4].float() / 255
    assert model(x).shape == (4, bundle.num_classes)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        engine.resolve_device("cuda")


@pytest.mark.parametrize("name", methods.names())
def test_every_method_trains_one_epoch_on_the_embedded_data(prepared_dir, name, tmp_path):
    bundle = steps.load_prepared(prepared_dir, with_ood=False)
    spec = _spec(bundle, method=name).__class__(**{**_spec(bundle, method=name).__dict__, "score": "mps"})
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    init = build_classifier(spec, 0).state_dict()
    r = _train(lambda: build_classifier(spec, 0), bundle.train, bundle.val, cfg, 0, tmp_path)
    assert len(r.history) == 1 and np.isfinite(r.history[0]["train_loss"]) and r.history[0]["train_loss"] > 0
    trained = load_classifier(tmp_path / engine.BEST).state_dict()
    assert not torch.equal(trained[_first_weight(trained)], init[_first_weight(init)])  # it learned something
    assert 0.0 <= r.best_val_accuracy <= 1.0


def _first_weight(state: dict) -> str:
    return next(k for k in state if k.endswith("weight"))


def test_loading_a_checkpoint_concurrently_never_shifts_a_seeded_initialisation(small, tmp_path):
    """The flow's thread pool calibrates one loss (loading a checkpoint) while it initialises another."""
    import threading

    bundle, *_ = small
    spec = _spec(bundle, fpr=True)
    reference = build_classifier(spec, 3).state_dict()
    from oodgate.learning.classifier import save_classifier

    ckpt = save_classifier(build_classifier(spec, 9), tmp_path / "other.pt")
    stop = threading.Event()

    def keep_loading():
        while not stop.is_set():
            load_classifier(ckpt)

    loader = threading.Thread(target=keep_loading)
    loader.start()
    try:
        for _ in range(30):
            state = build_classifier(spec, 3).state_dict()
            assert all(torch.equal(state[k], reference[k]) for k in reference)
    finally:
        stop.set()
        loader.join()


def test_progress_bar_shows_loss_and_accuracy(small, tmp_path, capsys):
    bundle, train, val = small
    spec = _spec(bundle, method="softmax")
    cfg = CFG.model_copy(update={"epochs": 1, "milestones": []})
    _train(lambda: build_classifier(spec, 0), train, val, cfg, 0, tmp_path, (engine.ProgressBar(),))
    err = capsys.readouterr().err
    assert "epoch" in err and "loss=" in err and "acc=" in err and "val_acc=" in err


def test_lr_schedule_warms_up_per_step_then_decays_at_milestones():
    cfg = TrainConfig(epochs=5, lr=0.1, milestones=[3], gamma=0.1, warmup_epochs=2)
    factors = [engine.lr_factor(step, 2, cfg) for step in range(10)]  # 2 steps per epoch
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    # without warm-up: MultiStepLR's epochs (milestone 3: epochs 1-3 at lr, 4-5 at lr * gamma)
    plain = TrainConfig(epochs=5, lr=0.1, milestones=[3], gamma=0.1)
    assert [engine.lr_factor(s, 2, plain) for s in range(10)] == pytest.approx([1] * 6 + [0.1] * 4)


def test_warm_up_keeps_logitnorm_logits_from_blowing_up(small):
    """LogitNorm's loss ignores ||z||, so its gradient scales with 1 / ||z||: from the small logits of
    initialisation, one full-size SGD step throws ||z|| up by orders of magnitude (every later step is
    then far too small); the first step of a warm-up does not."""
    bundle, train, _ = small
    x = engine.to_float(train.x[:32], torch.device("cpu"))

    def norm_after_one_step(lr_factor):
        model = build_classifier(_spec(bundle, method="logitnorm", tau=0.04), 0)
        before = model(x).norm(dim=1).mean().item()
        opt = torch.optim.SGD(model.parameters(), lr=0.05 * lr_factor, momentum=0.9, nesterov=True)
        model.head.loss(model(x), train.y[:32]).backward()
        opt.step()
        return before, model(x).norm(dim=1).mean().item()

    before, full = norm_after_one_step(1.0)
    _, warm = norm_after_one_step(engine.lr_factor(0, 34, TrainConfig(epochs=15, warmup_epochs=3)))
    assert full > 20 * before  # the blow-up
    assert warm < 3 * before
