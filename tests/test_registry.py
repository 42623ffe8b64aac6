"""The registry in production use: one model per lineage, no duplicate versions, and the
gate through the pipeline (its rules on tensors: test_gate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from support.common import run_task

from pipeline.data.split import load_split
from pipeline.io import read_tensor_metadata, read_tensors, write_tensors
from pipeline.stages.evaluate import run_evaluate
from pipeline.stages.prompts import run_init_prompts
from pipeline.stages.replay import run_init_replay
from pipeline.tracking.lineage import INPUT_DIGEST_TAG, REGISTERED_MODEL_TAG_LIMIT, Lineage, RegistryError
from pipeline.tracking.registry import model_name
from pipeline.tracking.server import tracking_uri

KINDS = ("classifier", "vae-bank", "prompts")
EVERY_VERSION_PASSES_ON_ACCURACY = ["tracking.gate.max_task_drop=1.0", "tracking.gate.max_average_drop=1.0",
                                    "tracking.gate.new_task_floor=none"]


def _cfg(method: str, *extra: str):
    from support.common import TINY

    from pipeline import config

    return config.load(None, TINY + [f"method={method}", "tracking.register_classifier=true", *extra])


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri(cfg))


def _run(cfg, tasks: range) -> dict[int, dict]:
    run_init_prompts(cfg)
    run_init_replay(cfg)
    return {task: _task(cfg, task) for task in tasks}


def _task(cfg, task: int) -> dict:
    return run_task(cfg, task)["registry"]


def _aliases(client, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def _versions(client, name: str) -> list[str]:
    return sorted(v.version for v in client.search_model_versions(f"name = '{name}'"))


# --------------------------------------------------------------------------- names


def test_a_named_lineage_gives_a_stable_name_without_pipeline_outputs(tiny_cfg):
    production = tiny_cfg.model_copy(update={"tracking": tiny_cfg.tracking.model_copy(update={"lineage": "production"})})
    assert model_name(production, "classifier") == "recall-shapes-tiny-production-classifier"
    with pytest.raises(RegistryError, match=r"classes.json: missing.*prepared dataset"):
        model_name(tiny_cfg, "classifier")


def test_a_lineage_name_must_be_a_plain_name(project):
    from support.common import TINY

    from pipeline import config

    with pytest.raises(config.ConfigError, match="tracking.lineage"):
        config.load(None, TINY + ["tracking.lineage='my model/1'"])


def _lineage(n_classes: int) -> Lineage:
    description = {
        "method": {"name": "clap"}, "seed": 0, "dataset": {"name": "imagenet-r"}, "dataset_fingerprint": "f" * 64,
        "n_tasks": n_classes // 10, "class_order": [f"class number {i} of a long benchmark" for i in range(n_classes)],
        "backbone": {"sha256": "b" * 64}, "generator": {"name": "vae"},
    }
    return Lineage("k" * 16, "label", description)


def test_lineage_tags_fit_a_sql_store_at_a_thousand_classes():
    """PostgreSQL keeps at most 5,000 characters of a registered model's tag: at 1,000 classes
    the class order is named by its count and digest (each version's `classes` tag has the list),
    and a short one is still written out whole."""
    import json

    big = _lineage(1000).tags()
    assert max(len(v) for v in big.values()) <= REGISTERED_MODEL_TAG_LIMIT
    assert big["recall.lineage.class_order"].startswith("1000 classes, sha256 ")
    described = json.loads(big["recall.lineage.description"])
    assert described["class_order"].startswith("1000 classes") and described["seed"] == 0
    small = _lineage(30)
    assert small.tags()["recall.lineage.class_order"].split(", ") == small.description["class_order"]
    assert json.loads(small.tags()["recall.lineage.description"]) == small.description


# --------------------------------------------------------------------------- through the registry


def test_another_lineage_moves_no_alias_of_the_first(world):
    good = _cfg("cgil")
    first = _run(good, range(1, 3))
    client = _client(good)
    names = {kind: model_name(good, kind) for kind in KINDS}
    assert names["classifier"].startswith("recall-shapes-tiny-cgil-s0-") and first[1]["model"] == names["classifier"]
    before = {kind: (_aliases(client, name), _versions(client, name)) for kind, name in names.items()}
    assert {"task-1", "task-2", "champion"} <= set(before["classifier"][0])
    lineage_tags = client.get_registered_model(names["classifier"]).tags
    assert lineage_tags["recall.lineage.method"] == "cgil" and lineage_tags["recall.lineage.seed"] == "0"
    split = load_split(good.paths.split)
    assert len(lineage_tags["recall.lineage.class_order"].split(", ")) == len(split["class_order"])

    worse = _cfg("sequential")
    second = _run(worse, range(1, 3))
    assert all(decision["model"] == model_name(worse, "classifier") != names["classifier"] for decision in second.values())
    # The first lineage's models are as they were: no alias moved, no version added.
    assert {kind: (_aliases(client, name), _versions(client, name)) for kind, name in names.items()} == before
    assert {"task-1", "task-2", "champion"} <= set(_aliases(client, model_name(worse, "classifier")))


def test_rerunning_the_same_experiment_adds_no_version(world):
    cfg = _cfg("cgil")
    first = _run(cfg, range(1, 3))
    client = _client(cfg)
    names = [model_name(cfg, kind) for kind in KINDS]
    before = {name: (_aliases(client, name), _versions(client, name)) for name in names}
    assert len(before[names[0]][1]) == 2

    # DVC re-runs evaluate (its outputs are not cached); a retried task re-runs every step.
    again = {task: run_evaluate(cfg, task)["registry"] for task in (1, 2)}
    again[2] = _task(cfg, 2)
    for task, decision in again.items():
        assert decision["reused"] and not decision["promoted"], decision
        assert decision["version"] == first[task]["version"]
        assert decision["reasons"][0].startswith(f"inputs identical to version {first[task]['version']}")
    assert {name: (_aliases(client, name), _versions(client, name)) for name in names} == before
    version = client.get_model_version(names[0], first[2]["version"])
    assert len(version.tags[INPUT_DIGEST_TAG]) == 64 and version.tags["class_count"] == "6"


def test_a_version_covering_fewer_classes_than_the_champion_is_rejected(world):
    production = ["tracking.lineage=production", *EVERY_VERSION_PASSES_ON_ACCURACY]
    first = _run(_cfg("cgil", *production), range(1, 3))
    assert first[2]["promoted"], first[2]
    # Task 1 again with other settings in the same named lineage: a new version of 3 classes.
    other = _cfg("cgil", *production, "method.prompt.lr=0.002")
    decision = run_evaluate(other, 1)["registry"]
    assert not decision["reused"] and not decision["promoted"]
    assert decision["reasons"] == [
        "knows 3 classes, the champion knows 6: a version must cover every class the champion knows"
    ]
    client = _client(other)
    name = model_name(other, "classifier")
    assert str(client.get_model_version_by_alias(name, "champion").version) == first[2]["version"]
    rejected = client.get_model_version(name, decision["version"])
    assert rejected.tags["gate"] == "rejected" and "knows 3 classes" in rejected.tags["gate_reasons"]
    assert rejected.tags["class_count"] == "3"


def test_a_version_measured_on_other_test_images_is_not_compared(world):
    cfg = _cfg("cgil", *EVERY_VERSION_PASSES_ON_ACCURACY)
    first = _run(cfg, range(1, 2))
    # The test set changes under the lineage (here: its embeddings, slightly).
    for part in sorted((Path(cfg.paths.embeddings) / "test").glob("*.safetensors")):
        tensors = read_tensors(part)
        write_tensors(part, {**tensors, "embeddings": tensors["embeddings"] * 1.001}, read_tensor_metadata(part))
    second = _task(cfg, 2)
    assert second["model"] == first[1]["model"] and not second["promoted"]
    assert second["reasons"][0].startswith("task(s) 1: measured on other classes or test images than the champion's")
    client = _client(cfg)
    assert str(client.get_model_version_by_alias(second["model"], "champion").version) == first[1]["version"]


def test_no_champion_only_when_the_registry_says_so_not_when_the_server_is_gone(tmp_path):
    """A server that drops one request must not read as "no champion yet": the gate would
    then promote the next version unchecked."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.registry import champion

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert champion(client, "recall-x-classifier") is None  # no such model yet
    client.create_registered_model("recall-x-classifier")
    assert champion(client, "recall-x-classifier") is None  # a model, no alias yet

    class ServerGone:
        """Answers the model lookup, then drops the alias lookup."""

        def get_registered_model(self, name):
            return object()

        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/registered-models/alias "
                                  "failed with exception ConnectionError")

    with pytest.raises(MlflowException, match="API request"):
        champion(ServerGone(), "recall-x-classifier")
