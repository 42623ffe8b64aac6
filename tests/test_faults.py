"""Faults, each with nothing lost: a server the update loop needs stops in the middle of
its work. The command fails in bounded time with one line naming the server; once the
server is back, the next run resumes and nothing is lost or done twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from support.common import REPO, free_port, venv_bin
from support.projects import make_project, sh, stages_ran
from support.stream import SETUP, STREAM_TINY, classifier_versions, task_stages

from devtools.scratch import project_env

pytestmark = pytest.mark.slow


def _wait_until(ready, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not ready():
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in {timeout:.0f} s" + (f"\n{log.read_text()[-2000:]}" if log else ""))
        time.sleep(0.02)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Stop ``process`` (started with start_new_session) and its whole group, by PID."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    process.wait(timeout=30)


# ---------------------------------------------------------------------------- MLflow server


def _start_mlflow(port: int, store: Path) -> subprocess.Popen:
    """`mlflow server` on ``port`` with its state in ``store`` (sqlite + artifacts folder):
    started again on the same port and store, it is the same server to its clients."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{venv_bin()}{os.pathsep}{os.environ['PATH']}"}
    log = store / f"server-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(venv_bin() / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store / 'server.db'}", "--artifacts-destination", str(store / "artifacts")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), "mlflow server", 180, server, log)
    except BaseException:
        _stop(server)
        raise
    return server


class _Relay:
    """A TCP relay on loopback ``port`` in front of the MLflow server on ``target``: the
    address the pipeline knows the server by. With ``cut_after``: once the server has
    answered a request holding those bytes, the client's next request closes the relay's
    port and every connection and calls ``on_cut`` (which stops the server). To the
    pipeline, the server died right after that request; no timing is left to chance.
    ``cut_after`` may be set later (arming the relay once the stage of interest runs)."""

    def __init__(self, port: int, target: int, cut_after: bytes | None = None, on_cut=None):
        self.target, self.cut_after, self.on_cut = target, cut_after, on_cut
        self.listener = socket.create_server(("127.0.0.1", port))
        self.answered = threading.Event()
        self.cut_at: float | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = [self.listener]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            marked = threading.Event()
            threading.Thread(target=self._up, args=(client, server, marked), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, marked), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, marked: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if self.answered.is_set():
                    self._cut()
                    return
                if self.cut_after and self.cut_after in data:
                    marked.set()
                server.sendall(data)
        except OSError:
            pass

    def _down(self, server: socket.socket, client: socket.socket, marked: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                client.sendall(data)
                if marked.is_set():
                    self.answered.set()
        except OSError:
            pass
        with self._lock:
            if not self._closed:
                client.close()

    def _cut(self) -> None:
        with self._lock:
            if self.cut_at is not None:
                return
            self.cut_at = time.monotonic()
        # The port first: from now on a connection is refused, as by a stopped server.
        self.close()
        self.on_cut()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _tree_digests(root: Path, paths: list[str]) -> dict[str, str]:
    digests = {}
    for rel in paths:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digests[file.relative_to(root).as_posix()] = hashlib.md5(file.read_bytes()).hexdigest()
    return digests


def _lock_outs(root: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: [out["path"] for out in stage.get("outs", [])] for name, stage in stages.items()}


def test_mlflow_server_lost_after_registering_a_version_then_back(tmp_path, monkeypatch):
    """The server stops during evaluate@01, right after it registered task 1's classifier
    version (the moment a careless retry would register a second one)."""
    source = tmp_path / "source"
    source.mkdir()
    store = tmp_path / "mlflow-server"
    store.mkdir()
    # Small bounds on every MLflow request and on the check before each step: the failure
    # comes in seconds (tracking.* are the knobs a user has).
    root = make_project(tmp_path / "repo", STREAM_TINY, "experiment=stream_demo", f"dataset.source={source}",
                        "tracking.retries=1", "tracking.retry_backoff_s=0", "tracking.connect_timeout_s=2")
    port, server_port = free_port(), free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sh(root, "recall", "stream-demo", str(source), "--batches", "3", "--next")

    server = _start_mlflow(server_port, store)
    relay = _Relay(port, server_port, on_cut=lambda first=server: _stop(first))
    update = watchdog = None
    seen = []
    try:
        update = subprocess.Popen(
            ["recall", "update"], cwd=root, env=project_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        watchdog = threading.Timer(900, lambda: _stop(update))
        watchdog.start()
        for line in update.stdout:
            seen.append(line)
            # generators@01 registers a version too (the generator bank); evaluate@01 the classifier.
            if line.startswith("Running stage 'evaluate@01'"):
                relay.cut_after = b"/mlflow/model-versions/create"
        update.wait()
        ended = time.monotonic()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        relay.close()
        if update is not None and update.poll() is None:
            _stop(update)
        _stop(server)
    output = "".join(seen)

    assert relay.cut_at is not None, f"no model version was registered:\n{output}"
    assert update.returncode != 0, output
    # Bounded: MLflow's one retry of a refused connection, the step's exit, DVC's.
    assert ended - relay.cut_at < 60, f"{ended - relay.cut_at:.0f} s after the server stopped"
    completed = SETUP | task_stages(1) - {"evaluate@01"}
    assert stages_ran(output) == completed | {"evaluate@01"}, output
    # One line says what happened and what to do; DVC adds which stage failed.
    errors = [line for line in output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 2 and errors[1].startswith("ERROR: failed to reproduce 'evaluate@01'"), output
    line = errors[0]
    assert uri in line, line
    assert line.startswith("error: MLflow tracking server") and "stopped answering during step task-01/evaluate" in line, line
    assert "connection refused" in line and "MLFLOW_TRACKING_URI" in line and "recall update" in line, line
    assert "Traceback" not in output and "Max retries exceeded" not in output, output
    assert "exited with 75" in output, output  # "try again later", as for a server down at the start

    # Every stage before the interrupted one is recorded and its outputs are as recorded.
    outs = _lock_outs(root)
    assert set(outs) == completed, sorted(outs)
    status = json.loads(sh(root, "dvc", "status", "--json").stdout)
    assert {name.rsplit(":", 1)[-1] for name in status} <= {"evaluate@01", "report"}, status
    before = _tree_digests(root, [path for paths in outs.values() for path in paths])

    # The server is back, on the same address with the same store.
    server = _start_mlflow(server_port, store)
    relay = _Relay(port, server_port)
    try:
        resumed = sh(root, "recall", "update")
        assert stages_ran(resumed.stdout) == {"evaluate@01", "report"}, resumed.stdout
        assert _tree_digests(root, list(before)) == before
        assert "up to date" in sh(root, "dvc", "status").stdout
        versions = classifier_versions(root)
        # The version registered before the fault is the one and only: the retry found it
        # by its inputs and finished its gate decision.
        assert len(versions) == 1, [(v.version, v.tags) for v in versions]
        version = versions[0]
        assert version.version == "1" and version.tags["task"] == "1" and version.tags["gate"] in {"passed", "rejected"}
        from mlflow.tracking import MlflowClient

        assert MlflowClient(uri).get_model_version_by_alias(version.name, "task-1").version == "1"
    finally:
        relay.close()
        _stop(server)


# ---------------------------------------------------------------------------- S3 server

BUCKET = "recall-faults"


def _start_moto(port: int, log: Path) -> subprocess.Popen:
    """moto's S3 server on ``port``, logging every request it has answered into ``log``."""
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [str(venv_bin() / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_until(lambda: _answers(f"http://127.0.0.1:{port}/moto-api/"), "moto_server", 60, server, log)
    except BaseException:
        _stop(server)
        raise
    return server


def _upload(endpoint: str, files: dict[str, bytes]) -> None:
    """As a producer does: the bucket, every object (16 at a time), then each batch's _READY."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=16))
    client.create_bucket(Bucket=BUCKET)
    ready = [key for key in files if key.endswith("/_READY")]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=files[key]),
                      [key for key in files if key not in ready]))
    for key in ready:
        client.put_object(Bucket=BUCKET, Key=key, Body=files[key])


def _batch(batch: str, classes: list[str], per_class: int) -> dict[str, bytes]:
    files = {f"incoming/{batch}/{name}/{i:05d}.png": f"{batch} {name} {i}".encode() for name in classes for i in range(per_class)}
    return {**files, f"incoming/{batch}/_READY": b""}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*.tmp"))


def test_s3_server_lost_during_ingest_leaves_the_ledger_as_it_was(project, tmp_path, monkeypatch):
    """The S3 server is killed while `recall ingest` pages through a batch of 3000 images."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path / "moto.log"
    first = _batch("batch-001", ["red_circle", "blue_star"], 5)
    # 3001 objects: four list pages of at most 1000; the ETags give the MD5s, so the scan
    # is all listing.
    big = _batch("batch-002", ["green_square", "yellow_cross", "purple_star"], 1000)
    ingest = [str(venv_bin() / "recall"), "ingest", "dataset=stream", f"dataset.source=s3://{BUCKET}/incoming",
              f"dataset.endpoint_url={endpoint}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    moto = _start_moto(port, log)
    process = None
    try:
        _upload(endpoint, first)
        done = subprocess.run(ingest, cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "batch-001: task 1" in done.stdout, done.stdout + done.stderr
        ledger = project / "ledger.yaml"
        before = ledger.read_bytes()
        manifests = sorted(p.name for p in (project / "data/tasks").iterdir())
        assert manifests == ["task-01.json"]

        _upload(endpoint, big)
        listed = "prefix=incoming/batch-002/"
        start = log.stat().st_size
        process = subprocess.Popen(ingest, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        # Killed once it has answered the first page of the batch's listing: mid-scan
        # (each page of 1000 keys takes moto a few hundred ms; the log is read every 20 ms).
        with open(log) as requests:
            requests.seek(start)
            tail = [""]  # what was read last, and the line it may have cut in two

            def first_page_answered() -> bool:
                tail[0] = tail[0][-200:] + requests.read()
                return listed in tail[0]

            _wait_until(first_page_answered, "the batch's first list page", 120, process)
        _stop(moto)
        killed = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        if process is not None and process.poll() is None:
            _stop(process)
        _stop(moto)
    pages = log.read_text()[start:].count(listed)
    assert 1 <= pages < 4, f"{pages} of the batch's 4 list pages were answered: the scan was not interrupted"

    # 75: the server may be back in a minute (the scheduled flow retries), in seconds.
    assert process.returncode == 75, stdout + stderr
    assert seconds < 30, f"{seconds:.0f} s after the server was killed"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: S3 endpoint") and endpoint in lines[0] and f"'{BUCKET}'" in lines[0], lines[0]
    assert "does not answer" in lines[0] and "testing" not in lines[0], lines[0]
    assert "batch-002" not in stdout, stdout
    # Nothing of the interrupted ingest anywhere: the ledger as it was, no task manifest,
    # no half-written file.
    assert ledger.read_bytes() == before
    assert sorted(p.name for p in (project / "data/tasks").iterdir()) == manifests
    assert _leftovers(project) == []

    # A new server (moto keeps nothing: the producer lands both batches again); the next
    # ingest takes the batch as if nothing had happened, and nothing else.
    moto = _start_moto(port, log)
    try:
        _upload(endpoint, {**first, **big})
        again = subprocess.run(ingest, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    finally:
        _stop(moto)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines() == ["batch-002: task 2, 3 classes (green square, purple star, yellow cross), 2400 train / 600 test images"], again.stdout
    entries = yaml.safe_load(ledger.read_text())["entries"]
    assert entries[0] == yaml.safe_load(before)["entries"][0]
    assert [(e["batch"], e["status"], e.get("task")) for e in entries] == [("batch-001", "accepted", 1), ("batch-002", "accepted", 2)]
    manifest = yaml.safe_load((project / "data/tasks/task-02.json").read_text())
    assert len(manifest["files"]) == 3000
    assert _leftovers(project) == []
