"""Prefect cache policies that never return a result whose files are gone.

A persisted task result is only a record (paths, metrics) in Prefect's result storage; the files it
names live in the work directory. ``INPUTS + TASK_SOURCE`` alone would return the record after
``make clean`` or a deleted ``artifacts/``, and the next step would fail on a missing file. Adding
:func:`outputs` to a task's policy puts the digests of its output files into the cache key: a
missing file is a cache miss (the step then recomputes, or reuses what its own fingerprint allows),
a changed file is another key.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy

from oodgate import steps


def outputs(*names: str, directory_parameter: str = "out_dir") -> CachePolicy:
    """A policy keyed on the files ``names`` in the task's ``out_dir`` parameter."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        out = Path(parameters[directory_parameter])
        digests = []
        for name in names:
            path = out / name
            if not path.is_file():
                return uuid.uuid4().hex  # never matches a stored record: the task runs
            digests.append(steps.file_digest(path))
        return steps.digest(digests)

    return CacheKeyFnPolicy(cache_key_fn=key)


def by_inputs(*names: str, exclude: tuple[str, ...] = ("cfg",)) -> CachePolicy:
    """``INPUTS`` (less ``exclude``) + ``TASK_SOURCE`` + the digests of the output files ``names``."""
    inputs = INPUTS
    for name in exclude:
        inputs = inputs - name
    return inputs + TASK_SOURCE + outputs(*names)
