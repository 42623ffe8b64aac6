"""Prefect flow tests: the tiny project they run and the dvc program."""

from __future__ import annotations

import json
from pathlib import Path

from support.common import venv_bin

DVC = str(venv_bin() / "dvc")



def tiny_project(root: Path) -> Path:
    """The project (code, conf, dvc.yaml, prefect.yaml) shrunk to the tiny world, under git
    + DVC; params.yaml is the flow run's to compose."""
    from devtools.scratch import TINY_CONFIG, merge_config, scratch_project

    config = json.loads(json.dumps(TINY_CONFIG))
    # One task: every kind of stage runs once (the per-task chain is test_pipeline_dvc's).
    merge_config(config, {"split": {"n_tasks": 1}})
    return scratch_project(root, config, folders=("pipeline", "conf", "flows"),
                           files=("dvc.yaml", "prefect.yaml", ".gitignore"))
