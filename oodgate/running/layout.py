"""Where each step writes under the work directory (``workdir`` in params.yaml, ``artifacts/``).

The DVC stages (one per step, loss and seed) and ``python -m oodgate run`` use fixed paths; the Prefect
flow uses content-addressed directories, ``<workdir>/cache/<step>-<fingerprint>`` (:meth:`Layout.cached`),
so runs with other inputs never overwrite each other and a rerun with the same inputs resumes or
reuses. Both hold the same files and the same record, and the record decides reuse either way
(:mod:`oodgate.running.steps.reuse`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    workdir: Path

    def cached(self, step: str, fingerprint: str) -> Path:
        """The flow's directory of one step's result, named by its fingerprint."""
        return self.workdir / "cache" / f"{step}-{fingerprint}"

    @property
    def prepared(self) -> Path:
        return self.workdir / "prepared"

    def train(self, loss_id: str, seed: int) -> Path:
        return self.workdir / "train" / loss_id / f"seed{seed}"

    def calibrate(self, loss_id: str, seed: int) -> Path:
        return self.workdir / "calibrate" / loss_id / f"seed{seed}"

    def select(self, loss_id: str) -> Path:
        return self.workdir / "select" / loss_id

    def evaluate(self, loss_id: str, seed: int) -> Path:
        return self.workdir / "evaluate" / loss_id / f"seed{seed}"

    def metrics(self, loss_id: str, seed: int) -> Path:
        """One (loss, seed)'s final metrics for ``dvc metrics show/diff`` (kept in git)."""
        return self.workdir / "metrics" / loss_id / f"seed{seed}.json"

    def curves(self, kind: str, loss_id: str, seed: int) -> Path:
        """``curves/<kind>/<loss>/seed<k>``: files of one shape per directory, so that ``dvc.yaml``
        can give each kind its axes (``training`` is one JSON file, ``seed<k>.json``)."""
        return self.workdir / "curves" / kind / loss_id / f"seed{seed}"

    @property
    def inputs(self) -> Path:
        """What each step depends on (``oodgate.running.steps.inputs``), for the DVC stages (kept in git)."""
        return self.workdir / "inputs"

    @property
    def gate(self) -> Path:
        return self.workdir / "gate.json"

    @property
    def report(self) -> Path:
        return self.workdir / "report.md"
