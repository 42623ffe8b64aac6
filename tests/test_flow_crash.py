"""A worker's machine dies during a stage (kill -9 of the worker and everything under it):
its flow run becomes Crashed (heartbeats + the crash automation of flows/local.py), and a
new run of the deployment resumes at that stage, with earlier outputs untouched and no
second model version. On a real Prefect server with process workers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from support.flows import DVC, tiny_project

from flows import stages as dvc_stages
from flows.local import CRASH_AUTOMATION, GPU_LIMIT, HEARTBEAT_SECONDS, POOLS, crash_automation

# The shortest crash window that is safe with a heartbeat every 30 s: one beat late by up
# to 30 s on a loaded machine is still no crash.
TEST_CRASH_AFTER = 2 * HEARTBEAT_SECONDS
KILLED_STAGE = "finetune@01"


def test_crash_automation_needs_a_window_longer_than_the_heartbeat_and_matches_prefect_yaml():
    from support.common import REPO

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS), deployment["name"]
    automation = crash_automation()
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.within.total_seconds() >= 2 * HEARTBEAT_SECONDS
    assert automation.actions[0].state.value == "CRASHED"
    with pytest.raises(ValueError, match="would crash live flow runs"):
        crash_automation(HEARTBEAT_SECONDS)


def _stage_process(worker: psutil.Process, family: str) -> psutil.Process | None:
    """The ``recall <family>`` process somewhere under the worker, if it runs now."""
    for process in worker.children(recursive=True):
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if family in command and any(Path(part).name == "recall" for part in command):
            return process
    return None


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_tree(root: psutil.Process, timeout: float = 30) -> list[psutil.Process]:
    """What a dead machine does to the worker: every process of its tree stops at once and
    reports nothing. SIGSTOP the whole tree first (nothing runs, forks or reports while we
    look), then SIGKILL every process of it."""
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        try:
            process.suspend()
        except psutil.NoSuchProcess:
            pass
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in tree):
        assert time.monotonic() < deadline, f"still alive after SIGKILL: {[p.pid for p in tree if not _gone(p)]}"
        time.sleep(0.1)
    return tree


def _outputs(repo: Path, lock: dict, stages: set[str]) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file the stages output (dvc.lock's outs, folders walked)."""
    files = {}
    for stage in stages:
        for out in lock["stages"][stage].get("outs", []):
            path = repo / out["path"]
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    files[str(file.relative_to(repo))] = (hashlib.sha256(file.read_bytes()).hexdigest(),
                                                          file.stat().st_mtime_ns)
    return files


def _poll(what: str, check, timeout: float, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)


@pytest.mark.slow
@pytest.mark.stack
def test_killed_worker_crashes_its_flow_run_and_a_new_run_resumes_at_the_killed_stage(tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from devtools.servers import prefect_server, stop
    from flows.local import configure, stack_env, start_worker

    started = time.monotonic()
    repo = tiny_project(tmp_path / "repo")
    home = tmp_path / "prefect"
    workers: dict[str, subprocess.Popen] = {}
    spawned: set[psutil.Process] = set()  # everything seen under a worker, stopped by PID at the end

    def logs() -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(tmp_path.glob("worker-*.log")))

    with prefect_server(home) as api_url:
        env = stack_env(home, api_url, repo, {
            "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        })
        # The heartbeat comes from prefect.yaml's job variables, as on any worker.
        env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
        env.pop("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", None)
        configure(repo, env, crash_after=TEST_CRASH_AFTER)
        configure(repo, env, crash_after=TEST_CRASH_AFTER)  # again: one automation, up to date
        try:
            for pool in POOLS:
                workers[pool] = start_worker(pool, repo, env, tmp_path)
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                from prefect.automations import Automation

                assert [a.name for a in client.read_automations()].count(CRASH_AUTOMATION) == 1
                assert Automation.read(name=CRASH_AUTOMATION).trigger.within.total_seconds() == TEST_CRASH_AFTER

                # ---- the first run, killed with its worker a moment into finetune@01
                first = run_deployment("recall-benchmark/on-demand", parameters={"routing": "inline"}, timeout=0,
                                       as_subflow=False)
                cpu_worker = psutil.Process(workers["cpu"].pid)
                deadline = time.monotonic() + 900
                last_check = 0.0
                while (stage_process := _stage_process(cpu_worker, "finetune")) is None:
                    spawned.update(cpu_worker.children(recursive=True))
                    if time.monotonic() - last_check > 5:
                        last_check = time.monotonic()
                        state = client.read_flow_run(first.id).state
                        assert not state.is_final(), f"the first run ended before {KILLED_STAGE}: {state}\n{logs()}"
                    assert time.monotonic() < deadline, f"{KILLED_STAGE} never started\n{logs()}"
                    time.sleep(0.2)
                # The worker starts the flow run's process in a session of its own (and the
                # stage's processes in that one): killing the worker's process group alone
                # would leave the flow run and the stage running. The whole tree dies.
                groups = {p.pid: (os.getpgid(p.pid), " ".join(p.cmdline())[:80])
                          for p in [cpu_worker, *cpu_worker.children(recursive=True)]}
                assert any("prefect.engine" in command for _, command in groups.values()), groups
                dvc_pid = stage_process.ppid()
                killed = _kill_tree(cpu_worker)
                killed_at = time.monotonic()
                workers["cpu"].wait(timeout=10)
                print(f"killed {len(killed)} processes (process groups {groups}) in {KILLED_STAGE}", file=sys.stderr)

                # The killed `dvc repro` left its PID in DVC's rwlock on the stage's outputs
                # (the lock file itself is an OS lock, gone with the process): the re-run
                # must get past it.
                rwlock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
                assert any(info["pid"] == dvc_pid for info in rwlock["write"].values()), rwlock

                lock = yaml.safe_load((repo / "dvc.lock").read_text())
                pipeline = dvc_stages.discover(repo)
                resumed = pipeline.plan([KILLED_STAGE])  # it and what follows it
                earlier = set(lock["stages"])
                assert KILLED_STAGE not in earlier
                assert {s for s in pipeline.stages if s not in resumed} == earlier
                before = _outputs(repo, lock, earlier)
                assert any(path.startswith("models/generators") for path in before), sorted(before)

                # ---- nothing reports for the dead machine: the automation marks the run Crashed
                crashed = _poll("the killed flow run to become Crashed",
                                lambda: (run := client.read_flow_run(first.id)).state.is_crashed() and run,
                                timeout=HEARTBEAT_SECONDS + TEST_CRASH_AFTER + 90)
                to_crashed = time.monotonic() - killed_at
                print(f"flow run Crashed {to_crashed:.0f} s after the kill: {crashed.state.message}", file=sys.stderr)
                assert "heartbeat" in (crashed.state.message or "")

                # ---- a new worker, a new run: resumes at the killed stage
                workers["cpu"] = start_worker("cpu", repo, env, tmp_path)
                second = run_deployment("recall-benchmark/on-demand", parameters={"routing": "inline"}, timeout=900,
                                        poll_interval=2, as_subflow=False)
                assert second.state.is_completed(), f"{second.state}\n{logs()}"
                def stage_runs():  # task-run states reach the server as events: wait for them
                    runs = [r for r in client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[second.id]))) if r.name in pipeline.stages]
                    return runs if len(runs) >= len(resumed) and all(r.state.is_completed() for r in runs) else None

                stage_runs = _poll("the second run's stage task runs, Completed", stage_runs, timeout=60)
                assert sorted(r.name for r in stage_runs) == sorted(resumed)
                assert all(r.state.is_completed() for r in stage_runs)
                text = _poll("the second run's logs", lambda: "\n".join(log.message for log in client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[second.id])), sort=LogSort.TIMESTAMP_ASC,
                    limit=200)) or None, timeout=60)
                ran = [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")]
                assert ran and ran[0] == KILLED_STAGE, text
                assert not earlier & set(ran), ran
                # The dead run's GPU slot came back (its lease expired): the re-run's
                # finetune@01 got it, and gave it back.
                assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0
        finally:
            for worker in workers.values():
                try:
                    spawned.update(psutil.Process(worker.pid).children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
                stop(worker)
            for process in spawned:
                if not _gone(process):
                    process.kill()

    # Earlier stages: not re-run, their outputs byte for byte (and mtime) what they were.
    after_lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {s: after_lock["stages"][s] for s in earlier} == {s: lock["stages"][s] for s in earlier}
    assert _outputs(repo, after_lock, earlier) == before
    status = subprocess.run([DVC, "status"], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert "up to date" in status.stdout, status.stdout + status.stderr

    # One classifier version for task 1 (and one prompt state): the killed attempt left none.
    mlflow = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    models = {m.name for m in mlflow.search_registered_models()}
    for kind in ("classifier", "prompts"):
        [name] = [m for m in models if m.endswith(f"-{kind}")]
        versions = mlflow.search_model_versions(f"name = '{name}'")
        assert [v.tags["task"] for v in versions] == ["1"], (kind, [(v.version, v.tags) for v in versions])
    print(f"kill -9 of a worker, crash and resume: {time.monotonic() - started:.0f} s "
          f"(Crashed {to_crashed:.0f} s after the kill)", file=sys.stderr)
