"""What every flow program shares (flows/entry.py): the params parsed once per process, the preflight
its entry point ran taken as done by the flow it calls, once; a flow module run as a program is
recognised before its imports load torch (flows/__init__.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import yaml
from conftest import REPO, shell_env, tiny_params

from flows import entry
from oodgate.base import config as config_module
from oodgate.base.config import load_config


def test_the_params_are_parsed_once_per_process_and_again_when_the_file_changes(tmp_path, monkeypatch):
    parsed = []
    real = config_module.parse_config
    monkeypatch.setattr(
        config_module, "parse_config", lambda raw, source: parsed.append(source) or real(raw, source)
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(tmp_path / "data", tmp_path / "w")))
    first = load_config(path, {"train.epochs": 1})
    assert load_config(path, {"train.epochs": 1}) is first and len(parsed) == 1
    assert load_config(path, {"train.epochs": 2}).train.epochs == 2 and len(parsed) == 2  # other overrides
    raw = yaml.safe_load(path.read_text())
    raw["train"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path, {"train.epochs": 1}).train.lr == 0.5 and len(parsed) == 3  # the file changed


def test_the_entry_points_preflight_counts_once_for_the_flow_it_calls(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(entry, "preflight", lambda cfg, training, project: calls.append(project))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(tmp_path / "data", tmp_path / "w")))
    p = entry.load(argparse.Namespace(params="params.yaml", root=str(tmp_path), set=[]))
    entry.vouch(p.cfg, p.project)  # the program checks before any server starts
    entry.preflight_once(p.cfg, p.project)  # the flow it calls: taken as done
    assert len(calls) == 1
    entry.preflight_once(p.cfg, p.project)  # a later flow run in this process checks the disk again
    assert len(calls) == 2
    other = load_config(path, {"train.lr": 0.123}).in_project(p.project)
    entry.vouch(p.cfg, p.project)
    entry.preflight_once(other, p.project)  # another config is never taken as checked
    assert len(calls) == 4


def test_a_flow_program_pins_the_numerics_before_its_imports_load_torch(tmp_path):
    """`python -m flows.pipeline --help` in a shell without the pins: by the time the flow module's
    imports have loaded torch, the numerics of params.yaml are in force."""
    code = (
        "import runpy, sys; sys.argv = ['-m', '--help']; sys.orig_argv = [sys.executable, '-m', 'flows.pipeline', '--help']\n"
        "import flows, os, torch\n"
        "print(flows.program(), os.environ.get('OODGATE_NUMERICS'), 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=shell_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pipeline", "portable/2", "True"], out.stdout


def test_sigterm_wrapped_by_pydantic_while_a_dask_task_is_submitted_is_still_an_interrupt(
    tmp_path, monkeypatch, capsys
):
    """Prefect raises TerminationSignal wherever the main thread is when SIGTERM lands; submitting a
    task to Dask serialises the flow's context with Pydantic, which re-raises it as a
    PydanticSerializationError. That is still the signal: exit 130, runs KILLED, workers stopped."""
    import signal

    import pydantic
    from prefect.exceptions import TerminationSignal

    from oodgate.learning.training.engine import Stop

    class Context(pydantic.BaseModel):
        value: int = 0

        @pydantic.field_serializer("value")
        def _ser(self, v: int) -> int:
            raise TerminationSignal(signal.SIGTERM)

    try:
        Context().model_dump()
    except Exception as e:  # what the flow's body caught
        wrapped = e
    assert type(wrapped).__name__ == "PydanticSerializationError"
    monkeypatch.setattr(entry, "STOP", Stop())
    assert entry.interrupted(wrapped) == "SIGTERM"
    assert entry.exit_status(wrapped, tmp_path) == 130
    assert "error: SIGTERM: stopped" in capsys.readouterr().err
    monkeypatch.setattr(entry, "STOP", Stop())
    assert entry.interrupted(RuntimeError("a failure")) is None
