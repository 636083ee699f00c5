"""Check ``data/`` against ``data.dvc`` with DVC, and prepare the splits."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import task

from oodgate import steps
from oodgate.config import Config
from tasks.caching import Job, by_fingerprint


class DataVersionError(RuntimeError):
    """``data/`` is missing or differs from what ``data.dvc`` records."""


def data_version(dvc_file: Path) -> str:
    if not dvc_file.is_file():
        raise DataVersionError(
            f"{dvc_file} not found: version the data first with `dvc add data` (after `make data` for the embedded default)"
        )
    outs = yaml.safe_load(dvc_file.read_text())["outs"][0]
    return outs["md5"]


@task(name="check-data", retries=1, retry_delay_seconds=2)
def check_data(project_root: str, data_dir: str = "data") -> str:
    """The DVC hash of ``data/``; fails with the fixing command if the data is missing or changed."""
    from dvc.repo import Repo

    root = Path(project_root)
    version = data_version(root / f"{data_dir}.dvc")
    if not (root / data_dir).is_dir():
        raise DataVersionError(
            f"{root / data_dir} is missing; run `make data` (embedded default) or `dvc pull` (from your remote)"
        )
    # data_status hashes the workspace against data.dvc, also on a fresh clone whose DVC cache is
    # empty (where `dvc status` can only say "not in cache", whether the bytes match or not).
    # (Absolute targets are silently ignored by data_status, so filter the whole status instead.)
    with Repo(str(root)) as repo:
        uncommitted = repo.data_status(granular=False)["uncommitted"]
    changes = {kind: paths for kind, paths in uncommitted.items() if f"{data_dir}/" in paths}
    if changes:
        raise DataVersionError(
            f"{root / data_dir} differs from {data_dir}.dvc ({changes}); run `dvc add {data_dir}` to version the "
            f"new data, or `dvc checkout {data_dir}.dvc` to restore the recorded version"
        )
    return version


@task(
    name="prepare-data",
    task_run_name="prepare-data",
    cache_policy=by_fingerprint("data.json", "id.pt", "ood.pt"),
    persist_result=True,
)
def prepare_data(cfg: Config, job: Job, root: str) -> dict:
    """``job.fingerprint`` is the data version and the data params and code (``prepare_fingerprint``).
    ``data.root`` in the config is relative to the project directory ``root``."""
    return steps.prepare(cfg, job.out_dir, Path(root) / cfg.data.root)
