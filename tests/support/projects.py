"""Scratch projects under git + DVC and the commands run in them (end-to-end tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from devtools.scratch import project_env, scratch_project


def sh(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=root, env=project_env(root), capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result



def make_project(root: Path, config_update: dict, *compose_overrides: str) -> Path:
    """A copy of the project (code, conf, dvc.yaml) with ``config_update`` merged into
    conf/config.yaml, its params composed with ``compose_overrides``, under git + DVC."""
    return scratch_project(root, config_update, compose=list(compose_overrides))



def stages_ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}



def kill_during(root: Path, command: list[str], stage: str) -> str:
    """Run ``command`` and kill -9 its whole process group a second into ``stage``; returns
    the output seen until then."""
    process = subprocess.Popen(
        command, cwd=root, env={**project_env(root), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"Running stage '{stage}'"):
            time.sleep(1.0)
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert any(stage in line for line in seen), "".join(seen)
    return "".join(seen)
