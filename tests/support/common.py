"""What several test modules share: paths, the tiny world as overrides, small waits and runs.

Test modules import helpers from here (never from each other); fixtures live in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools.scratch import TINY_CONFIG, as_overrides

REPO = Path(__file__).resolve().parents[2]


# The tiny world (conf/experiment/tiny.yaml) in 3 tasks. Logging a pyfunc model costs seconds
# per evaluation; tests of the registry turn it on.
TINY = as_overrides({**TINY_CONFIG, "split": {"n_tasks": 3}}) + ["tracking.register_classifier=false"]



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


@contextmanager
def inside_project(root: Path) -> Iterator[None]:
    """Work in ``root`` with a copy of the repo's conf/ as the config; the working folder
    and RECALL_CONF_DIR are restored after (any fixture scope: no monkeypatch needed)."""
    cwd, conf_dir = os.getcwd(), os.environ.get("RECALL_CONF_DIR")
    os.chdir(root)
    shutil.copytree(REPO / "conf", root / "conf")
    os.environ["RECALL_CONF_DIR"] = str(root / "conf")
    try:
        yield
    finally:
        os.chdir(cwd)
        if conf_dir is None:
            os.environ.pop("RECALL_CONF_DIR", None)
        else:
            os.environ["RECALL_CONF_DIR"] = conf_dir
