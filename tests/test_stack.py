"""`make stack` / `make stack-down`: the team stack on loopback from real programs
(PostgreSQL, moto's S3 API, mlflow server, prefect server when installed)."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from support.common import REPO, free_port, venv_bin

pytestmark = [pytest.mark.slow, pytest.mark.stack]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        base + path, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _script(name: str, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "infra" / "local" / name), str(folder)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )


def test_stack_up_survives_a_database_restart_and_down_leaves_nothing(tmp_path):
    from devtools.localstack import STACK_BUCKETS, LocalStack, _alive, _group_members

    folder = tmp_path / ".stack"
    ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect")}
    stack = LocalStack(folder, ports)
    env = {**os.environ, "PYTHON": str(venv_bin() / "python"), "PYTHONPATH": str(REPO)}
    # The scripts read the ports from an existing stack.json only through LocalStack; start
    # through the library with free ports (a developer's machine may use the defaults), then
    # stop through the script `make stack-down` runs.
    settings = stack.up()
    try:
        pids = stack.recorded()
        assert {"postgres", "s3", "mlflow"} <= set(pids)

        mlflow_uri = settings["MLFLOW_TRACKING_URI"]
        assert mlflow_uri == f"http://127.0.0.1:{ports['mlflow']}"
        with urllib.request.urlopen(f"{mlflow_uri}/health", timeout=10) as response:
            assert response.status == 200
        experiment = _api(mlflow_uri, "/api/2.0/mlflow/experiments/create", {"name": "stack-check"})["experiment_id"]

        import boto3

        s3 = boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL"], aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} >= set(STACK_BUCKETS)

        if "prefect" in pids:
            with urllib.request.urlopen(f"{settings['PREFECT_API_URL']}/health", timeout=10) as response:
                assert response.status == 200

        # A database restart (an upgrade, a crash): MLflow reconnects on its own.
        stack.stop_postgres()
        assert not _alive(pids["postgres"])
        stack.start_postgres()
        found = _api(mlflow_uri, "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        assert experiment in {e["experiment_id"] for e in found}
        pids = stack.recorded()

        # No password reaches a log or a file other than the 0600 secrets file.
        secrets = json.loads((folder / "secrets.json").read_text())
        assert oct((folder / "secrets.json").stat().st_mode & 0o777) == "0o600"
        for path in [*folder.joinpath("logs").glob("*"), folder / "env", folder / "stack.json"]:
            text = path.read_text(errors="replace")
            for role in ("postgres", "mlflow", "prefect"):
                assert secrets[role] not in text, f"{role}'s password in {path}"
    finally:
        result = _script("down", folder, env)
        if stack.pg_home != folder:  # the cluster went outside the 0700 temporary folder
            import shutil

            shutil.rmtree(stack.pg_home, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    for service, pid in pids.items():
        assert not _alive(pid), f"{service} ({pid}) still running"
        if service != "postgres":
            assert not _group_members(pid), f"{service}'s process group still has members"
    leftovers = [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
                 if str(folder) in line or f":{ports['mlflow']}" in line or f"-p {ports['s3']}" in line]
    assert not leftovers, leftovers
    assert stack.recorded() == {}
