"""A whole Prefect stack for Recall on one machine: server (sqlite, loopback), the ``cpu``
and ``gpu`` process work pools, the ``gpu`` global concurrency limit, prefect.yaml's
deployments, the automation that marks a flow run whose machine died Crashed, and a
process worker per pool. ``make prefect`` / ``make prefect-down`` call
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

from devtools.servers import prefect_env, start_prefect_server

POOLS = ("cpu", "gpu")
GPU_LIMIT = "gpu"
DEFAULT_PORT = 4200

# A worker's machine that dies (kill -9, power, OOM killer) reports nothing: its flow run
# would stay Running for ever. Flow runs of prefect.yaml's deployments send a heartbeat
# event every HEARTBEAT_SECONDS (PREFECT_FLOWS_HEARTBEAT_FREQUENCY in their job
# variables, so every worker type and every machine gets it); the automation below marks
# a run Crashed when neither a heartbeat nor a final state came for CRASH_AFTER_SECONDS
# (Prefect's "detect zombie flows"). Re-running the deployment then resumes at the
# stage that was cut short: DVC skips what completed.
HEARTBEAT_SECONDS = 30
CRASH_AFTER_SECONDS = 90
CRASH_AUTOMATION = "recall: crash unresponsive flow runs"
# How often a worker asks the server for flow runs to start (Prefect's default: 10 s). Every
# task's chain sent to a step deployment waits for the next poll; a poll is one small request.
WORKER_POLL_SECONDS = 2


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
    from pipeline.tracking.server import LOCAL_DB

    env = {**os.environ, **prefect_env(home, api_url)}
    env["RECALL_PROJECT_DIR"] = str(Path(project_dir).resolve())
    if not env.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(project_dir).resolve() / LOCAL_DB}"
    env.setdefault("RECALL_DVC_REMOTE", "")
    env.setdefault("RECALL_SOURCE", "")
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(WORKER_POLL_SECONDS))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.defpath)}"
    # The report stage's matplotlib keeps its font cache with the stack's state, not in the
    # home folder of whoever started the workers.
    env.setdefault("MPLCONFIGDIR", str(Path(home).resolve() / "matplotlib"))
    env.update(extra or {})
    return env


def crash_automation(within: float = CRASH_AFTER_SECONDS):
    """The automation that marks a deployment's flow run Crashed when it has sent neither a
    heartbeat nor a final state for ``within`` seconds after a heartbeat. Only runs of a
    deployment (prefect.yaml's set the heartbeat): a flow run started by hand beats at
    Prefect's default pace (180 s in 3.8), which would look dead after ``within``."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    if within <= HEARTBEAT_SECONDS:
        raise ValueError(f"a crash window of {within} s would crash live flow runs: they beat every {HEARTBEAT_SECONDS} s")
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=(f"A flow run of a deployment that sent no heartbeat (every {HEARTBEAT_SECONDS} s) and no final "
                     f"state for {within:g} s lost its process (a worker's machine died): mark it Crashed."),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            match_related={"prefect.resource.role": "deployment"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {within:g} s: the flow run's process is gone (its worker's machine died?)",
        )],
    )


def ensure_crash_automation(within: float = CRASH_AFTER_SECONDS) -> str:
    """Create the crash automation on the server of this process's Prefect settings, or
    bring the one of that name up to date; returns "created" or "updated"."""
    from prefect.client.orchestration import get_client

    automation = crash_automation(within)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(CRASH_AUTOMATION)
        if not existing:
            client.create_automation(automation)
            return "created"
        first, *duplicates = sorted(existing, key=lambda a: str(a.id))
        client.update_automation(first.id, automation)
        for duplicate in duplicates:
            client.delete_automation(duplicate.id)
        return "updated"


def configure(project_dir: str | Path, env: Mapping[str, str], crash_after: float = CRASH_AFTER_SECONDS) -> None:
    """Work pools, the GPU limit, every deployment of prefect.yaml and the crash automation
    (``crash_after`` seconds without a heartbeat), on the server at env's
    PREFECT_API_URL. Safe to repeat."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    for pool in POOLS:
        _check(_prefect("work-pool", "create", pool, "--type", "process", "--overwrite"), project_dir, env,
               f"creating work pool {pool!r}")
    created = subprocess.run(_prefect("gcl", "create", GPU_LIMIT, "--limit", "1"), cwd=project_dir, env=dict(env),
                             capture_output=True, text=True, timeout=120)
    if created.returncode != 0 and "already exists" not in created.stdout + created.stderr:
        raise RuntimeError(f"creating the {GPU_LIMIT!r} concurrency limit failed: {created.stdout}{created.stderr}")
    _check(_prefect("--no-prompt", "deploy", "--all"), project_dir, env, "prefect deploy --all")
    server = {PREFECT_API_URL: env["PREFECT_API_URL"]}
    if env.get("PREFECT_API_AUTH_STRING"):
        server[PREFECT_API_AUTH_STRING] = env["PREFECT_API_AUTH_STRING"]
    with temporary_settings(server):
        ensure_crash_automation(crash_after)


K8S_PREFECT_FILE = Path("infra") / "k8s" / "prefect.yaml"


def deploy_kubernetes(project_dir: str | Path, env: Mapping[str, str]) -> str:
    """Apply infra/k8s/prefect.yaml (recall-step/gpu-k8s) from ``project_dir``: its pods clone
    RECALL_GIT_URL at this checkout's commit. An empty URL or commit would reach the pods as
    "" (git_clone would take the default branch), so both must be set; the commit is HEAD's.
    Returns the commit."""
    if not env.get("RECALL_GIT_URL"):
        raise RuntimeError("RECALL_GIT_URL is not set: the clone URL the Kubernetes pods can reach")
    commit = _check(["git", "rev-parse", "HEAD"], project_dir, env, "git rev-parse HEAD").strip()
    env = {**env, "RECALL_GIT_COMMIT": commit}
    _check(_prefect("--no-prompt", "deploy", "--prefect-file", str(K8S_PREFECT_FILE), "--all"), project_dir, env,
           f"prefect deploy --prefect-file {K8S_PREFECT_FILE}")
    return commit


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
    elif command == "configure":
        # The team stack's one-shot prefect-deploy (infra/compose.yaml): what `up` does to its
        # own server, to the server of this environment (PREFECT_API_URL, its auth string).
        configure(project_dir, os.environ)
        print(f"pools {', '.join(POOLS)}, the {GPU_LIMIT!r} limit, prefect.yaml's deployments and "
              f"{CRASH_AUTOMATION!r} on {os.environ.get('PREFECT_API_URL')}")
    elif command == "deploy-k8s":
        commit = deploy_kubernetes(project_dir, os.environ)
        print(f"recall-step/gpu-k8s: pods clone {os.environ['RECALL_GIT_URL']} at {commit}")
    elif command == "automation":
        print(f"automation {CRASH_AUTOMATION!r}: {ensure_crash_automation()}")
    elif command == "down":
        stopped = down(project_dir)
        print("stopped " + (", ".join(stopped) if stopped else "nothing (no PID files in .prefect/)"))
    else:
        raise SystemExit(f"unknown command {command!r}: up, down, configure, deploy-k8s or automation")


if __name__ == "__main__":
    main(sys.argv[1:])
