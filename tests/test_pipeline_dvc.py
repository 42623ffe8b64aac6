"""The real entry point, end to end: `dvc repro` on a tiny demo in a temporary repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from support.common import venv_bin
from support.projects import kill_during, make_project, sh, stages_ran

from devtools.scratch import TINY_CONFIG, project_env

pytestmark = pytest.mark.slow

PER_TASK = ("generators", "replay", "novelty", "finetune", "evaluate")
TASKS = (1, 2)
ALL_STAGES = {"prepare", "split", "backbone", "embed@train", "embed@test", "embed-text@all", "prompts-init", "replay-init", "report"} | {
    f"{step}@{task:02d}" for step in PER_TASK for task in TASKS
}


# The commands of a scratch project: its own code, the venv's programs.






@pytest.fixture
def repo(tmp_path) -> Path:
    """The project shrunk to a tiny world, under git + DVC."""
    return make_project(tmp_path / "repo", TINY_CONFIG)




def test_dvc_repro_runs_the_demo_then_nothing(repo, mlflow_server, monkeypatch):
    # Tracked on a real MLflow server: every step process finds it through the environment.
    server_uri, server_artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    first = sh(repo, "dvc", "repro")
    assert stages_ran(first.stdout) == ALL_STAGES
    assert "per-step accuracy" in first.stdout
    for path in ("data/prepared/classes.json", "data/split.json", "models/backbone/weights.safetensors",
                 "data/embeddings/train/index.json", "data/embeddings/test/index.json",
                 "data/embeddings/text.safetensors", "metrics/backbone.json", "metrics/report.json",
                 "plots/accuracy_matrix.png", "models/generators/task-02.safetensors"):
        assert (repo / path).exists(), path
    assert json.loads((repo / "data/embeddings/train/index.json").read_text())["n_samples"] == 54
    metrics = json.loads((repo / "metrics/backbone.json").read_text())
    assert {"zeroshot_acc_pretrain_pairs", "zeroshot_acc_heldout_pairs", "chance"} <= set(metrics)

    second = sh(repo, "dvc", "repro")
    assert stages_ran(second.stdout) == set()
    assert "up to date" in sh(repo, "dvc", "status").stdout

    shown = sh(repo, "dvc", "metrics", "show", "--json").stdout
    assert "zeroshot_acc_heldout_pairs" in shown and "average_incremental_accuracy" in shown

    # A prompt parameter re-runs the prompt steps only: no embedding, no generator. Task 2's
    # arrival check follows task 1's evaluation (another champion); task 1's has none to ask,
    # and the untrained initial state it follows is byte for byte the same.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["method"]["prompt"]["lr"] = 0.01
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = sh(repo, "dvc", "repro")
    assert stages_ran(changed.stdout) == {"prompts-init", "novelty@02", "report"} | {
        f"{step}@{task:02d}" for step in ("finetune", "evaluate") for task in TASKS
    }
    # A generator parameter re-runs generators and what follows, but no embedding.
    params["generator"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = sh(repo, "dvc", "repro")
    assert not any(s.startswith("embed") or s in ("prepare", "backbone") for s in stages_ran(changed.stdout))
    assert "generators@01" in stages_ran(changed.stdout)

    # A new seed changes the class order: the split re-runs, no embedding stage does.
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "lock")
    # Typed as the README writes it, by a user who did not activate the venv: the stages'
    # `recall` is found all the same.
    bare = {**project_env(repo), "PATH": os.defpath}
    exp = subprocess.run([str(venv_bin() / "dvc"), "exp", "run", "-S", "seed=1"], cwd=repo, env=bare,
                         capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, f"{exp.stdout}\n{exp.stderr}"
    # ... and so does everything per task (the tasks now hold other classes).
    assert stages_ran(exp.stdout) == {"split", "prompts-init", "report"} | {
        f"{step}@{task:02d}" for step in PER_TASK for task in TASKS
    }
    assert json.loads((repo / "data/split.json").read_text())["seed"] == 1
    # And the run appears in MLflow under the experiment's own pipeline run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server_uri)
    assert not (repo / "mlflow.db").exists()  # nothing went to the local default store
    experiment = client.get_experiment_by_name("recall-shapes-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    pipelines = [r for r in runs if r.data.tags.get("recall.role") == "pipeline"]
    keys = {r.data.tags["recall.pipeline_key"] for r in pipelines}
    assert any(k.startswith("dvc-exp:") for k in keys) and any(k.startswith("config:") for k in keys)
    # The first repro: one parent, one child per stage execution, named by task.
    first_parent = next(r for r in pipelines if r.data.tags["recall.pipeline_key"].startswith("config:")
                        and r.info.start_time == min(p.info.start_time for p in pipelines))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id]
    names = {r.info.run_name for r in children}
    assert {"prepare", "backbone", "embed-train", "report"} | {f"task-{t:02d}/{s}" for s in PER_TASK for t in TASKS} <= names
    assert all(r.info.status == "FINISHED" for r in children)
    evaluate = next(r for r in children if r.info.run_name == "task-02/evaluate")
    history = client.get_metric_history(evaluate.info.run_id, "accuracy_task_01")
    assert [m.step for m in history] == [2]
    # The pipeline run holds each per-task metric as one curve over the tasks.
    curve = client.get_metric_history(first_parent.info.run_id, "step_accuracy")
    assert sorted(m.step for m in curve) == [1, 2]
    assert evaluate.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(evaluate.info.run_id, "plots")} == {"plots/reliability.png"}
    report = next(r for r in children if r.info.run_name == "report")
    assert "plots/accuracy_matrix.png" in {a.path for a in client.list_artifacts(report.info.run_id, "plots")}
    assert any(server_artifacts.rglob("accuracy_matrix.png"))  # in the server's artifact store
    # Registered versions: every task's classifier carries its task alias; the champion is one of them.
    from pipeline import config
    from pipeline.tracking.registry import model_name

    monkeypatch.chdir(repo)
    name = model_name(config.load(repo / "params.yaml"), "classifier")
    assert name.startswith("recall-shapes-tiny-clap-s1-")
    classifier = client.get_registered_model(name)
    assert {"task-1", "task-2", "champion"} <= set(classifier.aliases)
    versions = client.search_model_versions(f"name = '{name}'")
    assert {v.tags["gate"] for v in versions} <= {"passed", "rejected"} and len(versions) == 2
    # One model per lineage: the first params, two changed parameters, another seed.
    lineages = [m for m in client.search_registered_models() if m.name.endswith("-classifier")]
    assert len(lineages) == 4 and all({"task-1", "task-2", "champion"} <= set(m.aliases) for m in lineages)
    # The same experiment again registers nothing and moves no alias.
    sh(repo, "dvc", "exp", "run", "-S", "seed=1")
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert client.get_registered_model(name).aliases == classifier.aliases




def test_interrupted_run_resumes_at_the_interrupted_task(repo):
    """Kill `dvc repro` while task 2 is being finetuned; the rerun starts there."""
    kill_during(repo, ["dvc", "repro"], "finetune@02")
    rerun = sh(repo, "dvc", "repro")
    ran = [line.split("'")[1] for line in rerun.stdout.splitlines() if line.startswith("Running stage '")]
    assert ran[0] == "finetune@02", ran
    assert not {"finetune@01", "generators@01", "replay@01", "generators@02", "embed@train", "backbone"} & set(ran)
    assert (repo / "metrics/report.json").exists()


def test_killed_step_leaves_nothing_a_rerun_would_trust(repo):
    sh(repo, "recall", "prepare")
    before = (repo / "data/prepared/classes.json").read_text()
    # A much larger world takes long enough to be killed half-way through.
    process = subprocess.Popen(
        ["recall", "prepare", "dataset.shapes.train_per_class=3000"],
        cwd=repo, env=project_env(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((repo / "data").glob(".prepared.*.tmp/images/train")):
        time.sleep(0.2)
    time.sleep(1.0)
    assert process.poll() is None, "the step finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (repo / "data/prepared/classes.json").read_text() == before
    # A rerun replaces the leftovers and finishes.
    sh(repo, "recall", "prepare")
    assert not list((repo / "data").glob(".prepared*"))
