"""Failing clearly and in bounded time: a tracking server that is down, a corrupt artifact,
an unexpected exception. Each ends in one line on stderr that says what to do."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from support.common import REPO, TINY, free_port, venv_bin


def _recall(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    started = time.monotonic()
    result = subprocess.run(
        [str(venv_bin() / "recall"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_report_against_a_down_tracking_server_fails_in_seconds_naming_it(project):
    # A free loopback port: nothing listens there, as when the server is down. MLflow's own
    # retries took over four minutes here and ended in a urllib3 traceback.
    uri = f"http://127.0.0.1:{free_port()}"
    result, seconds = _recall("report", "seed=0", cwd=project, env={"MLFLOW_TRACKING_URI": uri})
    # 75, "try again later": the flows retry it with backoff, unlike bad input's 2.
    assert result.returncode == 75, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert uri in lines[0] and "MLFLOW_TRACKING_URI" in lines[0] and "does not answer" in lines[0]
    assert "Traceback" not in result.stderr
    # The default bounds: 4 tries, 1 + 2 + 4 s apart; the rest is the process starting.
    assert seconds < 45, f"took {seconds:.0f} s"


def test_tracking_server_check_is_bounded_by_config_and_hides_credentials():
    from pipeline.config import TrackingConfig
    from pipeline.tracking.server import TrackingServerError, check_tracking_server

    tracking = TrackingConfig(connect_timeout_s=1, retries=2, retry_backoff_s=0)
    uri = f"http://someone:s3cret@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingServerError) as caught:
        check_tracking_server(uri, tracking, "tracking.uri in the params")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "s3cret" not in message and "someone" not in message
    assert "127.0.0.1" in message and "3 tries" in message and "tracking.uri in the params" in message
    # Stores without a server are not probed.
    check_tracking_server("sqlite:///nowhere/mlflow.db", tracking)


def test_a_server_lost_mid_step_is_a_tracking_server_error_naming_it():
    """What MLflow raises when the server stops half-way through a step (after its own
    retries) becomes one TrackingServerError line; any other error is left as it is."""
    from mlflow.exceptions import MlflowException

    from pipeline.config import TrackingConfig
    from pipeline.tracking.server import lost_server_error

    tracking = TrackingConfig(connect_timeout_s=1, retries=1, retry_backoff_s=0)
    uri = f"http://someone:s3cret@127.0.0.1:{free_port()}"  # nothing listens there
    lost = MlflowException(
        f"API request to {uri}/api/2.0/mlflow/runs/set-tag failed with exception HTTPConnectionPool(host='127.0.0.1'): "
        "Max retries exceeded with url: /api/2.0/mlflow/runs/set-tag"
    )
    error = lost_server_error(lost, uri, tracking, "MLFLOW_TRACKING_URI", "step task-01/evaluate")
    from pipeline.errors import Unavailable

    assert isinstance(error, Unavailable)  # exit 75: retried
    message = str(error)
    assert "\n" not in message and "s3cret" not in message and "someone" not in message
    assert f"http://***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in message and "connection refused" in message
    assert "step task-01/evaluate" in message and "MLFLOW_TRACKING_URI" in message and "Max retries" not in message
    # The server's own answers, other errors and stores without a server stay as they are.
    assert lost_server_error(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run"), uri, tracking, "x", "y") is None
    assert lost_server_error(ValueError("bad tensor"), uri, tracking, "x", "y") is None
    assert lost_server_error(lost, "sqlite:///mlflow.db", tracking, "x", "y") is None


def test_mlflow_request_retries_follow_config_unless_the_environment_sets_them(monkeypatch):
    from pipeline.config import TrackingConfig
    from pipeline.tracking.server import bound_mlflow_retries

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "5")
    bound_mlflow_retries(TrackingConfig(retries=2, retry_backoff_s=1))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "5"  # the operator's value wins
    # A later step in the same process with other bounds: this process's own value follows.
    bound_mlflow_retries(TrackingConfig(retries=4, retry_backoff_s=1))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "4"


def test_truncated_prompt_state_names_the_file_and_the_stage_that_rebuilds_it(world):
    """The case that ended in 85 lines of traceback and `SafetensorError: ... incomplete
    metadata`, naming no file."""
    from dvc.repo import Repo

    from pipeline import config
    from pipeline.stages.prompts import run_init_prompts

    root = Path.cwd()
    # A DVC project as `make demo` has it: dvc.yaml and params.yaml decide the stage names.
    Repo.init(str(root), no_scm=True).close()
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    config.write_params(root / "params.yaml", config.compose(TINY))
    run_init_prompts(world)
    whole = (root / "models/prompts/task-00.safetensors").read_bytes()
    target = root / "models/prompts/task-01.safetensors"
    target.write_bytes(whole[: len(whole) // 2])  # as a copy cut off half way leaves it

    result, _ = _recall("evaluate", "--task", "1", cwd=root)
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "models/prompts/task-01.safetensors" in lines[0]
    assert "corrupt or truncated" in lines[0]
    assert "dvc repro -f finetune@01" in lines[0]


def test_corrupt_json_artifact_names_the_stage_from_dvc_lock(tmp_path, monkeypatch):
    from pipeline.io import CorruptArtifactError, read_json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  evaluate@03:\n    cmd: recall evaluate --task 3\n"
        "    outs:\n    - path: metrics/tasks/task-03.json\n"
    )
    broken = tmp_path / "metrics/tasks/task-03.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"task": 3, "accur')
    with pytest.raises(CorruptArtifactError) as caught:
        read_json(broken)
    assert caught.value.stage == "evaluate@03"
    assert "dvc repro -f evaluate@03" in str(caught.value)


def test_an_unexpected_exception_is_one_line_unless_verbose(monkeypatch, capsys):
    from pipeline import cli
    from pipeline.cli import core, stage_commands
    from pipeline.stages import report as report_stage

    def broken(cfg):
        raise RuntimeError("something nobody foresaw at http://user:pw@example.invalid/x\nsecond line")

    monkeypatch.setattr(report_stage, "summary", broken)
    monkeypatch.setattr(stage_commands, "load_config", lambda params, overrides: None)
    with pytest.raises(SystemExit) as exited:
        cli.app(["summary"], prog_name="recall")
    assert exited.value.code == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert lines[0] == "error: RuntimeError: something nobody foresaw at http://***@example.invalid/x"
    assert "run with -v for the traceback" in lines[1] and len(lines) == 2

    with pytest.raises(RuntimeError, match="nobody foresaw"):
        cli.app(["-v", "summary"], prog_name="recall")
    core._verbose = False
