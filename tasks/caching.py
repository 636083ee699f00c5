"""Jobs and the Prefect cache policy keyed on their fingerprints.

Every task of the flow takes a :class:`Job`: where it writes and the fingerprint of everything its
result depends on (``oodgate.steps.inputs``). The cache key is that fingerprint, the task's source
(``TASK_SOURCE``) and the digests of its output files. A persisted task result is only a record (paths,
metrics) in Prefect's result storage; the files it names live in the work directory, so a missing
output file is a cache miss (the step then recomputes, or reuses what its own fingerprint allows) and
a changed file is another key: a record whose files are gone is never returned.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy, CachePolicy

from oodgate.steps.common import digest, file_digest


@dataclass(frozen=True)
class Job:
    """One step of the flow for one (loss, seed), or for the data (``loss_id`` empty)."""

    fingerprint: str
    out_dir: str
    loss_id: str = ""
    seed: int = 0


def by_fingerprint(*outputs: str) -> CachePolicy:
    """Key = the ``job`` parameter's fingerprint + the task's source + its output files' digests."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        job: Job = parameters["job"]
        digests = []
        for name in outputs:
            path = Path(job.out_dir) / name
            if not path.is_file():
                return uuid.uuid4().hex  # never matches a stored record: the task runs
            digests.append(file_digest(path))
        return digest([job.fingerprint, digests])

    return CacheKeyFnPolicy(cache_key_fn=key) + TASK_SOURCE
