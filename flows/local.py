"""A whole Prefect stack for Recall on one machine: server (sqlite, loopback), the ``cpu``
and ``gpu`` process work pools, the ``gpu`` global concurrency limit, prefect.yaml's
deployments, and a process worker per pool. ``make prefect`` / ``make prefect-down`` call
``python -m flows.local up|down``; the slow test uses the same functions.

Every process is started in its own process group with its PID in ``<home>/*.pid``, and
stopped by that PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from pipeline.devstack import prefect_env, start_prefect_server

POOLS = ("cpu", "gpu")
GPU_LIMIT = "gpu"
DEFAULT_PORT = 4200


def _prefect(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), *args]


def _check(cmd: list[str], cwd: str | Path, env: Mapping[str, str], what: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {(result.stdout + result.stderr)[-3000:]}")
    return result.stdout


def stack_env(home: str | Path, api_url: str, project_dir: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the Prefect CLI, the deploy and the workers run with. prefect.yaml reads
    RECALL_PROJECT_DIR (the checkout the workers run in), MLFLOW_TRACKING_URI and
    RECALL_DVC_REMOTE at deploy time. Unset, MLflow is the project's own sqlite store,
    spelled out (an empty value would hide a worker's own MLFLOW_TRACKING_URI), and the
    DVC remote is .dvc/config's."""
    from pipeline.tracking import LOCAL_DB

    env = {**os.environ, **prefect_env(home, api_url)}
    env["RECALL_PROJECT_DIR"] = str(Path(project_dir).resolve())
    if not env.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(project_dir).resolve() / LOCAL_DB}"
    env.setdefault("RECALL_DVC_REMOTE", "")
    env.setdefault("RECALL_SOURCE", "")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.defpath)}"
    # The report stage's matplotlib keeps its font cache with the stack's state, not in the
    # home folder of whoever started the workers.
    env.setdefault("MPLCONFIGDIR", str(Path(home).resolve() / "matplotlib"))
    env.update(extra or {})
    return env


def configure(project_dir: str | Path, env: Mapping[str, str]) -> None:
    """Work pools, the GPU limit and every deployment of prefect.yaml, on the server at
    env's PREFECT_API_URL. Safe to repeat."""
    for pool in POOLS:
        _check(_prefect("work-pool", "create", pool, "--type", "process", "--overwrite"), project_dir, env,
               f"creating work pool {pool!r}")
    created = subprocess.run(_prefect("gcl", "create", GPU_LIMIT, "--limit", "1"), cwd=project_dir, env=dict(env),
                             capture_output=True, text=True, timeout=120)
    if created.returncode != 0 and "already exists" not in created.stdout + created.stderr:
        raise RuntimeError(f"creating the {GPU_LIMIT!r} concurrency limit failed: {created.stdout}{created.stderr}")
    _check(_prefect("--no-prompt", "deploy", "--all"), project_dir, env, "prefect deploy --all")


def start_worker(pool: str, project_dir: str | Path, env: Mapping[str, str], log_dir: str | Path) -> subprocess.Popen:
    """A process worker for ``pool``; its flow runs start in prefect.yaml's pull-step folder."""
    log_path = Path(log_dir) / f"worker-{pool}.log"
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            _prefect("worker", "start", "--pool", pool, "--type", "process"), cwd=project_dir, env=dict(env),
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _pid_file(home: Path, name: str) -> Path:
    return home / f"{name}.pid"


def up(project_dir: Path, port: int = DEFAULT_PORT) -> str:
    home = project_dir / ".prefect"
    down(project_dir)
    server, api_url = start_prefect_server(home, port=port, ui=True)
    _pid_file(home, "server").write_text(str(server.pid))
    env = stack_env(home, api_url, project_dir)
    configure(project_dir, env)
    for pool in POOLS:
        worker = start_worker(pool, project_dir, env, home)
        _pid_file(home, f"worker-{pool}").write_text(str(worker.pid))
    return api_url


def down(project_dir: Path) -> list[str]:
    """Stop what ``up`` started, by the PIDs it wrote (workers first, then the server)."""
    home = project_dir / ".prefect"
    stopped = []
    for name in [*(f"worker-{pool}" for pool in POOLS), "server"]:
        path = _pid_file(home, name)
        if not path.exists():
            continue
        pid = int(path.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                os.killpg(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        path.unlink()
        stopped.append(f"{name} ({pid})")
    return stopped


def main(argv: list[str]) -> None:
    project_dir = Path.cwd()
    command = argv[0] if argv else "up"
    if command == "up":
        port = int(os.environ.get("PREFECT_PORT", DEFAULT_PORT))
        api_url = up(project_dir, port)
        print(f"Prefect server {api_url} (UI {api_url.removesuffix('/api')}); "
              f"pools {', '.join(POOLS)} with a worker each; deployments applied; logs in .prefect/")
        print(f"export PREFECT_API_URL={api_url}")
    elif command == "down":
        stopped = down(project_dir)
        print("stopped " + (", ".join(stopped) if stopped else "nothing (no PID files in .prefect/)"))
    else:
        raise SystemExit(f"unknown command {command!r}: up or down")


if __name__ == "__main__":
    main(sys.argv[1:])
