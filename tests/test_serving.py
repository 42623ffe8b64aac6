"""Registered classifier versions: the pyfunc model, its aliases and the promotion gate."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import torch
from support.common import run_task

from pipeline.stages._common import task_file
from pipeline.stages.prompts import run_init_prompts
from pipeline.stages.saved_classifier import load_classifier


def _model(cfg) -> str:
    from pipeline.tracking.registry import model_name

    return model_name(cfg, "classifier")


def _overrides(method: str, *extra: str) -> list[str]:
    from support.common import TINY

    return TINY + [f"method={method}", "method.prompt.epochs=40", "tracking.register_classifier=true", *extra]


def _cfg(method: str, *extra: str):
    from pipeline import config

    return config.load(None, _overrides(method, *extra))


def _client(cfg):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.server import tracking_uri

    return MlflowClient(tracking_uri(cfg))


_task = run_task


def test_a_version_trained_without_replay_is_registered_but_not_champion(world):
    # One named lineage (a production loop): runs of other methods meet the same champion.
    good = _cfg("cgil", "tracking.lineage=production")
    run_init_prompts(good)
    first = _task(good, 1)
    assert first["registry"]["promoted"] and first["registry"]["reasons"][0].startswith("no champion yet")
    worse = _cfg("sequential", "tracking.lineage=production", "tracking.gate.max_task_drop=0.1")
    second = _task(worse, 2)
    decision = second["registry"]
    assert not decision["promoted"], decision
    # Without replay, task 1's images go to task 2's classes (forgetting as a bias towards
    # the newest task): more of them than zero-shot sends there.
    pull = "of its images go to the 3 class(es) the champion does not know"
    assert any(reason.startswith("task 1: ") and pull in reason for reason in decision["reasons"]), decision["reasons"]
    client = _client(worse)
    model = _model(worse)
    assert model == "recall-shapes-tiny-production-classifier" == first["registry"]["model"]
    assert str(client.get_model_version_by_alias(model, "champion").version) == first["registry"]["version"]
    rejected = client.get_model_version_by_alias(model, "task-2")
    assert str(rejected.version) == decision["version"] and rejected.tags["gate"] == "rejected"
    assert pull in rejected.tags["gate_reasons"]
    run = client.get_run(rejected.run_id)
    assert run.data.tags["recall.gate"] == "rejected" and "task 1" in run.data.tags["recall.gate_reasons"]
    assert run.data.metrics["gate_passed"] == 0.0
    gate_file = Path(client.download_artifacts(rejected.run_id, "gate/gate.json"))
    assert json.loads(gate_file.read_text())["champion_before"] == first["registry"]["version"]
    # The evaluation file (what DVC tracks) carries the decision and the figures it compared.
    written = json.loads(task_file(worse.paths.evaluations, 2, ".json").read_text())["registry"]
    assert written["decision"] == "rejected" and written["version"] == decision["version"]
    assert written["champion_before"] == written["champion_after"] == first["registry"]["version"]
    figures = written["figures"]
    assert set(figures["restricted_row"]) == set(figures["champion_row"]) == {"1"}
    assert figures["taken_by_new_classes"]["1"] - figures["taken_by_new_classes_zero_shot"]["1"] > 0.1
    assert written["figures"]["new_task"]["floor_rule"] == "zero_shot"


def test_the_registered_model_classifies_images_and_embeddings_with_uncertainty(world):
    import mlflow
    import pandas as pd

    from pipeline import config
    from pipeline.clip import backbone as backbone_lib
    from pipeline.clip import embedding as embed_lib
    from pipeline.data import load_prepared
    from pipeline.tracking.server import tracking_uri, using_tracking_uri

    cfg = _cfg("clap", "method.head.mc_test=5")
    run_init_prompts(cfg)
    _task(cfg, 1)
    # The CLI finds the model from the current params, as after `dvc repro`.
    config.write_params("params.yaml", config.compose(_overrides("clap", "method.head.mc_test=5")))
    name = _model(cfg)
    import warnings

    with using_tracking_uri(tracking_uri(cfg)), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(f"models:/{name}@task-1")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@task-1"))
    # Loading (so every `recall classify`) prints no "add type hints to predict" warning.
    assert not [w for w in caught if "type hint" in str(w.message)], [str(w.message) for w in caught]
    assert model.metadata.signature is not None
    requirements = (local / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}\n" in requirements and "+cpu" not in requirements
    assert "pydantic==" in requirements and "open_clip_torch==" in requirements
    assert (local / "serving_input_example.json").exists()

    backbone = backbone_lib.load_backbone(cfg.paths.backbone)
    expected = load_classifier(cfg, 1, backbone)
    test = embed_lib.load_embeddings(Path(cfg.paths.embeddings) / "test", backbone.sha256)
    x = test["embeddings"][:6]
    out = model.predict(pd.DataFrame({"embedding": [row.tolist() for row in x.double()]}))
    want = expected.predict(x)
    assert torch.allclose(torch.tensor(list(out["probabilities"]), dtype=torch.float64), want["probs"].double(), atol=1e-5)
    assert list(out["class_id"]) == want["label"].tolist()
    assert (out["sample_variance"] >= 0).all() and not out["sample_variance"].isna().any()
    names = load_prepared(cfg.paths.prepared).classes
    assert list(out["label"]) == [names[c] for c in want["label"].tolist()]

    # An image as a path, as raw bytes and as base64 gives what its embedding gives.
    prepared = load_prepared(cfg.paths.prepared)
    image_path = prepared.image_path(prepared.samples("test")[0])
    raw = image_path.read_bytes()
    by_path = model.predict(pd.DataFrame({"image": [str(image_path)]}))
    by_b64 = model.predict(pd.DataFrame({"image": [base64.b64encode(raw).decode()]}))
    from PIL import Image

    with torch.no_grad():
        embedding = backbone.model.encode_image(backbone.preprocess(Image.open(image_path).convert("RGB"))[None]).float()
    direct = expected.predict(embedding)
    for frame in (by_path, by_b64):
        assert torch.allclose(torch.tensor(frame["probabilities"][0], dtype=torch.float64), direct["probs"][0].double(), atol=1e-5)
    from pipeline.serving.model import RecallClassifierModel

    body = RecallClassifierModel(local / "artifacts" / "classifier.safetensors")
    assert body.predict_rows(images=[raw])[0]["class_id"] == int(direct["label"][0])

    # The CLI classifies with a version by name and alias.
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["classify", str(image_path), "--alias", "task-1", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(next(line for line in result.output.splitlines() if line.startswith('{"input"')))
    assert answer["class_id"] == int(direct["label"][0]) and answer["input"] == str(image_path)
    assert answer["sample_variance"] >= 0 and len(answer["probabilities"]) == len(expected.class_ids)
    missing = CliRunner().invoke(app, ["classify", str(image_path), "--alias", "task-9"])
    assert missing.exit_code == 2 and "task-9" in missing.output


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http(world):
    """`mlflow models serve` on a registered version, in this environment
    (`--env-manager local`: offline, no new environment can be built)."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from support.common import free_port, wait_for_http

    from pipeline.data import load_prepared
    from pipeline.tracking.server import tracking_uri

    cfg = _cfg("clap", "method.head.mc_test=5")
    run_init_prompts(cfg)
    _task(cfg, 1)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{_model(cfg)}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/ping", server, "mlflow models serve")

        def invoke(payload: dict) -> list[dict]:
            request = urllib.request.Request(
                f"{base}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["predictions"]

        prepared = load_prepared(cfg.paths.prepared)
        image = base64.b64encode(prepared.image_path(prepared.samples("test")[0]).read_bytes()).decode()
        by_image = invoke({"dataframe_records": [{"image": image}]})
        dim = 128
        by_embedding = invoke({"dataframe_split": {"columns": ["embedding"], "data": [[[0.05] * dim], [[-0.05] * dim]]}})
        assert len(by_image) == 1 and len(by_embedding) == 2
        for row in by_image + by_embedding:
            assert row["label"] in prepared.classes
            assert math.isclose(sum(row["probabilities"]), 1.0, rel_tol=1e-5)
            assert row["sample_variance"] >= 0 and row["entropy"] >= 0 and "energy" in row
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_model_version_carries_exactly_the_code_serving_imports():
    """The model's code path is the import closure of the serving model (lazy imports
    included), so loading a version never misses a module and carries no training, stage,
    tracking or dev code."""
    import ast

    from pipeline.serving.log import PACKAGE, SERVING_CODE

    def module_path(module: str) -> Path | None:
        path = PACKAGE.parent.joinpath(*module.split("."))
        if path.with_suffix(".py").exists():
            return path.with_suffix(".py")
        return path / "__init__.py" if (path / "__init__.py").exists() else None

    closure, todo = set(), ["pipeline.serving.model", "pipeline.serving.pyfunc_model"]
    while todo:
        module = todo.pop()
        path = module_path(module)
        if path is None or path in closure:
            continue
        closure.add(path)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    needed = {p.relative_to(PACKAGE).as_posix() for p in closure}
    shipped = set()
    for name in SERVING_CODE:
        path = PACKAGE / name
        shipped |= {p.relative_to(PACKAGE).as_posix() for p in path.rglob("*.py")} if path.is_dir() else {name}
    assert needed <= shipped, f"a loaded model would miss {sorted(needed - shipped)}"
    assert shipped <= needed, f"a model version would carry code serving never imports: {sorted(shipped - needed)}"
