"""The benchmark scripts run (their figures are in the README; tests never assert times)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import shell_env, tiny_params

REPO = Path(__file__).resolve().parents[1]


def _process(name: str, *args: str) -> str:
    """The benchmark as `make bench-...` runs it: its own process, from a user's shell (nothing
    pinned), so that it must pin the numerics itself before torch loads and find what it imports."""
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args]
    done = subprocess.run(
        cmd, cwd=REPO, env=shell_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_stability_benchmark_gates_each_seed_set_and_prints_the_table(embedded_root, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    raw = tiny_params(embedded_root, tmp_path / "unused", epochs=1)
    raw["gate"] = {"confidence": 0.95, "samples": 100}
    params.write_text(yaml.safe_dump(raw))
    bench = _script("bench_stability")
    out = _process(
        "bench_stability", "--params", str(params), "--workdir", str(tmp_path / "w"), "--sets", "0,1", "2,3"
    )
    assert "| candidate | seeds 0,1 | seeds 2,3 | agree |" in out
    row = next(line for line in out.splitlines() if line.startswith("| dismax_fpr |"))
    verdicts = [c.strip() for c in row.strip("|").split("|")[1:3]]
    assert set(verdicts) <= {"PROMOTE", "reject"}  # model-level evidence: exit 0, agreeing or not
    seeds_level = tmp_path / "params-seeds.yaml"
    raw["gate"]["evidence"] = "seeds"
    seeds_level.write_text(yaml.safe_dump(raw))
    code = bench.main(
        ["--params", str(seeds_level), "--workdir", str(tmp_path / "w"), "--sets", "0,1", "2,3"]
    )
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| dismax_fpr |"))
    verdicts = [c.strip() for c in row.strip("|").split("|")[1:3]]
    assert code == (0 if len(set(verdicts)) == 1 else 1)  # seed-level: the exit code says whether they agree
    assert "- dismax_fpr, seeds 0,1: " in out and "p=" in out  # the evidence behind each decision
    # each seed set chose its scores and evaluated its models on its own
    assert (
        tmp_path / "w" / "sets" / "2-3" / "evaluate" / "dismax_fpr" / "seed3" / "evaluation.json"
    ).is_file()
    assert (tmp_path / "w" / "sets" / "0-1" / "select" / "dismax_fpr" / "choice.json").is_file()
    assert "| loss | seeds 0,1 | seeds 2,3 |" in out and "(auto: " in out
    assert "The chosen seed was a test-best by accuracy in " in out


def test_gate_power_benchmark_prints_every_effect_size_and_evidence():
    out = _process("bench_gate_power", "--draws", "2", "--samples", "100", "--sizes", "600", "--seeds", "3")
    assert "| effect | test images | models | seeds, 3 | seeds for 80% (predicted) |" in out
    for effect in ("identical", "dismax-like", "fpr95 lower", "worse accuracy"):
        assert f"| {effect} | 600 | " in out
    assert "| 5 | " in out and "promotes any, Holm (the gate)" in out


def test_stability_benchmark_refuses_overlapping_seed_sets(capsys):
    with pytest.raises(SystemExit):
        _script("bench_stability").main(["--sets", "0,1", "1,2"])
    assert "disjoint" in capsys.readouterr().err
