"""Project-wide constants: where the checkout is, and what turns telemetry off. Imports nothing of
the project: every layer may use it (a leaf at the bottom of the dependency graph)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (the package is installed editable)

# Nothing phones home: set by every entry point (the Makefile exports the same).
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
}

# The temporary Prefect server of a run without PREFECT_API_URL creates its database on the first
# start; on 2 busy cores that took over Prefect's default 20 s, and the run failed before its first task.
RUNTIME_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def telemetry_off() -> None:
    """Set :data:`TELEMETRY_OFF` and :data:`RUNTIME_DEFAULTS` where the environment does not already
    say otherwise."""
    for key, value in {**TELEMETRY_OFF, **RUNTIME_DEFAULTS}.items():
        os.environ.setdefault(key, value)
