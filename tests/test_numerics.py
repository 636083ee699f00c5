"""Numerics: the pins of portable mode reach every computing process before torch loads, are checked
where results are computed, and go into the fingerprints and the provenance of every result.

Each case that depends on what was in force when torch loaded runs in a fresh interpreter started
from a user's shell environment (``shell_env``: no pins), as the product's entry points are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, shell_env, tiny_params

from oodgate.base import numerics
from oodgate.base.config import ConfigError, parse_config
from oodgate.running.steps import inputs

X86_AVX2 = numerics.is_x86() and numerics.has_avx2()


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=shell_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


PROVENANCE = (
    "import json; from oodgate.base import numerics; print(json.dumps(numerics.provenance({mode!r}, {t})))"
)


def test_portable_environment_pins_every_dispatcher_and_the_threads():
    env = numerics.environment("portable", 3)
    assert env[numerics.MARKER] == "portable/3"
    assert {env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")} == {"3"}
    if X86_AVX2:
        assert env["MKL_CBWR"] == "COMPATIBLE,STRICT"
        assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        assert env["ATEN_CPU_CAPABILITY"] == "avx2"
        assert env["NPY_ENABLE_CPU_FEATURES"] == "X86_V3"
        assert "OPENBLAS_CORETYPE" not in env  # no result goes through OpenBLAS; the machine's choice stays
    native = numerics.environment("native", None)
    assert native == {numerics.MARKER: "native/auto"}
    with pytest.raises(numerics.NumericsError, match="portable, native"):
        numerics.environment("fast", 2)


@pytest.mark.skipif(not X86_AVX2, reason="portable pins are for x86-64 CPUs with AVX2")
def test_apply_before_torch_loads_puts_the_kernels_in_force():
    code = "from oodgate.base import numerics; numerics.apply('portable', 3); import torch, numpy; "
    code += "numerics.activate('portable', 3); " + PROVENANCE.format(mode="portable", t=3)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["threads"] == 3
    assert found["in_force"] == {
        "aten": "AVX2",
        "mkl": "COMPATIBLE",
        "onednn_max_isa": "AVX2",
        "numpy": ["X86_V3"],
    }
    assert {"torch", "mkl", "onednn", "numpy"} <= set(found["software"])
    assert found["cpu"]["architecture"] and found["cpu"]["model"]


@pytest.mark.skipif(not X86_AVX2, reason="portable pins are for x86-64 CPUs with AVX2")
def test_native_undoes_a_parents_pins():
    env = {k: v for k, v in numerics.environment("portable", 2).items()}
    code = "from oodgate.base import numerics; numerics.apply('native', None); import torch, numpy; "
    code += PROVENANCE.format(mode="native", t=None)
    proc = _python(code, **env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["in_force"]
    assert found["mkl"] != "COMPATIBLE" and found["onednn_max_isa"] == "native"


@pytest.mark.skipif(not X86_AVX2, reason="portable pins are for x86-64 CPUs with AVX2")
def test_computing_under_portable_numerics_without_the_pins_is_refused():
    """torch loaded first (a notebook, a worker started by hand): the step refuses to compute rather
    than give results that only this CPU reproduces."""
    proc = _python("import torch; from oodgate.base import numerics; numerics.activate('portable', 2)")
    assert proc.returncode != 0
    assert "numerics.mode 'portable' is not in force in this process" in proc.stderr
    assert "MKL_CBWR" in proc.stderr and "python -m oodgate numerics" in proc.stderr


def test_asking_for_other_numerics_after_torch_loaded_is_refused():
    proc = _python(
        "from oodgate.base import numerics; numerics.apply('portable', 2); import torch; numerics.apply('native', 2)"
    )
    assert proc.returncode != 0
    assert "numerics.mode 'native' was asked for after torch" in proc.stderr
    assert "numerics.mode 'portable' with 2 threads" in proc.stderr
    # only the thread count differs: torch can change it at any time
    ok = _python(
        "from oodgate.base import numerics; numerics.apply('portable', 2); import torch; "
        "numerics.apply('portable', 1); numerics.activate('portable', 1); print(torch.get_num_threads())"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "1"


def test_the_cli_prints_the_variables_to_start_a_worker_by_hand(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oodgate", "numerics", "--set", "numerics.threads=4"],
        cwd=REPO,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in proc.stdout.splitlines()
        if line.startswith("export")
    )
    assert exports == {k: v for k, v in numerics.environment("portable", 4).items()}
    assert "# numerics: portable (4 threads" in proc.stdout


def test_portable_mode_needs_a_fixed_thread_count(embedded_root, tmp_path):
    raw = tiny_params(embedded_root, tmp_path)
    raw["numerics"] = {"mode": "portable", "threads": None}
    with pytest.raises(ConfigError, match=r"numerics.threads: null .* portable numerics need a fixed count"):
        parse_config(raw)
    raw["numerics"] = {"mode": "native", "threads": None}
    assert parse_config(raw).numerics.threads is None
    raw["numerics"] = {"mode": "fast"}
    with pytest.raises(ConfigError, match=r"numerics\.mode"):
        parse_config(raw)


def test_fingerprints_hold_the_numerics_and_native_ones_the_cpu(embedded_root, tmp_path):
    raw = tiny_params(embedded_root, tmp_path)
    portable = inputs.train_inputs(parse_config(raw), "softmax", 0)["numerics"]
    assert portable["mode"] == "portable" and portable["threads"] == 2
    assert set(portable["software"]) == {"torch", "mkl", "onednn", "numpy"}
    assert "cpu" not in portable  # the same result on every machine: the machine is not an input
    raw["numerics"] = {"mode": "native", "threads": None}
    native = inputs.train_inputs(parse_config(raw), "softmax", 0)["numerics"]
    assert native["cpu"]["model"] == numerics.cpu_model() and isinstance(native["threads"], int)


@pytest.mark.slow
def test_each_result_records_the_numerics_it_was_computed_under(embedded_root, tmp_path):
    """``python -m oodgate run`` from a user's shell: the CLI pins the numerics before torch loads;
    every step's directory gets its provenance, outside what DVC hashes."""
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(tiny_params(embedded_root, tmp_path / "w", epochs=1)))
    proc = subprocess.run(
        [sys.executable, "-m", "oodgate", "run", "--params", str(params), "--loss", "softmax", "--quiet"],
        cwd=tmp_path,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # one loss: nothing to gate, said, not failed
    assert "gate: not run: only the baseline 'softmax' was run" in proc.stdout
    for step in ("train", "calibrate", "evaluate"):
        found = json.loads((tmp_path / "w" / step / "softmax" / "seed0" / "provenance.json").read_text())
        assert found["mode"] == "portable" and found["threads"] == 2
        if X86_AVX2:
            assert found["in_force"]["aten"] == "AVX2" and found["in_force"]["mkl"] == "COMPATIBLE"
    assert "provenance.json" in (REPO / ".dvcignore").read_text().split()
    record = json.loads((tmp_path / "w" / "train" / "softmax" / "seed0" / "train.json").read_text())
    assert record["inputs"]["numerics"]["mode"] == "portable"
    assert Path(tmp_path / "w" / "metrics" / "softmax" / "seed0.json").is_file()
