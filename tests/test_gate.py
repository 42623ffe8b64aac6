"""The promotion gate on figures built from tensors, in a real (sqlite) MLflow registry: like
is compared with like, the new task has a floor, nothing missing passes unchecked, and
every move of the champion alias is recorded, shown by `recall champion` and undone by
`recall rollback`."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import GateConfig
from pipeline.method.metrics import evaluate_task
from pipeline.tracking import gate
from pipeline.tracking.registry import champion

NAMES = {0: "red circle", 1: "blue star", 2: "green square", 3: "yellow triangle"}
TASKS = [[0, 1], [2, 3]]
PER_CLASS = 10
DIGESTS = {"1": "digest-of-task-1", "2": "digest-of-task-2"}
MODEL = ""  # set per test by the client fixture

# The module-scoped fixture is built once: these tests stay on one xdist worker.
pytestmark = pytest.mark.xdist_group("gate-store")


def _logits(task: int, *, wrong_among_old: int = 1, taken_by_new: int = 0, new_right: int = PER_CLASS):
    """Labels and logits [N, C] over the classes of tasks 1..``task``, PER_CLASS images a
    class. Per old class: ``wrong_among_old`` images rank the other old class first among
    the old classes; the next ``taken_by_new`` are right among the old classes but a new
    class outranks them all. Per new class: ``new_right`` images are right."""
    classes = [c for t in TASKS[:task] for c in t]
    old = TASKS[0]
    labels, rows = [], []
    for c in classes:
        for i in range(PER_CLASS):
            row = torch.zeros(len(classes))
            if c in old:
                other = old[1 - old.index(c)]
                row[classes.index(other if i < wrong_among_old else c)] = 2.0
                if task > 1 and wrong_among_old <= i < wrong_among_old + taken_by_new:
                    row[classes.index(TASKS[1][0])] = 5.0
            else:
                row[classes.index(c if i < new_right else old[0])] = 2.0
            labels.append(c)
            rows.append(row)
    return torch.tensor(labels), torch.stack(rows)


# Zero-shot, unless a test says otherwise: the new task's images all go to an old class
# (a floor of 0%), and no old image goes to a new class.
UNTRAINED = {"new_right": 0, "taken_by_new": 0}


def _evidence(task: int, labels=None, logits=None, *, zero_shot=UNTRAINED, digests=None, **kind):
    """A candidate after ``task``; ``zero_shot``: zero-shot logits, or ``_logits``'s
    arguments for them, or None (not measured)."""
    if labels is None:
        labels, logits = _logits(task, **kind)
    if isinstance(zero_shot, dict):
        zero_shot = _logits(task, **zero_shot)[1]
    classes = [c for t in TASKS[:task] for c in t]
    # The full row as evaluate measures it (among every class the version knows).
    row = evaluate_task(task, TASKS[:task], labels, logits[None], None)["accuracy_row"]
    return gate.Evidence(task=task, class_ids=classes, names=NAMES, tasks=TASKS[:task], logits=logits, labels=labels,
                         accuracy_row=row, test_digests=digests or {k: DIGESTS[k] for k in map(str, range(1, task + 1))},
                         zero_shot_logits=zero_shot)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one takes seconds); a model per test."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    MlflowClient(uri).search_registered_models()
    return uri


@pytest.fixture
def client(store, request) -> MlflowClient:
    global MODEL
    MODEL = f"recall-{request.node.name.replace('[', '-').replace(']', '')}-classifier"
    client = MlflowClient(store)
    client.create_registered_model(MODEL)
    return client


def _register(client, evidence: gate.Evidence, **tags) -> str:
    """A version with the tags the pipeline gives it (its model files do not matter here)."""
    return str(client.create_model_version(MODEL, source="file:///nowhere", tags={
        "task": str(evidence.task), **evidence.version_tags(), **tags}).version)


RULES = GateConfig()


def _gate(client, evidence, rules=RULES, run_id="run-0"):
    version = _register(client, evidence)
    return gate.decide(client, MODEL, version, evidence, rules, run_id)


def _champion(client) -> str:
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


# --------------------------------------------------------------------------- like with like


def test_new_classes_alone_no_longer_reject_a_version(client):
    first = _gate(client, _evidence(1))
    assert first["promoted"] and first["champion_after"] == "1" and first["reasons"][0].startswith("no champion yet")
    # After task 2, three of task 1's ten images a class go to a new class (as many as
    # zero-shot sends there), though the version tells task 1's classes apart as well as
    # the champion does.
    second = _gate(client, _evidence(2, taken_by_new=3, zero_shot={"new_right": 0, "taken_by_new": 3}))
    figures = second["figures"]
    assert figures["champion_row"] == {"1": pytest.approx(0.9)}
    assert figures["accuracy_row"]["1"] == pytest.approx(0.6)  # the old rule: 30 points down, rejected
    assert figures["restricted_row"] == {"1": pytest.approx(0.9)}
    assert figures["taken_by_new_classes"] == figures["taken_by_new_classes_zero_shot"] == {"1": pytest.approx(0.3)}
    assert second["promoted"], second["reasons"]
    assert second["champion_before"] == "1" and second["champion_after"] == "2" == _champion(client)
    assert "among the champion's 2 classes" in second["reasons"][0]
    version = client.get_model_version(MODEL, "2")
    assert version.tags["gate"] == "passed" and json.loads(version.tags["gate_figures"])["restricted_row"]["1"] == pytest.approx(0.9)


def test_a_true_regression_among_the_champions_classes_is_still_rejected(client):
    _gate(client, _evidence(1))
    # Task 1's classes are now confused with each other: 7 of 10 wrong, whatever the new classes do.
    decision = _gate(client, _evidence(2, wrong_among_old=7))
    assert not decision["promoted"] and _champion(client) == "1"
    assert decision["figures"]["restricted_row"]["1"] == pytest.approx(0.3)
    assert decision["reasons"][0].startswith(
        "task 1: accuracy among the champion's 2 classes 30.0% is 60.0 points below the champion's 90.0% (allowed 10.0"
    )
    assert any(r.startswith("mean accuracy among the champion's 2 classes over tasks 1: 30.0%") for r in decision["reasons"])
    assert client.get_model_version(MODEL, "2").tags["gate"] == "rejected"


def test_a_version_that_sends_earlier_images_to_the_new_classes_is_rejected(client):
    """Forgetting as a bias towards the newest task (training without replay): right among
    the champion's classes, yet most of task 1's images are labelled as a new class."""
    _gate(client, _evidence(1))
    decision = _gate(client, _evidence(2, taken_by_new=8, zero_shot={"new_right": 0, "taken_by_new": 1}))
    assert not decision["promoted"] and _champion(client) == "1"
    assert decision["figures"]["restricted_row"]["1"] == pytest.approx(0.9)
    assert decision["reasons"] == [
        "task 1: 80.0% of its images go to the 2 class(es) the champion does not know, 70.0 points more than "
        "zero-shot sends there (10.0%; allowed 10.0)"
    ]


def test_each_task_within_bounds_but_the_mean_too_low_is_rejected():
    champion = gate.Champion("1", {"1": 0.95}, [NAMES[0], NAMES[1]], {"1": DIGESTS["1"]}, [])
    # 90% against 95%: within 10 points for the task, not within 3 for the mean.
    passed, reasons, figures = gate.gate_decision(_evidence(2), champion, 0.10, 0.03)
    assert not passed and figures["restricted_mean"] == pytest.approx(0.9)
    assert reasons == ["mean accuracy among the champion's 2 classes over tasks 1: 90.0% against the champion's "
                       "95.0% (allowed drop 3.0)"]
    assert gate.gate_decision(_evidence(2), champion, 0.10, 0.05)[0]


def test_the_champions_classes_and_test_images_must_be_the_candidates(client):
    _gate(client, _evidence(2))
    # Task 1 alone, after the champion learnt tasks 1 and 2: it cannot answer for 4 classes.
    decision = _gate(client, _evidence(1))
    assert decision["reasons"] == ["knows 2 classes, the champion knows 4: a version must cover every class the champion knows"]
    # As many classes, but one is not the champion's (matched by name, not by id).
    renamed = dataclasses.replace(_evidence(2), names={**NAMES, 3: "pink star"})
    decision = _gate(client, renamed)
    assert decision["reasons"][0].startswith("does not know 1 class(es) the champion knows (yellow triangle)")
    decision = _gate(client, _evidence(2, digests={"1": "digest-of-task-1", "2": "other images"}))
    assert not decision["promoted"]
    assert decision["reasons"][0].startswith("task(s) 2: measured on other classes or test images than the champion's")
    assert _champion(client) == "1"


# --------------------------------------------------------------------------- the new task's floor


def test_the_new_task_must_reach_its_zero_shot_accuracy(client):
    global MODEL
    # Zero-shot: class features w_c along the axes, images near their own class's axis
    # except two per new class, which lean to task 1's first class.
    labels = torch.tensor([c for c in range(4) for _ in range(PER_CLASS)])
    embeddings = torch.nn.functional.one_hot(labels, 4).float() * 3 + 0.1
    for c in TASKS[1]:
        embeddings[c * PER_CLASS:c * PER_CLASS + 2, 0] = 5.0
    zero_shot = gate.zero_shot_logits(embeddings, torch.eye(4), 100.0)
    assert _evidence(2, zero_shot=zero_shot).zero_shot == pytest.approx(0.8)

    _gate(client, _evidence(1))
    # Training left the new task at 50%, below what no training gives.
    decision = _gate(client, _evidence(2, new_right=5, zero_shot=zero_shot))
    assert not decision["promoted"]
    assert decision["reasons"] == [
        "task 2 (the new task): accuracy 50.0% is below its floor 70.0% (zero-shot 80.0% on it, less 10.0 points)"]
    assert decision["figures"]["new_task"] == {"task": 2, "accuracy": pytest.approx(0.5), "floor": pytest.approx(0.7),
                                               "floor_rule": "zero_shot", "zero_shot": pytest.approx(0.8)}
    # A fixed floor, or none.
    assert _gate(client, _evidence(2, new_right=5), GateConfig(new_task_floor=0.6))["reasons"] == [
        "task 2 (the new task): accuracy 50.0% is below its floor 60.0% (tracking.gate.new_task_floor)"]
    assert _gate(client, _evidence(2, new_right=5, zero_shot=zero_shot), GateConfig(new_task_floor="none"))["promoted"]
    # Within the allowance (70% against zero-shot's 80%) it passes.
    client.set_registered_model_alias(MODEL, "champion", "1")
    assert _gate(client, _evidence(2, new_right=7, zero_shot=zero_shot))["promoted"]
    # The first task has a floor too: with no champion to compare, it is the only check.
    MODEL = MODEL.replace("-classifier", "-fresh-classifier")
    client.create_registered_model(MODEL)
    decision = _gate(client, _evidence(1, wrong_among_old=2, zero_shot={"wrong_among_old": 0}))
    assert not decision["promoted"] and decision["reasons"] == [
        "task 1 (the new task): accuracy 80.0% is below its floor 90.0% (zero-shot 100.0% on it, less 10.0 points)"]
    assert champion(client, MODEL) is None


# --------------------------------------------------------------------------- nothing unchecked


def test_nan_figures_fail_the_gate_with_a_reason(client):
    _gate(client, _evidence(1))
    # The new task's images are gone (NaN accuracy): not "no figure, no check".
    labels, logits = _logits(2)
    keep = labels < 2
    decision = _gate(client, _evidence(2, labels[keep], logits[keep], zero_shot=_logits(2, **UNTRAINED)[1][keep]))
    assert not decision["promoted"]
    assert "task 2 (the new task): its accuracy is NaN" in decision["reasons"]
    # Zero-shot figures that could not be measured.
    decision = _gate(client, _evidence(2, zero_shot=None))
    assert decision["reasons"] == [
        "task 2 (the new task): its floor (zero_shot) is NaN, so it cannot be checked",
        "task 1: the share of its images taken by the 2 class(es) the champion does not know is 0.0%, zero-shot's NaN: "
        "a NaN figure cannot be compared",
    ]
    # A champion whose own figure is NaN.
    nan_champion = _register(client, _evidence(1), accuracy_row=json.dumps({"1": math.nan}))
    client.set_registered_model_alias(MODEL, "champion", nan_champion)
    decision = _gate(client, _evidence(2))
    assert not decision["promoted"] and _champion(client) == nan_champion
    assert decision["reasons"][0] == "task 1: accuracy among the champion's 2 classes 90.0%, the champion's NaN: a NaN figure cannot be compared"


@pytest.mark.parametrize("tag", ["classes", "test_digests", "accuracy_row"])
def test_a_champion_missing_a_tag_fails_the_gate_instead_of_skipping_the_check(client, tag):
    _gate(client, _evidence(1))
    client.delete_model_version_tag(MODEL, "1", tag)
    decision = _gate(client, _evidence(2))
    assert not decision["promoted"] and _champion(client) == "1"
    assert decision["reasons"][0].startswith(f"champion v1 has no `{tag}` tag")
    client.set_model_version_tag(MODEL, "1", tag, "not json")
    decision = _gate(client, _evidence(2))
    assert decision["reasons"][0].startswith(f"champion v1: its `{tag}` tag is not a non-empty JSON")


# --------------------------------------------------------------------------- moves, history, rollback


def test_every_move_is_recorded_shown_and_rolled_back(project, store, client, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    # The commands find the store as every step does (here: MLFLOW_TRACKING_URI).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    _gate(client, _evidence(1), run_id="a" * 32)
    _gate(client, _evidence(2, taken_by_new=3, zero_shot={"new_right": 0, "taken_by_new": 3}), run_id="b" * 32)
    runner = CliRunner()

    missing = runner.invoke(app, ["rollback", "--model", MODEL, "--to", "1"])
    assert missing.exit_code == 2 and "--reason is required" in missing.output
    unknown = runner.invoke(app, ["rollback", "--model", MODEL, "--to", "7", "--reason", "task 2 misroutes blue stars"])
    assert unknown.exit_code == 2 and "has no version '7' (its versions: 1, 2)" in unknown.output
    nothing = runner.invoke(app, ["rollback", "--model", "recall-no-such-classifier", "--to", "1", "--reason", "x"])
    assert nothing.exit_code == 2 and "no registered model 'recall-no-such-classifier'" in nothing.output
    assert _champion(client) == "2" and len(gate.moves(client, MODEL)) == 2

    moved = runner.invoke(app, ["rollback", "--model", MODEL, "--to", "1", "--reason", "task 2 misroutes blue stars"])
    assert moved.exit_code == 0, moved.output
    assert "champion moved from v2 to v1" in moved.output and _champion(client) == "1"
    again = runner.invoke(app, ["rollback", "--model", MODEL, "--to", "1", "--reason", "once more"])
    assert again.exit_code == 0 and "already holds champion; nothing moved" in again.output

    history = gate.moves(client, MODEL)
    assert [(m["from"], m["to"], m["by"]) for m in history] == [(None, "1", "gate"), ("1", "2", "gate"), ("2", "1", "rollback")]
    assert history[1]["run_id"] == "b" * 32 and history[2]["reason"] == "task 2 misroutes blue stars"
    assert all(m["at"].endswith("Z") for m in history)
    # One tag per move: none grows with the tasks.
    tags = client.get_registered_model(MODEL).tags
    assert sorted(k for k in tags if k.startswith(gate.MOVE_TAG_PREFIX)) == [
        f"{gate.MOVE_TAG_PREFIX}{n:06d}" for n in (1, 2, 3)]

    shown = runner.invoke(app, ["champion", "--model", MODEL])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"{MODEL}: champion is v1 (task 1, 2 classes, gate passed)"
    assert lines[1].split() == ["#", "when", "(UTC)", "from", "to", "task", "by", "reason"]
    rows = lines[2:5]
    assert [row.split()[3:5] for row in rows] == [["-", "v1"], ["v1", "v2"], ["v2", "v1"]]
    assert f"gate, run {'a' * 32}" in rows[0] and "no champion yet" in rows[0]
    assert f"gate, run {'b' * 32}" in rows[1] and "among the champion's 2 classes" in rows[1]
    assert "rollback by" in rows[2] and rows[2].endswith("task 2 misroutes blue stars")
