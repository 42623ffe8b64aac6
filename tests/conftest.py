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
    "method.prompt.epochs=2",
    "method.prompt.batch_size=16",
    "method.prompt.per_class_per_epoch=8",
    # Logging a pyfunc model costs seconds per evaluation; tests of the registry turn it on.
    "tracking.register_classifier=false",
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
    import signal
    import subprocess

    port = free_port()
    store = tmp_path / "mlflow-server"
    store.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{venv_bin()}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(venv_bin() / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'server.db'}", "--artifacts-destination", str(store / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", server, "mlflow server")
        yield uri, store / "artifacts"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """Each test starts on its own local store unless it points somewhere itself."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
