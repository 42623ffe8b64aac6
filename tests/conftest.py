from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

for key, value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}.items():
    os.environ[key] = value
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RECALL_PIPELINE_RUN", None)

# A world small enough for a test: 3 colours x 3 shapes, one held-out pair.
TINY = [
    "dataset.shapes.colors=[red,green,blue]",
    "dataset.shapes.shapes=[circle,square,triangle]",
    "dataset.shapes.holdout_pairs=[green square]",
    "dataset.shapes.train_per_class=6",
    "dataset.shapes.test_per_class=3",
    "dataset.shapes.pretrain_per_class=6",
    "split.n_tasks=3",
    "backbone.pretrain.epochs=1",
    "backbone.pretrain.batch_size=16",
    "backbone.pretrain.warmup_steps=1",
    "embed.batch_size=8",
    "embed.num_workers=0",
    "embed.chunk_size=10",
    "generator.hidden=16",
    "generator.latent=4",
    "generator.epochs=3",
    "generator.batch_size=4",
    "generator.samples_per_class=12",
    "method.prompt.epochs=2",
    "method.prompt.batch_size=16",
    "method.prompt.per_class_per_epoch=8",
]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty working folder with the repo's conf/, and tracking kept inside it."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECALL_CONF_DIR", str(tmp_path / "conf"))
    return tmp_path


@pytest.fixture
def tiny_cfg(project):
    from pipeline import config

    return config.load(None, TINY)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny shapes world up to its embeddings (1-epoch demo backbone), built once."""
    root = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    os.chdir(root)
    shutil.copytree(REPO / "conf", root / "conf")
    os.environ["RECALL_CONF_DIR"] = str(root / "conf")
    try:
        from pipeline import config, steps

        cfg = config.load(None, TINY)
        steps.run_prepare(cfg)
        steps.run_backbone(cfg)
        steps.run_split(cfg)
        for split in ("train", "test"):
            steps.run_embed(cfg, split)
        steps.run_embed_text(cfg)
    finally:
        os.chdir(cwd)
        os.environ.pop("RECALL_CONF_DIR", None)
    return root


@pytest.fixture
def world(tiny_world, tmp_path, monkeypatch):
    """A private copy of the tiny world to work in."""
    target = tmp_path / "w"
    shutil.copytree(tiny_world, target)
    monkeypatch.chdir(target)
    monkeypatch.setenv("RECALL_CONF_DIR", str(target / "conf"))
    from pipeline import config

    return config.load(None, TINY)


def venv_bin() -> Path:
    return Path(sys.executable).parent
