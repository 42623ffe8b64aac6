"""Real servers on loopback for tests, benchmarks and development: an S3 API (moto's
server) today; each started on a free port and stopped by PID.
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
