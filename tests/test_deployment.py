"""The scheduled deployment the way a user runs it: real parts only, nothing mocked.

A real Prefect server (its own PREFECT_HOME), ``python -m flows.deploy`` serving the deployment
with a cron due every minute, a project directory as ``make data`` leaves it (data/, data.dvc, a
small params.yaml), and the SQLite MLflow store the flow creates in that project. Then:

1. ``python -m flows.trigger --wait`` (what ``make trigger`` runs) starts a run that must end
   Completed, with the gate's markdown artifact, the MLflow parent/child runs and the registry
   exactly as ``python -m flows.pipeline`` (what ``make run`` runs) leaves them in a copy of the project;
2. the cron itself fires a run that completes;
3. of those two runs, the later one (same data, code and params) trains nothing, reuses both
   child runs and adds no model version.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from stack import REPO, Stack, free_port, isolated_env, prefect_home, read_events

from oodgate_servers.health import poll, wait_until

pytestmark = pytest.mark.slow

FULL_NAME = "oodgate-pipeline/scheduled"
MODEL = "oodgate-classifier"
LOSSES = {"softmax", "isomax_plus"}


def deployment_params(template: Path) -> dict:
    """Two epochs of SoftMax and IsoMax+ on three digits: seconds, and IsoMax+ passes the gate
    (accuracy 0.947 vs 0.920, ECE 0.040 vs 0.085, mean FPR95 0.805 vs 0.873 on CPU), so the
    registry path runs too."""
    raw = yaml.safe_load((template / "params.yaml").read_text())
    raw["train"]["epochs"] = 2
    raw["losses"] = {"softmax": {"method": "softmax"}, "isomax_plus": {"method": "isomax_plus"}}
    raw["schedule"] = {"cron": "* * * * *", "timezone": "UTC"}
    # the monitoring deployment is served too; its cron (once a year) leaves the runs to the test
    raw["monitor"] = {"batch": "incoming/in_distribution.npz", "schedule": {"cron": "0 0 1 1 *"}}
    return raw


def _copy_project(template: Path, dst: Path, params: dict) -> Path:
    shutil.copytree(template, dst, symlinks=True)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


@dataclass
class Served:
    stack: Stack
    project: Path
    reference: Path
    trigger: subprocess.CompletedProcess
    trigger_seconds: float
    flow_run_id: str
    trigger_lines: list  # (line, the run's state on the server when the line arrived)

    @property
    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=f"sqlite:///{self.project / 'mlflow.db'}")

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.stack.api_url}):
            return get_client(sync_client=True)


def _wait_for_deployment(stack: Stack, timeout: float = 120) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:

        def deployed() -> bool:
            for name, proc in (("serve", stack.serve), ("server", stack.server)):
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited early (rc={proc.returncode})\n{stack.diagnostics()}")
            try:
                client.read_deployment_by_name(FULL_NAME)
            except ObjectNotFound:
                return False
            return True

        try:
            wait_until(deployed, timeout)
        except TimeoutError:
            pytest.fail(f"deployment {FULL_NAME!r} never appeared\n{stack.diagnostics()}")


def _trigger(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m flows.trigger ARGS`` (what ``make trigger ARGS=...`` runs) against the test's server."""
    return subprocess.run(
        [sys.executable, "-m", "flows.trigger", *args],
        cwd=REPO,
        env=dict(stack.env, PREFECT_API_URL=stack.api_url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _trigger_watched(
    stack: Stack, *args: str, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, list]:
    """``python -m flows.trigger ARGS`` read line by line as it prints: each line with the state the
    server holds for the run at the moment the line arrived (None before the run's address)."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.trigger", *args],
        cwd=REPO,
        env=dict(stack.env, PREFECT_API_URL=stack.api_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines, run_id = [], None
    try:
        with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
            for line in proc.stdout:
                match = re.search(r"/runs/flow-run/([0-9a-f-]{36})", line)
                run_id = run_id or (match.group(1) if match else None)
                state = client.read_flow_run(run_id).state.name if run_id else None
                lines.append((line.rstrip("\n"), state))
        proc.wait()
    finally:
        timer.cancel()
        reader.join(timeout=10)
    out = "".join(f"{line}\n" for line, _ in lines)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(err)), lines


@pytest.fixture(scope="module")
def served(project_template, tmp_path_factory):
    from flows.server import wait_healthy

    base = tmp_path_factory.mktemp("deployment")
    params = deployment_params(project_template)
    project = _copy_project(project_template, base / "project", params)
    reference = _copy_project(project_template, base / "reference", params)
    from flows.monitor import write_demo_batches

    write_demo_batches(project / "params.yaml", project / "incoming")
    home = base / "prefect-home"
    home.mkdir()
    stack = Stack(home=home, port=free_port(), env=isolated_env(home))
    try:
        stack.start_server()
        try:
            wait_healthy(stack.api_url, timeout=120)
        except TimeoutError:
            pytest.fail(f"Prefect server never became healthy\n{stack.diagnostics()}")
        stack.start_serve("params.yaml", root=project)
        _wait_for_deployment(stack)

        t0 = time.perf_counter()
        trigger, lines = _trigger_watched(stack, "--wait", timeout=300)
        seconds = time.perf_counter() - t0
        match = re.search(r"/runs/flow-run/([0-9a-f-]{36})", trigger.stdout)
        assert match, f"{trigger.stdout}\n{trigger.stderr}\n{stack.diagnostics()}"
        yield Served(stack, project, reference, trigger, seconds, match.group(1), lines)
    finally:
        stack.stop()


def _flow_runs(s: Served, flow: str = "oodgate-pipeline") -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with s.client() as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled"])),
            sort=FlowRunSort.START_TIME_ASC,
        )


def _task_names(s: Served, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with s.client() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


def _parent(client: MlflowClient, flow_run_id: str):
    exp = client.get_experiment_by_name("oodgate")
    (run,) = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`oodgate.prefect_flow_run_id` = '{flow_run_id}' and tags.`oodgate.role` = 'pipeline'",
    )
    return run


def _trained(client: MlflowClient) -> dict:
    """The child runs that trained, one per loss: whichever of the triggered and the cron run came
    first made them; the later one reuses them (the cron may fire before the trigger)."""
    exp = client.get_experiment_by_name("oodgate")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`oodgate.role` != 'pipeline'")
    by_loss = {r.info.run_name: r for r in runs}
    assert len(by_loss) == len(runs), [r.info.run_name for r in runs]  # nothing trained twice
    return by_loss


def _children(client: MlflowClient, parent_id: str) -> dict:
    exp = client.get_experiment_by_name("oodgate")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


# ------------------------------------------------------------------ 1. a triggered run
def test_trigger_prints_the_run_address_and_its_completion(served):
    out, err = served.trigger.stdout, served.trigger.stderr
    assert served.trigger.returncode == 0, f"{out}\n{err}\n{served.stack.diagnostics()}"
    assert f"http://127.0.0.1:{served.stack.port}/runs/flow-run/{served.flow_run_id}" in out
    assert "ended Completed" in out
    assert "Traceback" not in out + err
    print(f"triggered deployment run, trigger to Completed: {served.trigger_seconds:.1f} s")


def test_trigger_wait_prints_each_state_as_it_happens(served):
    """`--wait` used to print nothing while the run was Running. Each state line must arrive while
    the server still holds that state (a line held in a buffer until the end would arrive after the
    run had Completed), and the last line says how it ended."""
    shown = [
        (line.split()[-1], state)
        for line, state in served.trigger_lines
        if re.match(r"  \d\d:\d\d:\d\d ", line)
    ]
    print("\n".join(line for line, _ in served.trigger_lines))
    assert [name for name, _ in shown][-2:] == ["Running", "Completed"], served.trigger.stdout
    assert ("Running", "Running") in shown, shown  # printed while the run was running
    assert (
        served.trigger_lines[-1][0].startswith("Flow run '")
        and "ended Completed" in served.trigger_lines[-1][0]
    )


def test_triggered_run_leaves_what_make_run_leaves(served):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.objects import StateType

    with served.client() as client:
        run = client.read_flow_run(served.flow_run_id)
        assert run.state.type == StateType.COMPLETED
        assert run.parameters == {"params_path": "params.yaml", "root": str(served.project)}
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["gate-decision"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]),
            )
        )
    assert "## Gate (baseline: softmax; " in artifact.data and "**isomax_plus**: PROMOTE" in artifact.data

    # `make run` on a copy of the same project: the flow in its own process, temporary Prefect server.
    ref_env = {k: v for k, v in served.stack.env.items() if k != "PREFECT_API_URL"}
    ref_env["PREFECT_HOME"] = str(prefect_home(served.reference / ".prefect-home"))
    ref = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--root", str(served.reference)],
        cwd=REPO,
        env=ref_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    # `make run > out.txt` captures the table and the decision (they used to be log lines on stderr only)
    for part in (
        "# oodgate pipeline",
        "| loss | score | accuracy |",
        "## Gate (baseline: softmax; ",
        "## Registry",
    ):
        assert part in ref.stdout, ref.stdout[-3000:]
    assert "**isomax_plus**: PROMOTE" in ref.stdout
    assert "Beginning flow run" in ref.stderr and "Beginning flow run" not in ref.stdout  # logs: stderr

    got, want = served.mlflow, MlflowClient(tracking_uri=f"sqlite:///{served.reference / 'mlflow.db'}")
    parent = _parent(got, served.flow_run_id)
    exp = want.get_experiment_by_name("oodgate")
    (ref_parent,) = want.search_runs([exp.experiment_id], filter_string="tags.`oodgate.role` = 'pipeline'")
    assert parent.info.status == ref_parent.info.status == "FINISHED"
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("oodgate.gate")} == {
        k: v for k, v in ref_parent.data.tags.items() if k.startswith("oodgate.gate")
    }
    children, ref_children = _trained(got), _children(want, ref_parent.info.run_id)
    assert set(children) == set(ref_children) == LOSSES
    for loss in LOSSES:
        a, b = children[loss], ref_children[loss]
        assert a.info.status == b.info.status == "FINISHED"
        finals = {k: v for k, v in a.data.metrics.items() if not k.startswith("time/")}
        assert finals == {k: v for k, v in b.data.metrics.items() if not k.startswith("time/")}  # bit-equal
        assert a.data.tags["oodgate.model_fingerprint"] == b.data.tags["oodgate.model_fingerprint"]

    def registry(client: MlflowClient) -> tuple:
        versions = client.search_model_versions(f"name='{MODEL}'")
        champ = client.get_model_version_by_alias(MODEL, "champion")
        return (
            len(versions),
            str(champ.version),
            champ.tags["oodgate.loss"],
            champ.tags["oodgate.model_fingerprint"],
        )

    assert registry(got) == registry(want) == (1, "1", "isomax_plus", registry(want)[3])


def test_runs_are_readable_while_they_happen(served):
    children = _trained(served.mlflow)
    parent = served.mlflow.get_run(children["softmax"].data.tags["mlflow.parentRunId"])
    flow_run_id = parent.data.tags["oodgate.prefect_flow_run_id"]  # the run that trained
    names = _task_names(served, flow_run_id)
    for loss in LOSSES:
        for step in ("train", "calibrate", "evaluate"):
            assert f"{step}-{loss}-seed0" in names, names
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with served.client() as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    epochs = [entry.message for entry in logs if re.match(r"epoch \d+/2: train loss [\d.]+", entry.message)]
    assert len(epochs) == 2 * len(LOSSES), [entry.message for entry in logs]
    assert all("val accuracy" in m for m in epochs)

    first, second = sorted(children.values(), key=lambda r: r.info.start_time)
    for child in children.values():  # a child spans its own tasks, inside the pipeline's run
        assert parent.info.start_time <= child.info.start_time < child.info.end_time <= parent.info.end_time
    assert first.info.end_time <= second.info.start_time  # one (loss, seed) at a time: no overlap

    # One naming scheme: no two metric names that differ only in '/' versus '_'.
    keys = list(children["isomax_plus"].data.metrics)
    assert len({k.replace("/", "_") for k in keys}) == len(keys)
    assert {"test/accuracy", "seed0/test/accuracy", "seed0/val/ece", "history/seed0/val_accuracy"} <= set(
        keys
    )
    history = served.mlflow.get_metric_history(
        children["isomax_plus"].info.run_id, "history/seed0/val_accuracy"
    )
    assert [h.step for h in history] == [1, 2]


def test_trigger_refuses_a_bad_override_before_creating_a_run(served):
    def manual() -> int:  # the cron may add runs meanwhile; a trigger's runs are not auto-scheduled
        return len([r for r in _flow_runs(served) if not r.auto_scheduled])

    before = manual()
    out = _trigger(served.stack, "--set", "train.epochs=0")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "train.epochs" in out.stderr and "nothing was triggered" in out.stderr
    assert "Traceback" not in out.stderr
    assert manual() == before


# ------------------------------------------------------------------ the monitoring deployment
def test_the_monitoring_deployment_scores_the_batch_with_the_champion(served):
    """After the pipeline registered a champion: `make trigger ARGS=--monitor` runs the served
    monitoring deployment to Completed; the batch run in MLflow names the champion's version and the
    Prefect server has the run's `oodgate.monitor.scored` event."""
    from prefect.client.schemas.objects import StateType

    out = _trigger(served.stack, "--monitor", "--wait", timeout=300)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{served.stack.diagnostics()}"
    assert "of 'oodgate-monitor/scheduled'" in out.stdout and "ended Completed" in out.stdout
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", out.stdout).group(1)
    (run,) = [r for r in _flow_runs(served, "oodgate-monitor") if not r.auto_scheduled]  # not next 1 Jan's
    assert str(run.id) == run_id and run.state.type == StateType.COMPLETED
    champion = served.mlflow.get_model_version_by_alias(MODEL, "champion")
    exp = served.mlflow.get_experiment_by_name("oodgate-monitor")
    (batch_run,) = served.mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`oodgate.prefect_flow_run_id` = '{run_id}'"
    )
    assert batch_run.data.tags["oodgate.champion_version"] == str(champion.version)
    assert batch_run.data.params["batch"] == str(served.project / "incoming" / "in_distribution.npz")
    assert list(
        (served.project / "artifacts" / "monitor").glob(f"in_distribution-*-v{champion.version}.parquet")
    )
    events = read_events(served.stack.api_url, "oodgate.monitor.scored")
    assert [e["resource"]["prefect.resource.id"] for e in events] == [f"oodgate.model.{MODEL}"]
    assert events[0]["payload"]["champion_version"] == int(champion.version)


# ------------------------------------------------------------------ 2. the cron fires a run; 3. it is cached
def test_the_cron_fires_a_run_and_a_rerun_trains_nothing(served):
    from prefect.client.schemas.objects import StateType

    def cron_completed(runs: list) -> bool:
        if any(r.auto_scheduled and r.state.type == StateType.COMPLETED for r in runs):
            return True
        failed = [r for r in runs if r.state.type in (StateType.FAILED, StateType.CRASHED)]
        assert not failed, f"{[(r.name, r.state.message) for r in failed]}\n{served.stack.diagnostics()}"
        return False

    # the next minute boundary, then the run itself
    runs = poll(lambda: _flow_runs(served), cron_completed, 150, interval=2)
    cron_runs = [r for r in runs if r.auto_scheduled and r.state.type == StateType.COMPLETED]
    if not cron_runs:
        pytest.fail(f"no cron-fired run completed: {[(r.name, r.state.name) for r in runs]}")
    cron_run = cron_runs[0]
    assert cron_run.parameters == {"params_path": "params.yaml", "root": str(served.project)}
    start = cron_run.expected_start_time
    assert (start.second, start.microsecond) == (0, 0)  # on the cron's minute

    # the triggered run and the first cron run, in start order (on busy cores a second cron run may
    # have come due meanwhile; it waits for its slot and changes nothing here)
    pair = [r for r in runs if str(r.id) in {served.flow_run_id, str(cron_run.id)}]
    assert len(pair) == 2 and all(r.state.type == StateType.COMPLETED for r in pair), pair
    first, later = sorted(pair, key=lambda r: r.start_time)
    assert any(n.startswith("train-") for n in _task_names(served, first.id))
    later_tasks = _task_names(served, later.id)
    assert not [n for n in later_tasks if n.startswith(("train-", "calibrate-", "evaluate-"))], later_tasks

    parent = _parent(served.mlflow, str(later.id))
    assert parent.info.status == "FINISHED"
    assert _children(served.mlflow, parent.info.run_id) == {}  # both losses reused, nothing re-logged
    reused = dict(item.split("=") for item in parent.data.tags["oodgate.reused_runs"].split(","))
    assert set(reused) == LOSSES
    assert parent.data.tags["oodgate.gate.isomax_plus"] == "promote"
    assert (
        parent.data.tags["oodgate.registry"]
        == "isomax_plus: already registered as version 1, alias challenger, champion (unchanged)"
    )
    assert len(served.mlflow.search_model_versions(f"name='{MODEL}'")) == 1  # no v2 of the same weights
    seconds = (later.end_time - later.start_time).total_seconds()
    print(f"cached re-run of the deployment: {seconds:.1f} s (Running to Completed)")

    graceful = served.stack.stop()  # the documented order, and both stop without being killed
    assert graceful == {"serve": True, "server": True}, f"{graceful}\n{served.stack.diagnostics()}"


# ------------------------------------------------------------------ the champion, as the README uses it
def _readme_block(heading: str, lang: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    return section[section.index(f"```{lang}\n") + len(lang) + 4 :].split("```", 1)[0]


def _user_env(served: Served) -> dict[str, str]:
    """A shell elsewhere: the package as installed (no PYTHONPATH), the project's store by URI."""
    env = {k: v for k, v in served.stack.env.items() if k != "PYTHONPATH"}
    return dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{served.project / 'mlflow.db'}")


def test_readme_champion_snippet_works_from_another_directory(served, tmp_path):
    snippet = _readme_block("## Use the champion", "python")
    env = _user_env(served)
    out = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "champion version 1" in out.stdout
    for column in ("p_0", "p_2", "predicted", "score", "in_distribution"):
        assert column in out.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran (no stray mlflow.db)


def _post(url: str, body: bytes) -> tuple[int, str]:
    if shutil.which("curl"):
        out = subprocess.run(
            [
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
                url,
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ],
            input=body,
            capture_output=True,
            timeout=60,
        )
        text, _, code = out.stdout.decode().rpartition("\n")
        return int(code), text
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serve_model_answers_invocations_with_named_columns(served, tmp_path):
    import json
    import urllib.request

    port = free_port()
    env = _user_env(served)
    env["PATH"] = "/usr/bin:/bin"  # no virtualenv on PATH: the command must find uvicorn itself
    log = tmp_path / "serve-model.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "oodgate_mlflow.champion",
                "serve",
                "--port",
                str(port),
                "--max-request-mb",
                "0.05",
            ],
            cwd=tmp_path,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    from stack import stop_process

    try:

        def answers() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_until(answers, 120)
        except TimeoutError:
            pytest.fail(f"mlflow models serve never answered /ping\n{log.read_text()[-3000:]}")
        assert "Serving oodgate-classifier version 1 (champion, loss isomax_plus)" in log.read_text()
        url = f"http://127.0.0.1:{port}/invocations"
        code, text = _post(url, json.dumps({"inputs": [[[[0.0] * 28] * 28]] * 2}).encode())
        assert code == 200, text
        rows = json.loads(text)["predictions"]
        assert len(rows) == 2
        assert set(rows[0]) == {"p_0", "p_1", "p_2", "predicted", "score", "in_distribution"}
        assert abs(sum(rows[0][f"p_{c}"] for c in "012") - 1) < 1e-5
        # JSON integers are pixel values 0-255 (uint8), as the README says; they were refused above 1
        code, text = _post(url, json.dumps({"inputs": [[[[255] * 28] * 28]]}).encode())
        assert code == 200, text
        code, as_float = _post(url, json.dumps({"inputs": [[[[1.0] * 28] * 28]]}).encode())
        assert json.loads(text) == json.loads(as_float)
        code, text = _post(url, json.dumps({"inputs": [[[[256] * 28] * 28]]}).encode())
        assert code == 400
        assert "got integers in [256, 256], outside the pixel values 0-255" in json.loads(text)["message"]
        code, text = _post(url, json.dumps({"inputs": [[[0.0] * 28] * 28]}).encode())
        assert code == 400
        message = json.loads(text)["message"]
        assert "expected images of shape (batch, 1, 28, 28)" in message and "got shape (1, 28, 28)" in message
        assert len(message) < 200, message
        code, text = _post(url, json.dumps({"inputs": [[[["x"] * 28] * 28]]}).encode())
        assert code == 400 and "got dtype" in json.loads(text)["message"]
        # a request over the limit (0.05 MB here) is refused before it is parsed, announced or streamed
        big = json.dumps({"inputs": [[[[0.5] * 28] * 28]] * 40}).encode()
        code, text = _post(url, big)
        assert code == 413 and "exceeds the limit of 52428 bytes" in json.loads(text)["message"], text
        assert _post_chunked(port, big)[0] == 413
        # the port is taken: a second server refuses at once, before loading anything
        again = subprocess.run(
            [sys.executable, "-m", "oodgate_mlflow.champion", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 2
        assert f"error: port {port} on 127.0.0.1 cannot be served on (Address already in use)" in again.stderr
    finally:
        stop_process(proc, timeout=20)


def _post_chunked(port: int, body: bytes) -> tuple[int, str]:
    """A request without Content-Length (Transfer-Encoding: chunked)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/invocations",
        body=iter([body[i : i + 8192] for i in range(0, len(body), 8192)]),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    r = conn.getresponse()
    return r.status, r.read().decode()
