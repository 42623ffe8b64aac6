from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.stages.embed import run_embed
from pipeline.stages.split import run_split
from pipeline.tracking.lineage import experiment_name
from pipeline.tracking.runs import Tracker
from pipeline.tracking.server import tracking_uri


def _runs(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def test_steps_are_child_runs_of_one_pipeline_run(world):
    run_split(world)
    run_embed(world, "test")
    client = MlflowClient(tracking_uri(world))
    experiment = client.get_experiment_by_name(experiment_name(world))
    assert experiment.name == "recall-shapes-tiny"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("recall.role") == "pipeline"]
    children = {r.data.tags["recall.step"]: r for r in runs if r.data.tags.get("recall.role") == "step"}
    # The fixture's prepare and backbone steps ran with the same config and code.
    assert {"prepare", "backbone", "split", "embed-test"} <= set(children)
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in children.values())
    backbone = children["backbone"]
    assert backbone.data.metrics["zeroshot_acc_heldout_pairs"] >= 0
    assert backbone.data.params["backbone.arch"] == "recall-tiny"
    embed = children["embed-test"]
    assert embed.data.metrics["images_per_second"] > 0
    assert embed.data.tags["recall.config_hash"] == world.fingerprint()
    assert embed.info.status == "FINISHED" and embed.info.run_name == "embed-test"


def test_task_runs_are_named_by_task(world):
    with Tracker(world).step("finetune", task=3) as run:
        run.log_metric("accuracy", 0.5, step=3)
    client = MlflowClient(tracking_uri(world))
    found = [r for r in _runs(client) if r.data.tags.get("recall.step") == "finetune"]
    assert found[0].info.run_name == "task-03/finetune"
    assert found[0].data.tags["recall.task"] == "3"


def test_a_failing_step_is_marked_failed(world):
    with pytest.raises(RuntimeError):
        with Tracker(world).step("broken"):
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri(world))
    broken = [r for r in _runs(client) if r.data.tags.get("recall.step") == "broken"]
    assert broken[0].info.status == "FAILED"


def test_orchestrator_names_the_pipeline_run(world, monkeypatch):
    monkeypatch.setenv("RECALL_PIPELINE_RUN", "flow-run-42")
    run_split(world)
    run_split(world)
    client = MlflowClient(tracking_uri(world))
    parents = [r for r in _runs(client) if r.data.tags.get("recall.pipeline_key") == "flow-run-42"]
    assert len(parents) == 1
    children = [r for r in _runs(client) if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2


def test_tracking_uri_precedence(world, monkeypatch, tmp_path):
    assert tracking_uri(world).startswith("sqlite:///") and tracking_uri(world).endswith("/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert tracking_uri(world) == f"sqlite:///{tmp_path}/env.db"
    configured = world.model_copy(update={"tracking": world.tracking.model_copy(update={"uri": "http://127.0.0.1:9"})})
    assert tracking_uri(configured) == "http://127.0.0.1:9"
