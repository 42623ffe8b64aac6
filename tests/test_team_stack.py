"""The team stack end to end, without containers (design section 8): PostgreSQL-backed
MLflow and Prefect servers, an S3 API holding the stream source, the DVC remote and
MLflow's artifacts, and a process worker per pool. Two batches land one after another and
the recall-update deployment runs each through the workers; PostgreSQL restarts between
them. Afterwards everything is in its bucket and registry, no secret is anywhere a user or
a log reader could see it, and nothing was written outside the stack's folders."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest
from support.common import free_port
from support.projects import sh
from support.stream import SETUP, STREAM_TINY, task_stages, upload_batch

pytestmark = [pytest.mark.slow, pytest.mark.stack]

SOURCE = "s3://recall-stream/incoming"
LEDGER = "s3://recall-stream/recall-state/ledger"
DVC_REMOTE = "s3://recall-dvc/dvc"


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def _scan_for(secret_values: dict[str, str], texts: dict[str, str]) -> list[str]:
    return [f"{name} in {where}" for where, text in texts.items() for name, value in secret_values.items()
            if value in text]


def test_two_batches_through_the_update_deployment_on_the_team_stack(tmp_path, monkeypatch):
    import boto3
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from support.stream import classifier_versions

    from devtools.localstack import LocalStack
    from devtools.scratch import scratch_project
    from devtools.servers import stop
    from flows.local import POOLS, configure, stack_env, start_worker

    started = time.monotonic()
    stack = LocalStack(tmp_path / "stack", {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect")})
    # Every program below runs with an empty home and the stack's own temporary folder;
    # both are checked at the end.
    home, scratch = tmp_path / "home", stack.root / "tmp"
    home.mkdir()
    scratch.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(scratch))
    var_tmp_before = set(os.listdir("/var/tmp"))
    settings = stack.up()
    secret_values = {
        "the S3 secret key": settings["AWS_SECRET_ACCESS_KEY"],
        # What a team's MLflow behind basic auth needs (the container stack's has it on);
        # this stack's server ignores it, but every client sends it.
        "the MLflow password": "mlflow-" + secrets.token_hex(12),
        **{f"the {role} database password": password for role, password in json.loads(
            (stack.root / "secrets.json").read_text()).items() if role in ("postgres", "mlflow", "prefect")},
    }
    s3_endpoint = settings["AWS_ENDPOINT_URL"]
    for key, value in {
        **stack.s3_env(), "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_TRACKING_URI": settings["MLFLOW_TRACKING_URI"],
        "MLFLOW_TRACKING_USERNAME": "recall-worker", "MLFLOW_TRACKING_PASSWORD": secret_values["the MLflow password"],
        "AWS_CONFIG_FILE": str(scratch / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    workers = []
    try:
        # The project: the stream demo reading the bucket, its authoritative ledger there too.
        overrides = ["experiment=stream_demo", f"dataset.source={SOURCE}", f"dataset.endpoint_url={s3_endpoint}",
                     f"dataset.ledger_uri={LEDGER}"]
        repo = scratch_project(stack.root / "repo", STREAM_TINY, compose=overrides, folders=("pipeline", "conf", "flows"),
                               files=("dvc.yaml", ".gitignore", "prefect.yaml"))
        sh(repo, "recall", "remote", DVC_REMOTE, "--endpoint-url", s3_endpoint)
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "the team's stream, remote and deployments")
        batches = stack.root / "producer"
        sh(repo, "recall", "stream-demo", str(batches), "--batches", "3")
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

        env = stack_env(stack.root / "prefect-clients", settings["PREFECT_API_URL"], repo, {
            "RECALL_SOURCE": SOURCE, "RECALL_DVC_REMOTE": DVC_REMOTE,
            "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
        })
        configure(repo, env)
        workers = [start_worker(pool, repo, env, stack.logs) for pool in POOLS]

        def prefect_api():
            return temporary_settings({PREFECT_API_URL: settings["PREFECT_API_URL"]})

        def update(batch: str):
            upload_batch(s3, batches, batch, bucket="recall-stream")
            with prefect_api():
                # The deployment's parameters as a team sets them: its source and its overrides.
                run = run_deployment("recall-update/scheduled", parameters={"source": SOURCE, "overrides": overrides},
                                     timeout=1500, poll_interval=2, as_subflow=False)
            logs = "\n".join((stack.logs / f"worker-{pool}.log").read_text()[-3000:] for pool in POOLS)
            assert run.state.is_completed(), f"{batch}: {run.state}\n{logs}"
            return run

        with prefect_api(), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("recall-update/scheduled")
        assert [s.schedule.cron for s in deployment.schedules] == ["*/15 * * * *"]
        assert deployment.parameters["source"] == SOURCE

        def stages_run_for(run) -> list[str]:
            """The stages the workers ran for ``run``: one recall-step flow run each."""
            with prefect_api(), get_client(sync_client=True) as client:
                steps = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("pipeline_run") == str(run.id)]
            assert all(r.state.is_completed() for r in steps)
            return sorted(stage for r in steps for stage in r.parameters["stages"])

        first = update("batch-001")
        assert stages_run_for(first) == sorted(SETUP | task_stages(1) | {"report"})
        # A database restart between two tasks (an upgrade, a failover): both servers reconnect.
        stack.stop_postgres()
        stack.start_postgres()
        second = update("batch-002")
        # Only the new task's stages, the split (the ledger's view of the tasks) and the report.
        assert stages_run_for(second) == sorted({"split"} | task_stages(2) | {"report"})

        with prefect_api(), get_client(sync_client=True) as client:
            flow_runs = client.read_flow_runs(limit=200)
            prefect_logs = client.read_logs(limit=200) + client.read_logs(limit=200, offset=200)
            deployments = client.read_deployments()

        # The registry: one classifier version per task, each aliased, the gate's champion.
        versions = sorted(classifier_versions(repo), key=lambda v: int(v.version))
        assert [v.tags["task"] for v in versions] == ["1", "2"]
        model = MlflowClient().get_registered_model(versions[0].name)
        assert {"task-1", "task-2", "champion"} <= set(model.aliases), model.aliases
        assert {model.aliases["task-1"], model.aliases["task-2"]} == {v.version for v in versions}

        # MLflow's artifacts, the DVC remote and the ledger are in their buckets; none of
        # MLflow's files or DVC's cache outputs landed in a bucket they do not belong in.
        artifacts, remote, stream = (_keys(s3, b) for b in ("recall-artifacts", "recall-dvc", "recall-stream"))
        assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in artifacts), artifacts[:20]
        assert any(k.startswith("dvc/files/md5/") for k in remote) and any(k.startswith("dvc/runs/") for k in remote)
        assert {"recall-state/ledger/entry-000001.json", "recall-state/ledger/entry-000002.json"} <= set(stream)
        assert not (repo / "mlruns").exists() and not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()

        # No secret in MLflow's run data, Prefect's flow-run parameters, deployments or logs,
        # the servers' and workers' logs, or the project's files.
        experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
        runs = MlflowClient().search_runs(experiments, max_results=1000)
        texts = {
            "MLflow runs' params and tags": json.dumps([[r.data.params, r.data.tags] for r in runs]),
            "Prefect flow-run parameters": json.dumps([r.parameters for r in flow_runs], default=str),
            "Prefect deployments": json.dumps([d.model_dump(mode="json") for d in deployments]),
            "Prefect logs": "\n".join(log.message for log in prefect_logs),
            **{f"log {p.name}": p.read_text(errors="replace") for p in stack.logs.glob("*.log")},
            **{f"project file {p.relative_to(repo)}": p.read_text(errors="replace")
               for p in [repo / "params.yaml", repo / "dvc.lock", *(repo / ".dvc").glob("config*")]},
        }
        assert len(runs) > 10 and len(prefect_logs) > 20
        assert not _scan_for(secret_values, texts)
    finally:
        for worker in workers:
            stop(worker)
        stack.down()
        if stack.pg_home != stack.root:
            shutil.rmtree(stack.pg_home, ignore_errors=True)

    # Nothing outside the stack's folders: the home is empty, /var/tmp has nothing new but
    # PostgreSQL's folder when root's temporary folders are closed to its user.
    assert _files_under(home) == set(), sorted(_files_under(home))[:20]
    assert set(os.listdir("/var/tmp")) - var_tmp_before <= {stack.pg_home.name}
    print(f"team stack, two batches: {time.monotonic() - started:.0f} s", file=sys.stderr)
