"""Jobs and the Prefect cache policy keyed on their fingerprints.

Every task of the flow takes a :class:`Job`: where it writes and the fingerprint of everything its
result depends on (``oodgate.running.steps.inputs``). The cache key is that fingerprint, the task's source
(``TASK_SOURCE``) and the digests of its output files, while they are the ones its record vouches for. A persisted task result is only a record (paths,
metrics) in Prefect's result storage; the files it names live in the work directory, so a missing
output file is a cache miss (the step then recomputes, or reuses what its own fingerprint allows) and
a changed file is another key: a record whose files are gone is never returned.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy, CachePolicy

from oodgate.base.files import damaged, digest, file_digest

if TYPE_CHECKING:
    from prefect.context import TaskRunContext


@dataclass(frozen=True)
class Job:
    """One step of the flow for one (loss, seed), or for the data (``loss_id`` empty)."""

    fingerprint: str
    out_dir: str
    loss_id: str = ""
    seed: int = 0


def by_fingerprint(record: str) -> CachePolicy:
    """Key = the ``job`` parameter's fingerprint + the task's source + the digests of the step's
    record file and of every output it vouches for, but only while those outputs are intact: a
    missing or damaged output gives a key that never matches, so the task runs and the step repairs
    it. (A key over the damaged bytes themselves would match the result stored the last time the
    same damage was repaired, and return it without repairing.)"""

    def key(context: TaskRunContext, parameters: dict[str, object]) -> str:
        job: Job = parameters["job"]
        out = Path(job.out_dir)
        try:
            outputs = json.loads((out / record).read_text()).get("outputs") or {}
        except (OSError, ValueError):
            return uuid.uuid4().hex  # no readable record: never matches a stored result, the task runs
        if not outputs or damaged(out, outputs):
            return uuid.uuid4().hex
        # the directory too: a stored result names its files by path, and another project (or clone)
        # with the same inputs has the same fingerprint but not the same files
        return digest([job.fingerprint, str(out.resolve()), file_digest(out / record), outputs])

    return CacheKeyFnPolicy(cache_key_fn=key) + TASK_SOURCE
