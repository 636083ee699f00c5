"""A registered model is verified before it is used: every file of the version is hashed into the
registry at registration, and a loader that finds any file changed, missing or added refuses in one
line naming it, before any code from the artifact store runs. The attacker here can write the
artifact store (``mlartifacts/``) but not the registry (``mlflow.db``)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from oodgate.running import steps
from oodgate_mlflow import integrity, registry, tracking
from tasks.registry import serialised

MODEL = "verified"
GOOD = {"test/accuracy": 0.95, "test/ece": 0.01, "ood/mean/fpr95": 0.2}


def _register(
    exp_id: str, prepared_dir: Path, tmp_path: Path, seed: int = 0, fingerprint: str | None = None
) -> str:
    from oodgate.learning.classifier import ModelSpec, build_classifier
    from oodgate.learning.serving import ServingModel

    bundle = steps.load_prepared(prepared_dir, with_ood=False)
    spec = ModelSpec(
        "small_cnn", "softmax", bundle.num_classes, 1, 28, bundle.mean, bundle.std, "mps", {"width": 8}
    )
    run_id = tracking.start_run(exp_id, "softmax", {"oodgate.loss": "softmax"})
    tracking.log_metrics(run_id, GOOD)
    reference = {"score": "mps", "threshold": 0.5, "tpr": 0.95, "validation_scores": [0.9, 0.8, 0.7]}
    uri = tracking.log_model(
        run_id,
        ServingModel(build_classifier(spec, seed), 0.5),
        torch.rand(2, 1, 28, 28),
        bundle.class_names,
        reference,
    )
    candidate = registry.Candidate(
        loss="softmax",
        model_uri=uri,
        run_id=run_id,
        fingerprint=fingerprint,
        promote=True,
        reasons=(),
        tests={},
    )
    registry.register(MODEL, candidate, serialised(MODEL, tmp_path / "lock"))
    return uri


def _stored(tmp_path: Path) -> Path:
    """The registered version's directory in the artifact store (the pyfunc's root)."""
    (root,) = {
        p.parent for p in (tmp_path / "mlartifacts").rglob("MLmodel") if (p.parent / "artifacts").is_dir()
    }
    return root


@pytest.fixture
def registered(mlflow_db, prepared_dir, tmp_path):
    exp = tracking.ensure_experiment("oodgate", tmp_path)
    _register(exp, prepared_dir, tmp_path)
    return _stored(tmp_path)


def _load():
    from oodgate_mlflow.champion import load_champion

    return load_champion(MODEL)


def test_every_file_is_recorded_and_an_intact_model_loads(registered):
    from mlflow.tracking import MlflowClient

    record = json.loads(MlflowClient().get_model_version(MODEL, "1").tags[integrity.TAG])
    stored = integrity.manifest(registered)
    assert {
        k: v for k, v in record.items() if k != "registered_model_meta"
    } == stored  # what MLflow adds on download
    names = set(record)
    assert {"MLmodel", "pyfunc_model.py", "artifacts/meta.json", "artifacts/reference.json"} <= names
    assert any(n.endswith("model.pt2") for n in names)
    model, version = _load()
    assert version == 1 and len(model.predict(np.zeros((2, 1, 28, 28), np.float32))) == 2


def _rewrite_zip_member(archive: Path, suffix: str, change) -> None:
    with zipfile.ZipFile(archive) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    (name,) = [n for n in entries if n.endswith(suffix)]
    entries[name] = change(entries[name])
    with zipfile.ZipFile(archive, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)


def _tamper_weights(root: Path) -> str:
    (archive,) = root.rglob("model.pt2")
    # the weights of the exported program: flip bytes in the largest tensor file of the archive
    with zipfile.ZipFile(archive) as z:
        biggest = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    _rewrite_zip_member(archive, biggest, lambda b: bytes(x ^ 0xFF for x in b[:64]) + b[64:])
    return archive.relative_to(root).as_posix()


def _swap_program(root: Path, other: Path) -> str:
    (archive,) = root.rglob("model.pt2")
    (replacement,) = other.rglob("model.pt2")
    shutil.copyfile(replacement, archive)
    return archive.relative_to(root).as_posix()


def _reverse_class_names(root: Path) -> str:
    meta = root / "artifacts" / "meta.json"
    m = json.loads(meta.read_text())
    m["class_names"] = m["class_names"][::-1]
    meta.write_text(json.dumps(m))
    return "artifacts/meta.json"


def _inflate_reference(root: Path) -> str:
    ref = root / "artifacts" / "reference.json"
    r = json.loads(ref.read_text())
    r["validation_scores"] = [1e9] * len(r["validation_scores"])
    ref.write_text(json.dumps(r))
    return "artifacts/reference.json"


def _append_code(root: Path, marker: Path) -> str:
    with (root / "pyfunc_model.py").open("a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    return "pyfunc_model.py"


def _new_loader_module(root: Path, marker: Path) -> str:
    code = root / "code"
    code.mkdir(exist_ok=True)
    (code / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    mlmodel = root / "MLmodel"
    mlmodel.write_text(
        mlmodel.read_text().replace("loader_module: mlflow.pyfunc.model", "loader_module: evil")
    )
    return "MLmodel"


@pytest.mark.parametrize(
    "tamper",
    ["weights", "program", "class names", "reference", "code appended", "loader module"],
)
def test_a_changed_model_file_is_refused_naming_it_before_any_code_runs(
    registered, tamper, tmp_path, prepared_dir
):
    from oodgate_mlflow.integrity import ModelIntegrityError

    marker = tmp_path / "payload-ran"
    if tamper == "program":  # another valid program: a model with other weights, logged elsewhere
        other = tmp_path / "other"
        other.mkdir()
        run = tracking.start_run(tracking.ensure_experiment("other", other), "x", {})
        from oodgate.learning.classifier import ModelSpec, build_classifier
        from oodgate.learning.serving import ServingModel

        bundle = steps.load_prepared(prepared_dir, with_ood=False)
        spec = ModelSpec(
            "small_cnn", "softmax", bundle.num_classes, 1, 28, bundle.mean, bundle.std, "mps", {"width": 8}
        )
        tracking.log_model(
            run, ServingModel(build_classifier(spec, 7), 0.5), torch.rand(2, 1, 28, 28), bundle.class_names
        )
        name = _swap_program(registered, other / "mlartifacts")
    else:
        name = {
            "weights": lambda: _tamper_weights(registered),
            "class names": lambda: _reverse_class_names(registered),
            "reference": lambda: _inflate_reference(registered),
            "code appended": lambda: _append_code(registered, marker),
            "loader module": lambda: _new_loader_module(registered, marker),
        }[tamper]()
    with pytest.raises(ModelIntegrityError) as e:
        _load()
    message = str(e.value)
    assert "\n" not in message and f"model '{MODEL}' version 1: " in message
    assert name in message or (tamper == "loader module" and "code/evil.py" in message)
    assert not marker.exists()  # the artifact store's code never ran


def test_a_missing_file_is_refused(registered):
    from oodgate_mlflow.integrity import ModelIntegrityError

    (registered / "artifacts" / "reference.json").unlink()
    with pytest.raises(
        ModelIntegrityError, match=r"artifacts/reference\.json is missing from the artifact store"
    ):
        _load()


def test_a_version_registered_without_a_record_is_refused(registered):
    from mlflow.tracking import MlflowClient

    from oodgate_mlflow.integrity import ModelIntegrityError

    MlflowClient().delete_model_version_tag(MODEL, "1", integrity.TAG)
    with pytest.raises(
        ModelIntegrityError, match=r"has no record of its files .*run the pipeline \(`make run`\)"
    ):
        _load()


def test_a_version_whose_files_are_lost_changed_or_unrecorded_is_registered_again(
    mlflow_db, prepared_dir, tmp_path
):
    """ "Already registered" is said only of a version whose files verify; one with no record of its
    files, or a changed file, is superseded by the same weights registered again, and its aliases
    move to the new version, with one line saying why; registering once more reuses that one."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    exp = tracking.ensure_experiment("oodgate", tmp_path)
    uri = _register(exp, prepared_dir, tmp_path, fingerprint="same-weights")  # v1, the champion
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
    run_id = c.get_model_version(MODEL, "1").run_id

    def again() -> registry.Registration:
        candidate = registry.Candidate("softmax", uri, run_id, "same-weights", True, (), {})
        return registry.register(MODEL, candidate, serialised(MODEL, tmp_path / "lock"))

    c.delete_model_version_tag(MODEL, "1", integrity.TAG)  # a crash between registering and recording
    r = again()
    assert (r.version, r.new_version, r.champion) == (2, True, True)
    assert r.reasons[0].startswith(
        "registered again as version 2: version 1 has the same weights, but version 1 has no record of its files"
    )
    assert r.reasons[0].endswith("its alias champion moved to it")
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert c.get_model_version(MODEL, "1").tags["oodgate.superseded"].startswith("by version 2: ")

    for p in (tmp_path / "mlartifacts").rglob("reference.json"):
        p.write_text(p.read_text().replace("0.5", "0.25"))  # every copy: the run's and the versions'
    r = again()
    assert (r.version, r.new_version) == (
        3,
        True,
    ) and "reference.json is not the file registered" in r.reasons[0]
    r = again()
    assert (r.version, r.new_version) == (3, False)
    assert _load()[1] == 3


def test_a_registration_whose_files_are_not_the_ones_logged_is_undone(mlflow_db, prepared_dir, tmp_path):
    """The files registered are compared with the digest the run recorded when it logged the model:
    a difference (the artifact store changed between logging and registering) deletes the version."""
    from mlflow.tracking import MlflowClient

    from oodgate_mlflow.integrity import ModelIntegrityError

    exp = tracking.ensure_experiment("oodgate", tmp_path)
    uri = _register(exp, prepared_dir, tmp_path, fingerprint="a")
    run_id = MlflowClient().get_model_version(MODEL, "1").run_id
    candidate = registry.Candidate("softmax", uri, run_id, "b", True, (), {}, model_digest="0" * 64)
    with pytest.raises(ModelIntegrityError, match=r"version 2 are not the ones its run logged .*was deleted"):
        registry.register(MODEL, candidate, serialised(MODEL, tmp_path / "lock"))
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL}'")] == ["1"]
