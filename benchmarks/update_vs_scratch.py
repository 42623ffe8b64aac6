"""The update loop's point, measured: adding task k+1 to a k-task state against re-running
all k+1 tasks from scratch, in one run, at the demo's sizes (experiment=stream_demo).

Two scratch copies of the project (code, conf, dvc.yaml) under a temporary folder, each with
its own git, DVC cache and MLflow store, sharing one folder source of k+1 shapes batches:

- incremental: batches 1..k arrive one at a time (`recall update` after each), then batch
  k+1; the figure is the wall time of that last `recall update`;
- scratch: all k+1 batches are ready at once and one `recall update` runs every task. Its
  shared setup (the demo world, the backbone) is restored from the first copy's run cache
  first, so both figures count only per-task work; the run cache is off for the rest.

    python -m benchmarks.update_vs_scratch [--k 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP_STAGES = ("prepare", "backbone", "replay-init", "prompts-init")


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(root)
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")
    return env


def _sh(root: Path, *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {root}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def _project(root: Path, source: Path, cache: Path) -> None:
    root.mkdir(parents=True)
    for folder in ("pipeline", "conf", "hydra_plugins"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    _sh(root, "git", "init", "-q")
    _sh(root, "dvc", "init", "-q")
    _sh(root, "dvc", "config", "cache.dir", str(cache))
    _sh(root, "recall", "compose-params", "experiment=stream_demo", f"dataset.source={source}")


def _timed(root: Path, *cmd: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = _sh(root, *cmd)
    return time.perf_counter() - start, out


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="tasks already in the state (default 4)")
    args = parser.parse_args()
    n = args.k + 1
    with tempfile.TemporaryDirectory(prefix="recall-update-bench-") as tmp:
        tmp = Path(tmp)
        source, cache = tmp / "source", tmp / "cache"
        incremental, scratch = tmp / "incremental", tmp / "scratch"
        _project(incremental, source, cache)
        _project(scratch, source, cache)

        per_task = []
        for task in range(1, n + 1):
            _sh(incremental, "recall", "stream-demo", str(source), "--batches", str(n), "--next")
            seconds, out = _timed(incremental, "recall", "update")
            per_task.append(seconds)
            print(f"incremental: task {task} added in {seconds:.1f} s ({len(_ran(out))} stages ran)", flush=True)

        _sh(scratch, "dvc", "repro", *SETUP_STAGES)  # from the run cache: nothing to compute
        start = time.perf_counter()
        _sh(scratch, "recall", "ingest")
        out = _sh(scratch, "dvc", "repro", "--no-run-cache")
        scratch_seconds = time.perf_counter() - start
        print(f"scratch: {n} tasks in {scratch_seconds:.1f} s ({len(_ran(out))} stages ran)")
        add = per_task[-1]
        print(
            f"\nadding task {n} to a {args.k}-task state: {add:.1f} s; all {n} tasks from scratch: "
            f"{scratch_seconds:.1f} s; {scratch_seconds / add:.1f}x (first task, with the backbone: {per_task[0]:.1f} s)"
        )


if __name__ == "__main__":
    main()
