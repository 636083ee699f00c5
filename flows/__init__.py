"""Prefect flows: compose the tasks in ``tasks/``; no ML logic here.

The constants every entry point needs live here, so that ``flows.deploy`` and ``flows.trigger``
start without importing the pipeline (Prefect, torch) until they need it.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Nothing phones home: set by every entry point (the Makefile exports the same).
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
}


def telemetry_off() -> None:
    """Set :data:`TELEMETRY_OFF` where the environment does not already say otherwise."""
    import os

    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
