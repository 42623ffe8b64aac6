from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support.common import TINY, inside_project
from support.projects import make_project
from support.stream import STREAM_TINY

REPO = Path(__file__).resolve().parent.parent

from pipeline.compat import TELEMETRY_OFF  # noqa: E402

os.environ.update({**TELEMETRY_OFF, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
# One OpenMP thread per process: `make test` runs two xdist workers on two cores, and the
# stages, dask workers and servers they start inherit this. Set here, for every run, so a test's
# numbers do not depend on which other modules were collected (test_scaleout used to set it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RECALL_PIPELINE_RUN", None)



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
    with inside_project(root):
        from pipeline import config
        from pipeline.stages.backbone import run_backbone
        from pipeline.stages.embed import run_embed, run_embed_text
        from pipeline.stages.prepare import run_prepare
        from pipeline.stages.split import run_split

        cfg = config.load(None, TINY)
        run_prepare(cfg)
        run_backbone(cfg)
        run_split(cfg)
        for split in ("train", "test"):
            run_embed(cfg, split)
        run_embed_text(cfg)
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










@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port (sqlite backend, proxied artifact
    store under tmp_path), stopped by PID afterwards. Yields (uri, artifacts folder)."""
    from devtools import servers

    store = tmp_path / "mlflow-server"
    with servers.mlflow_server(store) as uri:
        yield uri, store / "artifacts"


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """Each test starts on its own local store unless it points somewhere itself."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def stream_repo(tmp_path) -> tuple[Path, Path]:
    """The project in stream mode (the tiny demo world as its demo backbone's), with an
    empty folder source; returns (repo, source)."""
    source = tmp_path / "source"
    source.mkdir()
    root = make_project(tmp_path / "repo", STREAM_TINY, "experiment=stream_demo", f"dataset.source={source}")
    return root, source
