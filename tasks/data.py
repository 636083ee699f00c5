"""Check ``data/`` against ``data.dvc`` with DVC, and prepare the splits."""

from __future__ import annotations

from pathlib import Path

import yaml
from dvc.repo import Repo
from prefect import task

from oodgate.base.config import Config
from oodgate.running import steps
from oodgate.running.preflight import check_dvc_project
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


def _fix(data_dir: str, changed: list[str]) -> str:
    """Advice that works on a fresh clone and never deletes anything: the embedded default is
    written again with its exact bytes; other data is versioned as it now is (or restored by hand).
    (`dvc checkout data.dvc` fails on a fresh clone, whose cache is empty, and its --force form
    deletes the files it cannot restore.)"""
    if changed and all(Path(c).parts[:1] == ("embedded",) for c in changed):
        return (
            f"the embedded default data changed: write it again with `python -m oodgate materialize "
            f"--root {data_dir}` (the same bytes on every machine)"
        )
    return (
        f"run `dvc add {data_dir}` to version the data as it is now (then commit {data_dir}.dvc), or put "
        f"back the files you changed; nothing was deleted"
    )


@task(name="check-data")  # no retry: a mismatch does not change by waiting
def check_data(project_root: str, data_dir: str = "data") -> str:
    """The DVC hash of ``data/``; fails with the fixing command if the data is missing or changed."""
    root = Path(project_root)
    check_dvc_project(root, data_dir)  # DVC's own NotDvcRepoError names neither the path nor the fix
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
        changed = sorted(_changed_files(repo_root=root, data_dir=data_dir))
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise DataVersionError(
            f"{root / data_dir} differs from {data_dir}.dvc ({shown or changes}); {_fix(data_dir, changed)}"
        )
    return version


def _changed_files(repo_root: Path, data_dir: str) -> list[str]:
    """Files under ``data_dir`` (relative to it) that DVC cannot match to data.dvc (with an empty DVC
    cache, as on a fresh clone, that is every file of the changed directory)."""
    with Repo(str(repo_root)) as repo:
        status = repo.data_status(granular=True)["uncommitted"]
    prefix = f"{data_dir}/"
    return [
        p.removeprefix(prefix)
        for paths in status.values()
        for p in paths
        if p.startswith(prefix) and not p.endswith("/")
    ]


@task(
    name="prepare-data",
    task_run_name="prepare-data",
    cache_policy=by_fingerprint("data.json"),
    persist_result=True,
)
def prepare_data(cfg: Config, job: Job, root: str) -> dict:
    """``job.fingerprint`` is the data version and the data params and code (``prepare_fingerprint``).
    ``data.root`` in the config is relative to the project directory ``root``."""
    return steps.prepare(cfg, job.out_dir, Path(root) / cfg.data.root)
