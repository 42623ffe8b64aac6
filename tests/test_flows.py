"""Prefect flows over the DVC stages: discovery, planning, routing, failure classification,
artifacts; and one end-to-end run of recall-benchmark/on-demand on a real Prefect server."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, venv_bin
from flows import bucket_events, reporting
from flows import stages as dvc_stages
from flows.stages import Pipeline, StageBadInput, StageSetupError, StageTransientError

DVC = str(venv_bin() / "dvc")


def _toy_repo(root: Path, dvc_yaml: str) -> Path:
    """A DVC project without git whose stages are small Python commands."""
    root.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([DVC, "init", "-q", "--no-scm"], cwd=root, env=env, check=True)
    (root / "dvc.yaml").write_text(dvc_yaml)
    return root


TOY = """
stages:
  source:
    cmd: python -c "open('a.txt', 'w').write('a')"
    outs: [a.txt]
  embed:
    foreach: [train, test]
    do:
      cmd: python -c "import os; open('e-${item}.txt', 'w').write(os.environ.get('RECALL_PIPELINE_RUN', '-'))"
      deps: [a.txt]
      outs:
        - e-${item}.txt
  summary:
    cmd: python -c "open('s.txt', 'w').write('s')"
    deps: [e-train.txt, e-test.txt]
    outs: [s.txt]
  refuses:
    cmd: >-
      python -c "import sys; open('refusals', 'a').write('x');
      print('error: dataset.root=/nowhere: no such folder', file=sys.stderr); sys.exit(2)"
    outs: [r.txt]
  crashes:
    cmd: python -c "open('attempts', 'a').write('x'); raise ConnectionError('MLflow unreachable')"
    outs: [c.txt]
"""


@pytest.fixture
def toy(tmp_path) -> Path:
    return _toy_repo(tmp_path / "toy", TOY)


# ------------------------------------------------------------------ discovery and planning


def test_discovery_reads_the_stages_from_dvc_dependencies_first(toy):
    pipeline = dvc_stages.discover(toy)
    assert set(pipeline.stages) == {"source", "embed@train", "embed@test", "summary", "refuses", "crashes"}
    position = {stage: i for i, stage in enumerate(pipeline.stages)}
    assert position["source"] < position["embed@train"] < position["summary"]
    assert position["embed@test"] < position["summary"]
    assert pipeline.upstream["summary"] == {"embed@train", "embed@test"}


def test_discovery_of_the_project_itself_orders_every_stage_after_its_upstream():
    pipeline = dvc_stages.discover(REPO)
    position = {stage: i for i, stage in enumerate(pipeline.stages)}
    assert {"prepare", "report"} <= set(pipeline.stages)
    assert any(dvc_stages.family(s) == "evaluate" for s in pipeline.stages)
    for stage, upstream in pipeline.upstream.items():
        assert all(position[u] < position[stage] for u in upstream), stage


def test_plan_runs_the_changed_stages_and_everything_downstream_in_order():
    pipeline = Pipeline(
        ("prepare", "embed@train", "embed@test", "finetune@01", "evaluate@01", "report"),
        {"embed@train": frozenset({"prepare"}), "embed@test": frozenset({"prepare"}),
         "finetune@01": frozenset({"embed@train"}), "evaluate@01": frozenset({"finetune@01", "embed@test"}),
         "report": frozenset({"evaluate@01"})},
    )
    assert pipeline.plan(["embed@test"]) == ["embed@test", "evaluate@01", "report"]
    assert pipeline.plan(["report", "prepare"]) == list(pipeline.stages)
    assert pipeline.plan([]) == []
    with pytest.raises(StageSetupError, match="intake@09"):
        pipeline.plan(["intake@09"])


def test_changed_stages_come_from_dvc_status(toy):
    assert {"source", "embed@train", "summary"} <= set(dvc_stages.changed_stages(toy))
    dvc_stages.run_stage(toy, "source", dvc_stages.stage_env(None))
    assert "source" not in dvc_stages.changed_stages(toy)


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize("stage, pool", [
    ("embed@train", "gpu"), ("embed@test", "gpu"), ("intake@03", "gpu"), ("generators@01", "gpu"),
    ("finetune@05", "gpu"), ("embed-text", "cpu"), ("prepare", "cpu"), ("evaluate@02", "cpu"),
    ("novelty@02", "cpu"), ("report", "cpu"), ("sub/dvc.yaml:finetune@01", "gpu"),
])
def test_gpu_families_go_to_the_gpu_pool(stage, pool):
    assert dvc_stages.pool_for(stage) == pool


def test_family_and_task_key():
    assert dvc_stages.family("evaluate@03") == "evaluate" and dvc_stages.task_key("evaluate@03") == "03"
    assert dvc_stages.family("embed-text") == "embed-text" and dvc_stages.task_key("embed-text") is None


def test_routing_modes():
    from flows.recall_flows import route

    assert route("finetune@01", "inline") is None
    assert route("finetune@01", "deployments") == "recall-step/gpu"
    assert route("report", "deployments") == "recall-step/cpu"
    assert route("finetune@01", "gpu-deployment") == "recall-step/gpu"
    assert route("report", "gpu-deployment") is None
    with pytest.raises(ValueError, match="routing 'gpu'"):
        route("report", "gpu")


def test_step_flow_takes_composed_params_and_rewrites_only_what_differs(tmp_path):
    from flows.recall_flows import _read_params, _use_params

    (tmp_path / "params.yaml").write_text("seed: 0\nsplit:\n  n_tasks: 2\n")
    before = (tmp_path / "params.yaml").stat().st_mtime_ns
    _use_params(str(tmp_path), {"seed": 0, "split": {"n_tasks": 2}})
    assert (tmp_path / "params.yaml").stat().st_mtime_ns == before
    _use_params(str(tmp_path), {"seed": 1, "split": {"n_tasks": 2}})
    assert _read_params(str(tmp_path)) == {"seed": 1, "split": {"n_tasks": 2}}


# ------------------------------------------------------------------ failures


def test_bad_input_is_not_retried_and_says_what_the_cli_said(toy):
    with pytest.raises(StageBadInput) as caught:
        dvc_stages.run_stage(toy, "refuses", dvc_stages.stage_env(None))
    assert "dataset.root=/nowhere: no such folder" in str(caught.value) and "'refuses'" in str(caught.value)
    assert not dvc_stages.is_retryable(caught.value)


def test_a_crash_is_transient_and_an_unknown_stage_is_a_setup_error(toy):
    with pytest.raises(StageTransientError, match="exited with 1") as crash:
        dvc_stages.run_stage(toy, "crashes", dvc_stages.stage_env(None))
    assert dvc_stages.is_retryable(crash.value)
    with pytest.raises(StageSetupError, match="nosuch") as unknown:
        dvc_stages.run_stage(toy, "nosuch", dvc_stages.stage_env(None))
    assert not dvc_stages.is_retryable(unknown.value)


def test_classification_of_dvc_messages():
    locked = dvc_stages.classify_failure("x", 255, "ERROR: Unable to acquire lock. Most likely another DVC process")
    assert isinstance(locked, StageTransientError)
    killed = dvc_stages.classify_failure("x", 255, "ERROR: failed to reproduce 'x': failed to run: recall x, exited with -9")
    assert isinstance(killed, StageTransientError)
    assert dvc_stages.is_retryable(RuntimeError("not a stage error"))


def test_stage_processes_get_the_pipeline_run_key(toy):
    env = dvc_stages.stage_env("flow-run-1234")
    dvc_stages.run_stage(toy, "source", env)
    dvc_stages.run_stage(toy, "embed@train", env)
    assert (toy / "e-train.txt").read_text() == "flow-run-1234"
    # Up to date now: DVC skips it.
    assert "didn't change" in dvc_stages.run_stage(toy, "embed@train", dvc_stages.stage_env("other"))


@pytest.fixture(scope="class")
def prefect_harness():
    """One temporary Prefect server for the flow runs of a test class (it takes seconds to
    start), stopped at the class's end so that it does not compete with the slow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


UPDATE_TOY = """
stages:
  task:
    foreach: ["01", "02"]
    do:
      cmd: python -c "import os; open('t${item}.out', 'w').write(os.environ['RECALL_PIPELINE_RUN'])"
      deps:
        - t${item}.in
      outs:
        - t${item}.out
  report:
    cmd: python -c "open('report.out', 'a').write('r')"
    deps: [t01.out, t02.out]
    outs:
      - report.out:
          persist: true
"""


@pytest.mark.usefixtures("prefect_harness")
class TestFlowRuns:
    def test_step_flow_retries_a_crash_but_not_bad_input(self, toy, monkeypatch):
        """The retry policy as Prefect applies it: 3 attempts of a crashing stage, 1 of a refusing one."""
        from flows import recall_flows

        monkeypatch.setattr(recall_flows, "dvc_stage", recall_flows.dvc_stage.with_options(retry_delay_seconds=0))
        state = recall_flows.recall_step(["crashes"], project_dir=str(toy), return_state=True)
        assert state.is_failed()
        assert (toy / "attempts").read_text() == "xxx"
        state = recall_flows.recall_step(["refuses"], project_dir=str(toy), return_state=True)
        assert state.is_failed() and "no such folder" in state.message
        assert (toy / "refusals").read_text() == "x"

    def test_update_flow_runs_only_what_the_ingest_made_out_of_date(self, tmp_path, monkeypatch):
        from flows import recall_flows

        toy = _toy_repo(tmp_path / "update", UPDATE_TOY)
        for key in ("01", "02"):
            (toy / f"t{key}.in").write_text("batch")
        subprocess.run([DVC, "repro", "-q"], cwd=toy, check=True, env=dvc_stages.stage_env("before"))
        ingested = []

        def fake_ingest(args, project_dir):  # what `recall ingest` does to the DVC graph: new input
            ingested.append(args)
            (Path(project_dir) / "t02.in").write_text("a new batch")

        monkeypatch.setattr(recall_flows, "recall_command", fake_ingest)
        remote = tmp_path / "remote"
        subprocess.run([DVC, "remote", "add", "-d", "shared", str(remote)], cwd=toy, check=True)
        state = recall_flows.recall_update(project_dir=str(toy), routing="inline", return_state=True)
        assert state.is_completed(), state.message
        assert ingested == [["ingest"]]
        assert state.result() == ["task@02", "report"]
        # What it made went to the project's DVC remote, for the next machine.
        pushed = {p.read_text() for p in remote.rglob("*") if p.is_file() and "runs" not in p.parts}
        assert {str(state.state_details.flow_run_id), "rr"} <= pushed
        assert (toy / "t01.out").read_text() == "before"
        assert (toy / "t02.out").read_text() == str(state.state_details.flow_run_id)
        assert (toy / "report.out").read_text() == "rr"

    def test_update_flow_fails_at_once_on_a_rejected_batch_naming_the_class(self, project):
        """A batch with a one-image class: the flow run fails on its first try, its message
        says which batch and class; no stage runs. (A retry would pass: the rejection is
        already in the ledger; so the failure itself shows there was none.)"""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        from flows import recall_flows
        from test_stream import write_batch_with_a_one_image_class

        write_batch_with_a_one_image_class(project / "incoming")
        started = time.monotonic()
        state = recall_flows.recall_update(overrides=["dataset=stream", "dataset.source=incoming"],
                                           project_dir=str(project), routing="inline", return_state=True)
        assert state.is_failed(), state
        assert "batch 'batch-001' rejected: class 'lonely circle' has 1 training image(s)" in state.message
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        ingest = [run for run in task_runs if run.name == "recall ingest"]
        assert len(ingest) == 1 and ingest[0].run_count == 1, [(r.name, r.run_count) for r in task_runs]
        assert not [run for run in task_runs if run.name.startswith(("dvc-stage", "intake"))]
        # The first retry would have waited 10 s.
        assert time.monotonic() - started < 60

    def test_auto_routing_is_inline_without_step_deployments(self):
        from flows.recall_flows import _resolve_routing

        assert _resolve_routing("auto") == "inline"
        assert _resolve_routing("gpu-deployment") == "gpu-deployment"
        with pytest.raises(ValueError, match="routing 'everywhere'"):
            _resolve_routing("everywhere")


# ------------------------------------------------------------------ artifacts and events

EVALUATION = {
    "task": 2, "step_accuracy": 0.75, "accuracy_row": {"1": 0.7, "2": 0.8},
    "calibration": {"ece": 0.05, "bins": []}, "novelty": {"energy": {"auroc": 0.6}},
}


def test_metrics_table_lists_the_evaluation_and_the_registry():
    rows = {r["metric"]: r["value"] for r in reporting.metrics_table(
        {**EVALUATION, "registry": {"model": "m", "version": "3", "promoted": True, "reasons": []}})}
    assert rows["step_accuracy"] == 0.75 and rows["calibration.ece"] == 0.05
    assert rows["accuracy_row.task_01"] == 0.7 and rows["novelty.energy.auroc"] == 0.6
    assert rows["registry.version"] == "3" and rows["registry.promoted"] is True


def test_gate_decision_from_the_evaluate_runs_tags_and_its_markdown():
    class Run:
        class data:
            tags = {"recall.registered.recall-x-classifier": "4", "recall.gate": "rejected",
                    "recall.gate_reasons": "accuracy on task 1 fell 0.09 > 0.05 | ok"}

    decision = reporting.gate_decision(EVALUATION, Run)
    assert decision == {"model": "recall-x-classifier", "version": "4", "promoted": False,
                        "reasons": ["accuracy on task 1 fell 0.09 > 0.05", "ok"]}
    links = reporting._ui_links("http://mlflow:5000", "7", {"evaluate run": "abc"}, decision)
    text = reporting.gate_markdown("02", EVALUATION, decision, links)
    assert "not promoted" in text and "fell 0.09" in text
    assert "http://mlflow:5000/#/experiments/7/runs/abc" in text
    assert "http://mlflow:5000/#/models/recall-x-classifier/versions/4" in text
    assert reporting.gate_decision(EVALUATION, None) is None


def test_bucket_notification_becomes_ready_batches():
    notification = {"Records": [
        {"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "incoming/batch-03/_READY"}}},
        {"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "incoming/batch-03/red/1.png"}}},
        {"eventName": "s3:ObjectRemoved:Delete", "s3": {"bucket": {"name": "b"}, "object": {"key": "incoming/batch-04/_READY"}}},
        {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "batch+5/_READY"}}},
    ]}
    assert bucket_events.ready_batches(notification) == [
        {"bucket": "b", "prefix": "incoming", "batch": "batch-03", "source": "s3://b/incoming"},
        {"bucket": "b", "prefix": "", "batch": "batch 5", "source": "s3://b"},
    ]
    assert bucket_events.ready_batches({}) == []


def test_prefect_yaml_deployments_match_the_flows():
    from flows import recall_flows

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    flows_by_entry = {"recall_update": recall_flows.recall_update, "recall_benchmark": recall_flows.recall_benchmark,
                      "recall_step": recall_flows.recall_step}
    expected = {"scheduled": ("recall_update", "cpu"), "on-demand": ("recall_benchmark", "cpu"),
                "cpu": ("recall_step", "cpu"), "gpu": ("recall_step", "gpu")}
    assert set(deployments) == set(expected)
    for name, (function, pool) in expected.items():
        deployment = deployments[name]
        path, _, attribute = deployment["entrypoint"].partition(":")
        assert (REPO / path).exists() and attribute == function
        assert deployment["work_pool"]["name"] == pool
        assert "MLFLOW_TRACKING_URI" in deployment["work_pool"]["job_variables"]["env"]
        accepted = set(inspect.signature(flows_by_entry[function].fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, name
        for trigger in deployment.get("triggers", []):
            assert set(trigger["parameters"]) <= accepted
    update = deployments["scheduled"]
    assert update["concurrency_limit"]["limit"] == 1 and update["schedules"][0]["cron"]
    assert update["triggers"][0]["expect"] == [bucket_events.EVENT_NAME]
    assert recall_flows.STEP_FLOW == "recall-step" and recall_flows.recall_step.name == "recall-step"


# ------------------------------------------------------------------ end to end


def _tiny_project(root: Path) -> Path:
    """The project (code, conf, dvc.yaml, prefect.yaml) shrunk to the tiny world, under git
    + DVC; params.yaml is the flow run's to compose."""
    from pipeline.devstack import TINY_CONFIG, merge_config, scratch_project

    config = json.loads(json.dumps(TINY_CONFIG))
    # One task: every kind of stage runs once (the per-task chain is test_pipeline_dvc's).
    merge_config(config, {"split": {"n_tasks": 1}})
    return scratch_project(root, config, folders=("pipeline", "conf", "flows"),
                           files=("dvc.yaml", "prefect.yaml", ".gitignore"))


def _notify_ready_batch(repo: Path, env: dict, log_dir: Path, api_url: str, timeout: float = 60) -> list:
    """POST a MinIO-style notification of ``incoming/batch-07/_READY`` to a running
    flows.bucket_events; return the recall-update/scheduled flow runs that appear."""
    import urllib.request

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.devstack import free_port, stop

    port = free_port()
    with open(log_dir / "bucket_events.log", "wb") as log_file:
        receiver = subprocess.Popen([sys.executable, "-m", "flows.bucket_events", "--port", str(port)], cwd=repo,
                                    env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    body = json.dumps({"EventName": "s3:ObjectCreated:Put", "Records": [{
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": "recall-bucket"}, "object": {"key": "incoming/batch-07/_READY"}}}]}).encode()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, method="POST")
                with urllib.request.urlopen(request, timeout=30) as response:
                    assert response.status == 204
                break
            except OSError:
                assert receiver.poll() is None and time.monotonic() < deadline, (log_dir / "bucket_events.log").read_text()
                time.sleep(0.5)
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            update = client.read_deployment_by_name("recall-update/scheduled")
            while True:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[update.id])))
                if runs or time.monotonic() > deadline:
                    return runs
                time.sleep(1)
    finally:
        stop(receiver)


@pytest.mark.slow
@pytest.mark.stack
def test_benchmark_deployment_runs_the_demo_with_gpu_stages_on_the_gpu_pool(tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local import POOLS, configure, stack_env, start_worker
    from pipeline.devstack import prefect_server, stop

    started = time.monotonic()
    repo = _tiny_project(tmp_path / "repo")
    home = tmp_path / "prefect"
    with prefect_server(home) as api_url:
        env = stack_env(home, api_url, repo, {
            # The stages and flows run this copy's code; one thread each on a small machine.
            "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            # Workers look for new flow runs every second instead of every 10.
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        })
        configure(repo, env)
        workers = [start_worker(pool, repo, env, tmp_path) for pool in POOLS]
        try:
            with temporary_settings({PREFECT_API_URL: api_url}):
                run = run_deployment("recall-benchmark/on-demand", parameters={"routing": "gpu-deployment"},
                                     timeout=840, poll_interval=2, as_subflow=False)
                with get_client(sync_client=True) as client:
                    gpu_deployment = client.read_deployment_by_name("recall-step/gpu")
                    children = client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])),
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[gpu_deployment.id])),
                    )
                    artifacts = client.read_artifacts(
                        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        finally:
            for worker in workers:
                stop(worker)
        logs = "\n".join((tmp_path / f"worker-{p}.log").read_text()[-3000:] for p in POOLS)
        assert run.state.is_completed(), f"{run.state}\n{logs}"
        # A bucket's notification of a ready batch, through the receiver, schedules an update
        # of that source (no worker runs it: they are stopped).
        update_runs = _notify_ready_batch(repo, env, tmp_path, api_url)
        assert [r.parameters for r in update_runs] == [{"source": "s3://recall-bucket/incoming",
                                                        "overrides": ["dataset=stream"]}]

    gpu_stages = {s for s in dvc_stages.discover(repo).stages if dvc_stages.pool_for(s) == "gpu"}
    assert {"embed@train", "embed@test", "generators@01", "finetune@01"} <= gpu_stages
    ran_on_gpu = [tuple(child.parameters["stages"]) for child in children]
    assert sorted(ran_on_gpu) == sorted((s,) for s in gpu_stages)
    assert all(child.state.is_completed() for child in children)
    assert all(child.parameters["pipeline_run"] == str(run.id) for child in children)

    status = subprocess.run([DVC, "status"], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert "up to date" in status.stdout, status.stdout + status.stderr

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=f"tags.`{reporting.FLOW_RUN_TAG}` = '{run.id}'")
    assert len(parents) == 1
    assert parents[0].data.tags["recall.pipeline_key"] == str(run.id)
    assert parents[0].data.tags["recall.role"] == "pipeline"
    steps = client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert {"task-01/finetune", "task-01/evaluate", "embed-train"} <= {r.info.run_name for r in steps}

    by_key = {a.key: a for a in artifacts}
    assert {"task-01-metrics", "task-01-gate"} <= set(by_key)
    table = by_key["task-01-metrics"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"step_accuracy", "calibration.ece", "accuracy_row.task_01"} <= {row["metric"] for row in rows}
    gate = by_key["task-01-gate"].data
    assert "promoted to champion" in gate and "evaluate run" in gate and "model version" in gate, gate
    print(f"end-to-end Prefect run: {time.monotonic() - started:.0f} s", file=sys.stderr)
