from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

from devtools.scratch import TINY_CONFIG, as_overrides  # noqa: E402
from pipeline.compat import TELEMETRY_OFF  # noqa: E402

os.environ.update({**TELEMETRY_OFF, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RECALL_PIPELINE_RUN", None)

# The tiny world (conf/experiment/tiny.yaml) in 3 tasks. Logging a pyfunc model costs seconds
# per evaluation; tests of the registry turn it on.
TINY = as_overrides({**TINY_CONFIG, "split": {"n_tasks": 3}}) + ["tracking.register_classifier=false"]


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


def wait_for_http(url: str, process, what: str, timeout: float = 180) -> None:
    """Poll ``url`` until it answers 200; fail with the process's stderr if it dies first."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)


def run_task(cfg, task: int) -> dict:
    """One task's steps in the order the DVC stages run them; returns the evaluation."""
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.finetune import run_finetune
    from pipeline.stages.generators import run_fit_generators
    from pipeline.stages.replay import run_init_replay, run_replay

    run_fit_generators(cfg, task)
    if task == 1:
        run_init_replay(cfg)
    run_replay(cfg, task)
    run_finetune(cfg, task)
    return run_evaluate(cfg, task)


def free_port() -> int:
    from devtools.servers import free_port as pick

    return pick()


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
