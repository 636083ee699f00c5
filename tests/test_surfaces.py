"""What a user touches, checked fast: the Makefile's help, the flow's parameter types when shipped by
value, the trigger command's errors, and the champion loader's errors (no database is ever created)."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stack import free_port

from oodgate_servers.health import healthy, wait_until

REPO = Path(__file__).resolve().parents[1]


def test_make_help_lists_every_target_the_readme_and_docs_name():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    readme = "".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    named = set(re.findall(r"`make ([a-z][a-z-]*)", readme))
    assert {"run", "test", "serve", "trigger", "serve-model", "mlflow-ui", "repro"} <= named
    help_text = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True).stdout
    listed = set(re.findall(r"^make ([a-z-]+)", help_text, re.M))
    assert named <= listed, f"named in the README or docs/ but not in `make help`: {sorted(named - listed)}"
    makefile = (REPO / "Makefile").read_text()
    defined = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    assert listed <= defined, sorted(listed - defined)


def test_ci_runs_the_tests_and_the_linter():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make lint" in ci


def test_flow_annotations_are_objects_not_strings():
    """A served run receives the flow by value: a string annotation would name a type that never arrives."""
    from prefect import Flow

    import flows.monitor
    import flows.pipeline

    found = [v for m in (flows.pipeline, flows.monitor) for v in vars(m).values() if isinstance(v, Flow)]
    assert len(found) == 2
    for f in found:
        annotations = inspect.get_annotations(f.fn)
        assert annotations and not [k for k, v in annotations.items() if isinstance(v, str)], annotations


def test_flow_parameters_validate_after_pickling_by_value(tmp_path):
    """What a served deployment's runner does: cloudpickle the Flow object for a spawned process.
    Its module attribute is the Flow, not the function, so cloudpickle sends the function by value
    with only the globals its body uses; then the parameters are validated in the new process."""
    import cloudpickle

    import flows.pipeline

    blob = cloudpickle.dumps(flows.pipeline.pipeline)
    (tmp_path / "flow.pkl").write_bytes(blob)
    code = (
        "import cloudpickle, json; f = cloudpickle.load(open('flow.pkl', 'rb')); "
        "print(json.dumps(f.validate_parameters("
        "{'params_path': 'p.yaml', 'root': '/x', 'overrides': {'train.epochs': 2}})))"
    )
    # the runner's process has the checkout on its path, as `make serve` does (flows/ is not installed)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"overrides": {"train.epochs": 2}' in out.stdout


def test_trigger_without_a_server_says_how_to_start_one():
    url = f"http://127.0.0.1:{free_port()}/api"
    out = subprocess.run(
        [sys.executable, "-m", "flows.trigger", "--api-url", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"no Prefect server answers at {url}" in out.stderr and "make serve" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_a_prefect_server_that_does_not_answer_is_refused_before_any_work(project, tmp_path):
    """PREFECT_API_URL naming a dead server gave Prefect's "Failed to reach API" and no way on; now
    the flow's entry point says so in one line, with the two ways on, before anything starts."""
    from conftest import shell_env

    url = f"http://127.0.0.1:{free_port()}/api"
    env = shell_env(PREFECT_API_URL=url, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--root", str(project)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(
        f"error: PREFECT_API_URL={url} does not answer ({url}/health): start that server"
    )
    assert "unset PREFECT_API_URL" in out.stderr and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stdout + out.stderr
    assert not (project / "artifacts").exists()  # no work began


def test_serve_prints_how_to_trigger():
    from flows.deploy import trigger_hint

    hint = trigger_hint("http://127.0.0.1:4200/api")
    assert hint.startswith("Trigger a run now:  make trigger\n")  # the default address: nothing to add
    assert (
        "PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'oodgate-pipeline/scheduled'"
        in hint
    )
    other = trigger_hint("http://127.0.0.1:4311/api/")
    assert other.startswith("Trigger a run now:  PREFECT_API_URL=http://127.0.0.1:4311/api make trigger\n")


# ------------------------------------------------------------------ the champion loader
def test_champion_without_a_database_names_it_and_creates_nothing(tmp_path, monkeypatch):
    from oodgate_mlflow.champion import ChampionNotFoundError, resolve

    db = tmp_path / "mlflow.db"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChampionNotFoundError, match=rf"no MLflow tracking database at {re.escape(str(db))}"):
        resolve(uri=f"sqlite:///{db}")
    assert list(tmp_path.iterdir()) == []  # no empty mlflow.db left behind


def test_champion_errors_name_the_model_and_the_uri(mlflow_db):
    from mlflow.tracking import MlflowClient

    from oodgate_mlflow.champion import ChampionNotFoundError, resolve

    with pytest.raises(ChampionNotFoundError, match=rf"no registered model 'nope' at {re.escape(mlflow_db)}"):
        resolve("nope", uri=mlflow_db)
    c = MlflowClient(mlflow_db)
    c.create_registered_model("m")
    run = c.create_run(c.create_experiment("e"))
    c.create_model_version("m", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    with pytest.raises(
        ChampionNotFoundError, match=r"model 'm' at .* has no version with alias 'champion' \(versions: 1\)"
    ):
        resolve("m", uri=mlflow_db)
    with pytest.raises(ChampionNotFoundError, match=r"has no version 7 \(versions: 1\)"):
        resolve("m", uri=mlflow_db, version=7)
    assert (
        resolve("m", uri=mlflow_db, version=1).version == "1"
        or int(resolve("m", uri=mlflow_db, version=1).version) == 1
    )
    # a registry with a challenger but no champion: one line with the version, why, and how to use it
    c.set_model_version_tag("m", "1", "oodgate.loss", "logitnorm")
    reasons = "accuracy 0.97 vs baseline 0.96: gain +0.01, 95% lower bound +0.001, p = 0.01, 3 vs 3 seeds: shown; mean FPR95 0.6 vs baseline 0.7: gain +0.1, 95% lower bound -0.2, p = 0.3, 3 vs 3 seeds: not shown with 95% confidence (superior: lower by more than 0, bound +0.0000)"
    c.set_model_version_tag("m", "1", "oodgate.gate.reasons", reasons)
    c.set_registered_model_alias("m", "challenger", "1")
    with pytest.raises(ChampionNotFoundError) as e:
        resolve("m", uri=mlflow_db)
    message = str(e.value)
    assert "\n" not in message
    assert "has no champion: no candidate was promoted over the SoftMax baseline" in message
    assert "the challenger is version 1 (logitnorm, not promoted: mean FPR95 0.6 vs baseline 0.7" in message
    assert "--alias challenger" in message and "load_champion(alias='challenger')" in message
    assert int(resolve("m", "challenger", uri=mlflow_db).version) == 1


def test_a_read_only_tracking_database_is_refused_with_its_path(mlflow_template, tmp_path):
    """It used to fail at the first write with SQLAlchemy's text and no path."""
    import os
    import shutil
    import subprocess

    from oodgate_mlflow import tracking

    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    shutil.copy(mlflow_template, src / "mlflow.db")
    if os.geteuid() == 0:  # root writes through file modes: a read-only bind mount instead
        mounted = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)]).returncode != 0:
            pytest.skip("cannot make a read-only mount here")
        db = ro / "mlflow.db"
    else:
        (src / "mlflow.db").chmod(0o444)
        src.chmod(0o555)
        db = src / "mlflow.db"
    try:
        with pytest.raises(
            tracking.TrackingUnavailableError, match=rf"{re.escape(str(db))}' is not writable"
        ):
            tracking.connect(f"sqlite:///{db}")
        assert tracking.connect(f"sqlite:///{db}", write=False)  # reading the champion still works
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])
        else:
            src.chmod(0o755)


# ------------------------------------------------------------------ a damaged tracking database
def _damaged_copy(template: Path, dst: Path, how: str) -> Path:
    data = template.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # garbled: every 97th byte changed, the header included
        garbled = bytearray(data)
        for i in range(0, len(garbled), 97):
            garbled[i] = (garbled[i] * 7 + 13) % 256
        data = bytes(garbled)
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize(
    ("how", "problem"),
    [("truncated", "database disk image is malformed"), ("garbled", "file is not a database")],
)
def test_a_damaged_tracking_database_is_refused_before_any_work(
    mlflow_template, project, how, problem, capsys, monkeypatch
):
    """It used to end in SQLAlchemy's text, naming neither the file nor a fix. Now the flow's entry
    point refuses it before Prefect starts, with the path and the fix, and leaves its bytes alone."""
    import hashlib

    import mlflow

    from flows.pipeline import main

    # the project's own mlflow.db, as for a user: no URI left behind by an earlier test in this process
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    db = _damaged_copy(mlflow_template, project / "mlflow.db", how)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert main(["--root", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the MLflow tracking database '{db}' is damaged (SQLite: {problem})"), err
    assert f"move it aside (mv {db} {db}.damaged) to start a new one; nothing was changed or deleted" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in project.iterdir() if p.name.startswith("mlflow")) == ["mlflow.db"]
    assert not (project / "artifacts").exists()  # no work began


def test_a_database_damaged_after_connect_is_named_where_the_store_is_first_read(mlflow_template, tmp_path):
    import mlflow

    from oodgate_mlflow import tracking

    db = _damaged_copy(mlflow_template, tmp_path / "mlflow.db", "truncated")
    mlflow.set_tracking_uri(f"sqlite:///{db}")  # as if connect() had seen it whole
    try:
        with pytest.raises(
            tracking.TrackingUnavailableError,
            match=rf"'{re.escape(str(db))}' is damaged \(SQLite: database disk image is malformed\)",
        ):
            tracking.ensure_experiment("oodgate", tmp_path)
    finally:
        mlflow.set_tracking_uri(None)


def test_reading_the_champion_from_a_damaged_database_names_it(mlflow_template, tmp_path):
    from oodgate_mlflow import tracking
    from oodgate_mlflow.champion import resolve

    db = _damaged_copy(mlflow_template, tmp_path / "mlflow.db", "garbled")
    with pytest.raises(tracking.TrackingUnavailableError, match=rf"'{re.escape(str(db))}' is damaged"):
        resolve(uri=f"sqlite:///{db}")


# ------------------------------------------------------------------ the shared server's password
def test_the_database_password_is_created_0600_and_never_chmodded(tmp_path, monkeypatch):
    """It was written with the umask's mode (0644 under the usual 022) and chmodded after, readable by
    other users in between. A chmod after creation is now a failure, so the mode can only come
    from the creation itself."""
    import os
    import stat

    from oodgate_servers import mlflow_server

    def no_chmod(*args, **kwargs):
        raise AssertionError("the password file was chmodded after it was created")

    monkeypatch.setattr(os, "chmod", no_chmod)
    for umask in (0o000, 0o022):
        root = tmp_path / f"umask{umask:03o}"
        root.mkdir()
        previous = os.umask(umask)
        try:
            password = mlflow_server._password(root)
        finally:
            os.umask(previous)
        st = (root / "password").stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert len(password) >= 32 and (root / "password").read_text() == password + "\n"
        assert mlflow_server._password(root) == password  # kept: the cluster was initialised with it
    with pytest.raises(FileExistsError):  # never written through something already there
        mlflow_server.write_secret(root / "password", "x")


# ------------------------------------------------------------------ make mlflow-ui
@pytest.mark.slow
def test_make_mlflow_ui_runs_the_two_processes_the_readme_promises(tmp_path):
    """It ran 7: MLflow 3.17's `mlflow ui` starts uvicorn with 4 workers by default. Started here as
    a user starts it, through the Makefile's own recipe (run in an empty directory, so that it opens
    a new mlflow.db there, on a free port), then its process tree is counted and stopped."""
    import time

    import psutil
    from stack import stop_process

    venv = Path(sys.executable).parents[1]
    if shutil.which("make") is None or not (venv / "bin" / "mlflow").exists():
        pytest.skip("needs make and the project's virtualenv")
    port = free_port()
    command = [
        "make", "-s", "-C", str(tmp_path), "-f", str(REPO / "Makefile"),
        "-o", str(venv / ".installed"),  # the virtualenv is set up already: never reinstalled here
        "mlflow-ui", f"VENV={venv}", f"MLFLOW_UI_PORT={port}",
    ]  # fmt: skip
    log = tmp_path / "mlflow-ui.log"
    with log.open("w") as fh:
        make = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def up() -> bool:
            assert make.poll() is None, log.read_text()[-3000:]
            return healthy(f"http://127.0.0.1:{port}")

        try:
            wait_until(up, 180)
        except TimeoutError:
            pytest.fail(log.read_text()[-3000:])
        time.sleep(2)  # any worker a server forks after it first answers
        tree = [psutil.Process(make.pid), *psutil.Process(make.pid).children(recursive=True)]
        (ui,) = [p for p in tree if "ui" in p.cmdline()[1:3] and p.cmdline()[1].endswith("mlflow")]
        processes = [ui, *ui.children(recursive=True)]
        shown = [" ".join(p.cmdline())[:120] for p in processes]
        assert len(processes) == 2, shown
        assert any("uvicorn" in line for line in shown), shown
        assert f"MLflow UI: http://127.0.0.1:{port}/#/experiments" in log.read_text()
    finally:
        stop_process(make, timeout=20)  # then SIGKILL to its whole process group, if anything is left


def test_the_registry_line_says_each_alias_once():
    from oodgate_mlflow.registry import Registration

    def line(**kw):
        return Registration("logitnorm", 1, **kw, reasons=()).line()

    assert line(new_version=True, champion=False, promoted_now=False) == (
        "logitnorm: registered as version 1, alias challenger; the champion is unchanged"
    )
    assert line(new_version=True, champion=True, promoted_now=True) == (
        "logitnorm: registered as version 1, alias challenger, now **champion**"
    )
    assert line(new_version=False, champion=True, promoted_now=False).endswith(
        "already registered as version 1, alias challenger, champion (unchanged)"
    )


# ------------------------------------------------------------------ the REST server's request guard
async def _echo(scope, receive, send):
    """An ASGI app standing where the scoring server does: answers 200 with the body it read."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _post(
    app, body: bytes, content_type: bytes = b"application/json", chunk: int = 65536
) -> tuple[int, bytes]:
    """One POST /invocations to the ASGI ``app``, its body streamed in ``chunk``-byte pieces."""
    import asyncio

    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    incoming = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)
    ]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": [(b"content-type", content_type)],
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_json_nested_deeper_than_the_limit_gets_400_and_one_line_before_the_model():
    """100,000 nested brackets sent to /invocations gave HTTP 500 without a message (a RecursionError
    in the JSON parser); the request-size middleware now measures the nesting in one pass."""
    import json

    from oodgate_mlflow.champion import MAX_JSON_DEPTH, _BodyLimit

    app = _BodyLimit(_echo, 16 * 2**20)
    status, body = _post(app, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400
    assert json.loads(body) == {
        "error_code": "BAD_REQUEST",
        "message": 'JSON nesting depth 100000 exceeds the limit of 32; send {"inputs": [...]} with images '
        "(batch, C, H, W)",
    }
    # images (depth 5), and strings holding brackets and escaped quotes, reach the model unchanged
    images = json.dumps({"inputs": [[[[0.5] * 28] * 28]] * 2, "note": "[" * 100 + '\\"{'}).encode()
    assert _post(app, images, chunk=1000) == (200, images)
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert _post(app, at_limit) == (200, at_limit)
    assert _post(app, b"[" + at_limit + b"]")[0] == 400
    # the size limit is unchanged, and a CSV body is not read as JSON
    assert _post(_BodyLimit(_echo, 100), images)[0] == 413
    assert _post(app, b"[" * 100, content_type=b"text/csv; charset=utf-8")[0] == 200


def test_processes_creating_one_new_tracking_database_at_once_all_succeed(tmp_path):
    """Two `make run` on a fresh clone open a new mlflow.db at once: MLflow creates and migrates it
    in each, and the loser of the race failed on `table _alembic_tmp_experiments already exists`,
    called a damaged database. Under the store's lock each process finds it created or creates it."""
    import subprocess
    import sys
    import time

    db = tmp_path / "mlflow.db"
    start = time.time() + 3  # all four open the store at the same moment, past their imports
    code = (
        "import sys, time; from pathlib import Path; from oodgate_mlflow import tracking; "
        f"tracking.connect('sqlite:///{db}', root=Path('{tmp_path}')); "
        f"time.sleep(max(0.0, {start} - time.time())); "
        f"print(tracking.ensure_experiment('oodgate', Path('{tmp_path}')))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment, the same id for all
