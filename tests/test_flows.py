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
from support.common import REPO
from support.flows import DVC, tiny_project

from flows import bucket_events, reporting
from flows import stages as dvc_stages
from flows.stages import Pipeline, StageBadInput, StageSetupError, StageTransientError


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


# The project's shape, small: per-split embeddings, chained per-task stages, a report.
SHAPE = Pipeline(
    ("prepare", "embed@train", "embed@test", "generators@01", "generators@02", "replay-init", "replay@01",
     "replay@02", "novelty@01", "finetune@01", "evaluate@01", "novelty@02", "finetune@02", "evaluate@02", "report"),
    {"embed@train": frozenset({"prepare"}), "embed@test": frozenset({"prepare"}),
     "generators@01": frozenset({"embed@train"}), "generators@02": frozenset({"embed@train"}),
     "replay@01": frozenset({"generators@01", "replay-init"}), "replay@02": frozenset({"generators@02", "replay@01"}),
     "novelty@01": frozenset({"embed@test"}), "finetune@01": frozenset({"replay@01"}),
     "evaluate@01": frozenset({"finetune@01", "novelty@01"}), "novelty@02": frozenset({"evaluate@01"}),
     "finetune@02": frozenset({"finetune@01", "replay@02"}), "evaluate@02": frozenset({"finetune@02", "novelty@02"}),
     "report": frozenset({"evaluate@01", "evaluate@02"})},
)
TASK_01 = ("generators@01", "replay@01", "novelty@01", "finetune@01", "evaluate@01")
TASK_02 = ("generators@02", "replay@02", "novelty@02", "finetune@02", "evaluate@02")


def test_units_put_each_tasks_chain_back_to_back_after_what_it_needs():
    assert SHAPE.tasks() == {"01", "02"}  # train and test key one family each: not tasks
    units = SHAPE.units(list(SHAPE.stages))
    assert units == [("prepare",), ("replay-init",), ("embed@train",), ("embed@test",), TASK_01, TASK_02, ("report",)]
    assert SHAPE.units(SHAPE.plan(["replay@02"])) == [("replay@02", "finetune@02", "evaluate@02"), ("report",)]
    # A stage outside task 01 between two of its stages: no order keeps the task together.
    between = Pipeline(("a@01", "check", "b@01"), {"check": frozenset({"a@01"}), "b@01": frozenset({"check"})})
    assert between.units(list(between.stages)) == [("a@01",), ("check",), ("b@01",)]


def test_units_order_every_stage_of_the_project_after_its_upstream():
    pipeline = dvc_stages.discover(REPO)
    units = pipeline.units(list(pipeline.stages))
    order = [stage for unit in units for stage in unit]
    assert sorted(order) == sorted(pipeline.stages)
    position = {stage: i for i, stage in enumerate(order)}
    for stage, upstream in pipeline.upstream.items():
        assert all(position[u] < position[stage] for u in upstream), stage
    for key in pipeline.tasks():
        [unit] = [u for u in units if any(dvc_stages.task_key(s) == key for s in u)]
        assert {dvc_stages.family(s) for s in unit} >= {"finetune", "evaluate"}, unit


def test_dispatches_send_each_tasks_chain_as_one_flow_run_and_never_two_tasks_in_one():
    from flows.recall_flows import dispatches

    units = SHAPE.units(list(SHAPE.stages))
    gpu, cpu = "recall-step/gpu", "recall-step/cpu"
    # The embeddings before task 01 go with it: consecutive stages bound for the same deployment.
    assert dispatches(units, SHAPE.tasks(), "gpu-deployment") == [
        (None, ["prepare"]), (None, ["replay-init"]), (gpu, ["embed@train", "embed@test", *TASK_01]),
        (gpu, list(TASK_02)), (None, ["report"])]
    assert dispatches(units, SHAPE.tasks(), "deployments") == [
        (cpu, ["prepare", "replay-init"]), (gpu, ["embed@train", "embed@test", *TASK_01]), (gpu, list(TASK_02)),
        (cpu, ["report"])]
    assert all(deployment is None for deployment, _ in dispatches(units, SHAPE.tasks(), "inline"))
    # A task without GPU work (only its evaluation is out of date) stays in the flow run.
    assert dispatches(SHAPE.units(["evaluate@02", "report"]), SHAPE.tasks(), "gpu-deployment") == [
        (None, ["evaluate@02"]), (None, ["report"])]


def test_gpu_work_goes_to_the_kubernetes_step_deployment_when_the_environment_names_it(monkeypatch):
    from flows.recall_flows import GPU_STEP_DEPLOYMENT_ENV, dispatches, route

    monkeypatch.setenv(GPU_STEP_DEPLOYMENT_ENV, "recall-step/gpu-k8s")
    assert route("finetune@01", "gpu-deployment") == "recall-step/gpu-k8s"
    assert route("report", "deployments") == "recall-step/cpu"
    units = SHAPE.units(list(SHAPE.stages))
    assert ("recall-step/gpu-k8s", list(TASK_02)) in dispatches(units, SHAPE.tasks(), "gpu-deployment")
    monkeypatch.delenv(GPU_STEP_DEPLOYMENT_ENV)
    assert route("finetune@01", "gpu-deployment") == "recall-step/gpu"


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


# Two tasks of three stages (generators and finetune are GPU families; score is not), chained
# through finetune; stage processes append their name to ran.txt.
CHAIN_TOY = """
stages:
  source:
    cmd: python -c "open('ran.txt', 'a').write('source '); open('src.txt', 'w').write('s')"
    outs: [src.txt]
  generators:
    foreach: ["01", "02"]
    do:
      cmd: python -c "open('ran.txt', 'a').write('generators@${item} '); open('g${item}.txt', 'w').write('g')"
      deps: [src.txt]
      outs:
        - g${item}.txt
  finetune:
    foreach:
      "01": {previous: src.txt}
      "02": {previous: f01.txt}
    do:
      cmd: python -c "open('ran.txt', 'a').write('finetune@${key} '); open('f${key}.txt', 'w').write('f')"
      deps:
        - g${key}.txt
        - "${item.previous}"
      outs:
        - f${key}.txt
  score:
    foreach: ["01", "02"]
    do:
      cmd: >-
        python -c "import os; open('ran.txt', 'a').write('score@${item} ');
        os.path.exists('crash-${item}') and exit(1); open('s${item}.txt', 'w').write('s')"
      deps:
        - f${item}.txt
      outs:
        - s${item}.txt
  report:
    cmd: python -c "open('ran.txt', 'a').write('report '); open('report.txt', 'w').write('r')"
    deps: [s01.txt, s02.txt]
    outs: [report.txt]
"""


@pytest.fixture
def dispatched(tmp_path, monkeypatch):
    """A toy project of two task chains, and what its flow runs dispatch: run_deployment
    replaced by the step flow run as a sub-flow run here (what a worker of the deployment
    would run), the ``gpu`` slot's takes and gives recorded between the stages that ran."""
    import contextlib

    import prefect.deployments
    from prefect.client.orchestration import get_client

    from flows import recall_flows

    toy = _toy_repo(tmp_path / "chains", CHAIN_TOY)
    (toy / "params.yaml").write_text("seed: 0\n")
    record = {"dispatched": [], "events": [], "children": []}

    def run_deployment(name, parameters, flow_run_name, poll_interval):
        record["dispatched"].append((name, list(parameters["stages"])))
        state = recall_flows.recall_step(**parameters, return_state=True)
        with get_client(sync_client=True) as client:
            child = client.read_flow_run(state.state_details.flow_run_id)
        record["children"].append(child)
        return child

    @contextlib.contextmanager
    def concurrency(name, occupy, lease_duration):
        record["events"].append(f"take {name}")
        try:
            yield
        finally:
            record["events"].append(f"give {name}")

    run_stage = dvc_stages.run_stage

    def recorded_run_stage(project_dir, stage, env):
        record["events"].append(stage)
        return run_stage(project_dir, stage, env)

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(recall_flows, "concurrency", concurrency)
    monkeypatch.setattr(dvc_stages, "run_stage", recorded_run_stage)
    monkeypatch.setattr(recall_flows, "recall_command", lambda args, project_dir: None)  # compose-params
    monkeypatch.setattr(recall_flows, "dvc_stage", recall_flows.dvc_stage.with_options(retry_delay_seconds=0))
    return toy, record


def _task_runs(flow_run_id, expected: int):
    """The task runs of a flow run, once ``expected`` of them reached the server in a final
    state (task-run states arrive as events)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) >= expected and all(r.state and r.state.is_final() for r in runs):
                return runs
            assert time.monotonic() < deadline, [(r.name, r.state) for r in runs]
            time.sleep(0.5)


# One Prefect server for the class: its tests stay on one xdist worker.
@pytest.mark.xdist_group("prefect-harness")
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

    def test_each_task_goes_to_the_gpu_deployment_as_one_flow_run_holding_the_slot_once(self, dispatched):
        from flows import recall_flows

        toy, record = dispatched
        state = recall_flows.recall_benchmark(project_dir=str(toy), routing="gpu-deployment", return_state=True)
        assert state.is_completed(), state.message
        task_01, task_02 = ["generators@01", "finetune@01", "score@01"], ["generators@02", "finetune@02", "score@02"]
        assert record["dispatched"] == [("recall-step/gpu", task_01), ("recall-step/gpu", task_02)]
        # The slot: taken once per task, held across its chain (its CPU stage too), given back.
        assert record["events"] == ["source", "take gpu", *task_01, "give gpu", "take gpu", *task_02, "give gpu",
                                    "report"]
        assert (toy / "ran.txt").read_text().split() == ["source", *task_01, *task_02, "report"]
        parent = str(state.state_details.flow_run_id)
        for child, stages in zip(record["children"], (task_01, task_02)):
            # Named for what it runs and the pipeline run it belongs to; one task run per stage.
            assert child.name == f"{', '.join(stages)} for {parent[:8]}"
            assert child.parameters["pipeline_run"] == parent and child.state.is_completed()
            runs = _task_runs(child.id, len(stages))
            assert sorted(r.name for r in runs) == sorted(stages)
            assert all(r.state.is_completed() for r in runs)
        dispatches = [r.name for r in _task_runs(parent, 4) if r.name.endswith(" on recall-step/gpu")]
        assert sorted(dispatches) == sorted(f"{', '.join(s)} on recall-step/gpu" for s in (task_01, task_02))

    def test_a_failed_stage_inside_a_tasks_flow_run_is_retried_then_fails_the_pipeline(self, dispatched):
        from flows import recall_flows

        toy, record = dispatched
        (toy / "crash-01").write_text("")
        state = recall_flows.recall_benchmark(project_dir=str(toy), routing="gpu-deployment", return_state=True)
        assert state.is_failed()
        assert "score@01" in state.message and "recall-step/gpu" in state.message, state.message
        # Three attempts of the crashing stage, inside task 01's flow run, then nothing more:
        # task 02 and the report never start; the slot is given back.
        assert (toy / "ran.txt").read_text().split() == [
            "source", "generators@01", "finetune@01", "score@01", "score@01", "score@01"]
        assert record["dispatched"] == [("recall-step/gpu", ["generators@01", "finetune@01", "score@01"])]
        assert record["events"][-2:] == ["score@01", "give gpu"]
        [child] = record["children"]
        assert child.state.is_failed()
        runs = {r.name: r for r in _task_runs(child.id, 3)}
        assert runs["score@01"].state.is_failed() and runs["score@01"].run_count == 3
        assert runs["finetune@01"].state.is_completed()
        # Once the cause is gone, a re-run resumes at the failed stage: DVC skips the rest.
        (toy / "crash-01").unlink()
        (toy / "ran.txt").unlink()
        record["events"].clear()
        state = recall_flows.recall_benchmark(project_dir=str(toy), routing="gpu-deployment", return_state=True)
        assert state.is_completed(), state.message
        ran = (toy / "ran.txt").read_text().split()
        assert sorted(ran[:-1]) == ["finetune@02", "generators@02", "score@01", "score@02"] and ran[-1] == "report"

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
        from support.stream import write_batch_with_a_one_image_class

        from flows import recall_flows

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


def test_workers_of_both_stacks_poll_every_few_seconds_unless_told_otherwise(tmp_path, monkeypatch):
    """Each task sent to a step deployment waits for a worker's poll: make prefect's and the
    team stack's workers poll every WORKER_POLL_SECONDS, not Prefect's 10 s."""
    from flows.local import WORKER_POLL_SECONDS, stack_env

    monkeypatch.delenv("PREFECT_WORKER_QUERY_SECONDS", raising=False)
    env = stack_env(tmp_path / "home", "http://127.0.0.1:1/api", tmp_path)
    assert float(env["PREFECT_WORKER_QUERY_SECONDS"]) == WORKER_POLL_SECONDS < 10
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "7")
    assert stack_env(tmp_path / "home", "http://127.0.0.1:1/api", tmp_path)["PREFECT_WORKER_QUERY_SECONDS"] == "7"
    compose = yaml.safe_load((REPO / "infra/compose.yaml").read_text())
    for worker in ("worker-cpu", "worker-gpu"):
        assert float(compose["services"][worker]["environment"]["PREFECT_WORKER_QUERY_SECONDS"]) == WORKER_POLL_SECONDS


# ------------------------------------------------------------------ end to end




def _notify_ready_batch(repo: Path, env: dict, log_dir: Path, api_url: str, timeout: float = 60) -> list:
    """POST a MinIO-style notification of ``incoming/batch-07/_READY`` to a running
    flows.bucket_events; return the recall-update/scheduled flow runs that appear."""
    import urllib.request

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from devtools.servers import free_port, stop

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
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from devtools.servers import prefect_server, stop
    from flows.local import POOLS, configure, stack_env, start_worker

    started = time.monotonic()
    repo = tiny_project(tmp_path / "repo")
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
                    # evaluate@01 runs in task 01's flow run of recall-step/gpu: its artifacts are there.
                    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[run.id, *(child.id for child in children)])))
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

    pipeline = dvc_stages.discover(repo)
    gpu_stages = {s for s in pipeline.stages if dvc_stages.pool_for(s) == "gpu"}
    assert {"embed@train", "embed@test", "generators@01", "finetune@01"} <= gpu_stages
    # One flow run for task 01: its whole chain (the embeddings before it ride along), not one per stage.
    ran_on_gpu = [child.parameters["stages"] for child in children]
    assert pipeline.tasks() == {"01"} and len(ran_on_gpu) == 1, ran_on_gpu
    task_01 = {s for s in pipeline.stages if dvc_stages.task_key(s) == "01"}
    assert gpu_stages | task_01 == set(ran_on_gpu[0]), ran_on_gpu
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
