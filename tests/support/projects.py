"""Scratch projects under git + DVC and the commands run in them (end-to-end tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
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



# Runs the command and, on SIGTERM, kills -9 every process under it and reaps each one
# before exiting. As a child subreaper it is handed the command's orphans (the `dvc repro`
# under `recall update`): an orphan left to a PID 1 that reaps late stays a zombie, and
# DVC's lock counts a zombie's PID as alive ("is busy", CI at 3fee2ea).
_KILLER = r"""
import ctypes, os, signal, subprocess, sys, time
import psutil
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
command = subprocess.Popen(sys.argv[1:], start_new_session=True)

def kill_and_reap(signum, frame):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for descendant in psutil.Process().children(recursive=True):
            try:
                descendant.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            os._exit(137)
        time.sleep(0.05)
    sys.exit("kill_during: processes of the killed command still running after 60 s")

signal.signal(signal.SIGTERM, kill_and_reap)
sys.exit(command.wait())
"""


def kill_during(root: Path, command: list[str], stage: str) -> str:
    """Run ``command`` and kill -9 every process it started a second into ``stage``; returns
    the output seen until then. Returns once none of them is left, not even as a zombie."""
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLER, *command], cwd=root, env={**project_env(root), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"Running stage '{stage}'"):
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            break
    seen.extend(process.stdout)
    assert process.wait(timeout=90) == 137, "".join(seen)
    assert any(stage in line for line in seen), "".join(seen)
    return "".join(seen)
