"""Real servers on loopback for development, tests and benchmarks: moto's S3 API and
Prefect's server on a free port, stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from pipeline.compat import TELEMETRY_OFF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group started with ``start_new_session``, SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def moto_server(log_dir: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> Iterator[str]:
    """A real S3 API (moto's server) on a free loopback port; yields its endpoint URL.

    moto logs every request: into ``log_dir``, since an unread pipe would fill and stall it."""
    port = free_port()
    log_path = Path(log_dir) / f"moto_server-{port}.log"
    program = Path(sys.executable).parent / "moto_server"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [str(program), "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **(env or {})}, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        stop(server)


@contextlib.contextmanager
def mlflow_server(store: str | Path, backend_store_uri: str | None = None, timeout: float = 180) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, one worker, job execution off (it
    would fork ~7 workers); yields its URI. Backend: ``backend_store_uri``, else sqlite under
    ``store``; artifacts proxied into ``store``/artifacts; its log in ``store``."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = store / f"mlflow-server-{port}.log"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **TELEMETRY_OFF, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_store_uri or f"sqlite:///{store / 'server.db'}",
             "--artifacts-destination", str(store / "artifacts")],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", "mlflow server", log_path, lambda: server.poll() is None, timeout)
        yield uri
    finally:
        stop(server)


def prefect_env(home: str | Path, api_url: str | None = None, ui: bool = False) -> dict[str, str]:
    """Environment for Prefect programs of a local stack: state under ``home`` (a sqlite
    database), never ~/.prefect, and no telemetry."""
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{Path(home) / 'prefect.db'}",
        **TELEMETRY_OFF,
        # Tests need no UI, and serving it costs seconds at start.
        "PREFECT_UI_ENABLED": "true" if ui else "false",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect_server(home: str | Path, port: int | None = None, timeout: float = 120,
                         ui: bool = False) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on loopback (a free port unless given), logging into
    ``home``; returns the process (its own process group) and the API URL once healthy."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = home / f"prefect_server-{port}.log"
    program = Path(sys.executable).parent / "prefect"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [str(program), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            # The UI asks the API at PREFECT_UI_API_URL, which otherwise names port 4200
            # whatever --port says.
            env={**os.environ, **prefect_env(home, ui=ui), "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"},
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2):
                return server, api_url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise RuntimeError(f"prefect server did not start: {log_path.read_text()[-2000:]}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def prefect_server(home: str | Path, timeout: float = 120) -> Iterator[str]:
    """A real Prefect server (sqlite under ``home``) on a free loopback port; yields its API URL."""
    server, api_url = start_prefect_server(home, timeout=timeout)
    try:
        yield api_url
    finally:
        stop(server)


class StackError(Exception):
    """The local stack could not start or stop; the message names the service and its log."""


def wait_http(url: str, what: str, log_path: Path, alive, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if not alive() or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
                raise StackError(f"{what} did not start (log {log_path}):\n{tail}") from None
            time.sleep(0.3)
