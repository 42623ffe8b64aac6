"""Sharing state between machines through the DVC remote (design §7): `recall remote`,
and two checkouts that share nothing but the git repo, an S3 remote and an MLflow server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from support.common import REPO, free_port
from support.projects import stages_ran
from support.stream import BUCKET, upload_batch
from typer.testing import CliRunner

from devtools.scratch import project_env
from devtools.servers import moto_server

# Sentinels standing in for real credentials: none of them may ever reach .dvc/config.
KEY_ID, SECRET, REGION = "AKIATESTSENTINEL", "sentinel-secret-value", "eu-west-3"


def _config_text(project: Path) -> str:
    return (project / ".dvc" / "config").read_text()


def _repo_config(project: Path) -> dict:
    from dvc.config import Config

    return Config(dvc_dir=str(project / ".dvc"), validate=False).load_one("repo")


@pytest.fixture
def dvc_project(tmp_path, monkeypatch) -> Path:
    """An empty DVC project as the working directory, with credentials in the environment."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    root.mkdir()
    Repo.init(str(root), no_scm=True).close()
    monkeypatch.chdir(root)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # Nothing of this machine's own AWS setup may take part.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return root


def _recall(*args: str):
    from pipeline.cli import app

    return CliRunner().invoke(app, list(args))


def _assert_no_secrets(project: Path) -> None:
    text = _config_text(project)
    for leak in (KEY_ID, SECRET, REGION, "access_key", "secret", "session_token", "region", "profile"):
        assert leak not in text, f"{leak!r} in .dvc/config:\n{text}"


# ---------------------------------------------------------------------------- recall remote


def test_remote_writes_the_default_s3_remote_and_its_endpoint_only(dvc_project):
    result = _recall("remote", "s3://recall-state/dvc/", "--endpoint-url", "http://127.0.0.1:9000", "--no-check")
    assert result.exit_code == 0, result.output
    config = _repo_config(dvc_project)
    assert config["core"]["remote"] == "storage"
    assert config["remote"] == {"storage": {"url": "s3://recall-state/dvc", "endpointurl": "http://127.0.0.1:9000"}}
    _assert_no_secrets(dvc_project)
    # DVC has no setting that makes push/pull carry the run cache: the printed commands say it.
    assert "dvc push --run-cache" in result.output and "dvc pull --run-cache --allow-missing" in result.output
    assert "s3://recall-state/dvc" in result.output and "http://127.0.0.1:9000" in result.output


def test_remote_again_replaces_the_default_and_keeps_local_paths_relative(dvc_project):
    assert _recall("remote", "s3://recall-state/dvc", "--endpoint-url", "http://minio:9000", "--no-check").exit_code == 0
    result = _recall("remote", "../shared-remote", "--name", "local")
    assert result.exit_code == 0, result.output
    config = _repo_config(dvc_project)
    assert config["core"]["remote"] == "local"
    # A relative folder is stored relative to .dvc/, as `dvc remote add` does: portable.
    assert "url = ../../shared-remote" in _config_text(dvc_project)
    assert set(config["remote"]) == {"storage", "local"}
    # Re-adding a remote replaces its whole section: no stale endpoint survives.
    assert _recall("remote", "s3://other-bucket", "--no-check").exit_code == 0
    assert _repo_config(dvc_project)["remote"]["storage"] == {"url": "s3://other-bucket"}
    _assert_no_secrets(dvc_project)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://", "not an S3 bucket name"),
        ("s3://Bad_Bucket/prefix", "not an S3 bucket name"),
        ("s3://b/prefix", "not an S3 bucket name"),
        ("gs://bucket/prefix", "unsupported scheme gs://"),
        ("https://example.com/store", "unsupported scheme https://"),
        ("s3://bucket/prefix?versionId=3", "without '?'"),
    ],
)
def test_remote_refuses_a_bad_url_naming_it(dvc_project, url, expected):
    before = _config_text(dvc_project)
    result = _recall("remote", url, "--no-check")
    assert result.exit_code == 2
    assert url in result.output and expected in result.output, result.output
    assert _config_text(dvc_project) == before


@pytest.mark.parametrize(
    "args",
    [
        ("s3://AKIAEMBEDDED:topsecret@bucket/dvc",),
        ("s3://bucket/dvc", "--endpoint-url", "http://AKIAEMBEDDED:topsecret@minio:9000"),
        ("s3://bucket/dvc", "--endpoint-url", "http://minio:9000/?X-Amz-Credential=AKIAEMBEDDED"),
    ],
)
def test_remote_refuses_credentials_without_repeating_them(dvc_project, args):
    before = _config_text(dvc_project)
    result = _recall("remote", *args, "--no-check")
    assert result.exit_code == 2
    assert "carries credentials" in result.output and "AWS environment" in result.output, result.output
    assert "topsecret" not in result.output and "AKIAEMBEDDED" not in result.output
    assert _config_text(dvc_project) == before


def test_remote_refuses_while_the_shared_config_holds_a_secret(dvc_project):
    config = dvc_project / ".dvc" / "config"
    config.write_text(
        "['remote \"old\"']\n    url = s3://old-bucket\n    secret_access_key = example-not-a-real-secret\n    region = us-east-2\n"
    )
    result = _recall("remote", "s3://recall-state/dvc", "--no-check")
    assert result.exit_code == 2
    assert "remote 'old' option secret_access_key" in result.output and "region" in result.output, result.output
    assert "example-not-a-real-secret" not in result.output
    assert "recall-state" not in config.read_text()  # nothing written


def test_remote_check_names_bucket_and_endpoint_when_unreachable(dvc_project):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = _recall("remote", "s3://recall-state/dvc", "--endpoint-url", endpoint)
    assert time.monotonic() - started < 30
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "'recall-state'" in line and endpoint in line and "--no-check" in line, line
    assert "recall-state" not in _config_text(dvc_project)


def test_remote_outside_a_dvc_project_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _recall("remote", "s3://recall-state/dvc", "--no-check")
    assert result.exit_code == 2 and "not inside a DVC project" in result.output


# ---------------------------------------------------------------------------- two machines


# The stream from an S3 source: machine A runs task 1, machine B (a clone) task 2.
TASK_1_AND_BEFORE = {
    "prepare", "split", "backbone", "prompts-init", "replay-init",
    "intake@01", "generators@01", "replay@01", "novelty@01", "finetune@01", "evaluate@01", "report",
}
# Everything that grows is chained, so task 2 needs nothing of task 1 but its outputs.
TASK_2_AND_REPORT = {"split", "intake@02", "generators@02", "replay@02", "novelty@02", "finetune@02", "evaluate@02", "report"}


@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch):
    """A real S3 API (moto's server) on a free loopback port with one empty bucket, and
    dummy credentials in the environment as every AWS client reads them. Stopped by PID."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto_server(tmp_path) as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(autouse=True)
def _this_code_in_subprocesses(monkeypatch):
    """The `recall` console script imports the package its editable install points at, not
    the copy in a checkout (a console script's sys.path starts at its bin folder, not the
    cwd). Autouse, so that even the `repo` fixture's own commands run the code under test."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def sh(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    # Each checkout runs its own copy of the code, as a real machine would.
    env = {**project_env(root), "PYTHONPATH": str(root)}
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result




@pytest.mark.slow
def test_a_fresh_clone_pulls_task_1_and_runs_only_task_2(stream_repo, tmp_path, s3_endpoint, mlflow_server, monkeypatch):
    import boto3

    server_uri, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    machine_a, _ = stream_repo
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    batches = tmp_path / "batches"
    sh(machine_a, "recall", "stream-demo", str(batches), "--batches", "3")
    # The stream's images and its authoritative ledger in the bucket. Registering a pyfunc
    # version per task costs seconds and is tested elsewhere.
    sh(machine_a, "recall", "compose-params", "experiment=stream_demo", f"dataset.source=s3://{BUCKET}/incoming",
        f"dataset.endpoint_url={s3_endpoint}", f"dataset.ledger_uri=s3://{BUCKET}/recall-state/ledger",
        "tracking.register_classifier=false")

    # Machine A: point the project at the bucket, run task 1, share it.
    configured = sh(machine_a, "recall", "remote", f"s3://{BUCKET}/dvc", "--endpoint-url", s3_endpoint)
    push, pull = ("dvc push --run-cache", "dvc pull --run-cache --allow-missing")
    assert push in configured.stdout and pull in configured.stdout
    sh(machine_a, "git", "add", "-A")
    sh(machine_a, "git", "commit", "-qm", "shared remote")
    upload_batch(client, batches, "batch-001")
    commit_a = sh(machine_a, "git", "rev-parse", "HEAD").stdout.strip()
    assert stages_ran(sh(machine_a, "recall", "update").stdout) == TASK_1_AND_BEFORE
    sh(machine_a, *push.split())
    # dvc.lock, the ledger, the task manifest, params.yaml (its task count) and the `cache:
    # false` outputs (split, metrics, evaluations) that the remote does not hold: DVC
    # already git-ignores the cached ones, so `git add -A` is the habit.
    sh(machine_a, "git", "add", "-A")
    sh(machine_a, "git", "commit", "-qm", "task 1")
    origin = tmp_path / "origin.git"
    sh(tmp_path, "git", "init", "-q", "--bare", str(origin))
    sh(machine_a, "git", "push", "-q", str(origin), "HEAD:refs/heads/main")

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.startswith("dvc/files/md5/") for k in keys) and any(k.startswith("dvc/runs/") for k in keys), keys
    assert "recall-state/ledger/entry-000001.json" in keys

    # Machine B: nothing but a clone, the bucket and the MLflow server. Batch 2 lands, and
    # batch 1's images are deleted from the source: machine B never needs them.
    machine_b = tmp_path / "machine-b"
    sh(tmp_path, "git", "clone", "-q", "-b", "main", str(origin), str(machine_b))
    assert not (machine_b / ".dvc" / "cache").exists()
    sh(machine_b, *pull.split())
    upload_batch(client, batches, "batch-002")
    for key in [k for k in keys if k.startswith("incoming/batch-001/")]:
        client.delete_object(Bucket=BUCKET, Key=key)
    commit_b = sh(machine_b, "git", "rev-parse", "HEAD").stdout.strip()
    rerun = sh(machine_b, "recall", "update")
    assert stages_ran(rerun.stdout) == TASK_2_AND_REPORT, rerun.stdout
    assert "up to date" in sh(machine_b, "dvc", "status").stdout
    assert (machine_b / "metrics" / "report.json").exists()
    assert "recall-state/ledger/entry-000002.json" in [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]

    for machine in (machine_a, machine_b):
        text = _config_text(machine)
        assert s3_endpoint in text
        assert "testing" not in text and "access_key" not in text and "region" not in text, text

    # One MLflow store holds both machines' runs (each tagged with the commit it ran at).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server_uri)
    experiment = client.get_experiment_by_name("recall-stream-tiny")
    steps = [r for r in client.search_runs([experiment.experiment_id], max_results=1000) if r.data.tags.get("recall.role") == "step"]
    by_commit = {}
    for run in steps:
        by_commit.setdefault(run.data.tags.get("mlflow.source.git.commit"), set()).add(run.info.run_name)
    assert {"task-01/evaluate", "task-01/finetune"} <= by_commit[commit_a]
    assert {"task-02/evaluate", "task-02/finetune", "report"} <= by_commit[commit_b]
    assert not any(name.startswith("task-01") for name in by_commit[commit_b])
