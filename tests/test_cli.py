"""The core CLI's selections: ``python -m oodgate run --loss/--seed`` gates what it has, or says
why it cannot, and never fails for it."""

from __future__ import annotations

import argparse

import pytest

from oodgate.cli import _selection
from oodgate.config import parse_config
from tests.conftest import tiny_params


def _config(tmp_path, **gate):
    params = tiny_params(tmp_path / "data", tmp_path / "w")
    params["seeds"] = [0, 1, 2]
    params["gate"] = {"confidence": 0.95, "evidence": "seeds", **gate}
    return parse_config(params)


@pytest.mark.parametrize(
    ("loss", "seed", "why"),
    [
        ("softmax", None, "only the baseline 'softmax' was run: there is no candidate to compare"),
        ("dismax_fpr", None, "the baseline 'softmax' is not among --loss dismax_fpr"),
        (None, 0, "needs at least 2 seeds, --seed 0 gives 1 (--set gate.evidence=models compares"),
    ],
)
def test_a_selection_that_cannot_be_gated_says_why(tmp_path, loss, seed, why):
    cfg = _config(tmp_path)
    sub, reason = _selection(cfg, argparse.Namespace(loss=loss, seed=seed))
    assert reason is not None and why in reason
    assert sub.loss_ids() == ([loss] if loss else cfg.loss_ids())
    assert list(sub.seeds) == ([seed] if seed is not None else [0, 1, 2])


def test_one_seed_of_every_loss_is_gated_on_the_means(tmp_path):
    cfg = _config(tmp_path, confidence=None)
    sub, reason = _selection(cfg, argparse.Namespace(loss=None, seed=1))
    assert reason is None and list(sub.seeds) == [1] and sub.loss_ids() == cfg.loss_ids()
