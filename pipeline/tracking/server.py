"""Where runs go and whether it answers: the tracking URI (a local store in the project, or a
server), a fast health check with a clear error, bounded retries, and URLs without
credentials for messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import Unavailable, redact_url

log = logging.getLogger(__name__)


LOCAL_DB = "mlflow.db"


LOCAL_ARTIFACTS = "mlartifacts"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return f"sqlite:///{project_root() / LOCAL_DB}"


def tracking_uri_origin(cfg: Config) -> str:
    """Where ``tracking_uri`` took its value from, in the words a user sets it with."""
    if cfg.tracking.uri:
        return "tracking.uri in the params"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "the default local store"


class TrackingServerError(Unavailable):
    """The MLflow tracking server a step needs does not answer (the CLI exits 75: try later)."""


# MLflow's own bounds on each REST request it makes (its defaults: 7 retries with backoff
# factor 2, about four minutes before a down server surfaces as an error).
_MLFLOW_RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


_retry_env_set_here: dict[str, str] = {}


def bound_mlflow_retries(tracking) -> None:
    """Make MLflow's request retries follow ``tracking.retries`` / ``retry_backoff_s``.

    A value the operator put in the environment wins; one this process set for an earlier
    config is replaced, so config changes between steps in one process take effect."""
    wanted = dict(zip(_MLFLOW_RETRY_ENV, (str(tracking.retries), str(tracking.retry_backoff_s))))
    for key, value in wanted.items():
        current = os.environ.get(key)
        if current is None or _retry_env_set_here.get(key) == current:
            os.environ[key] = value
            _retry_env_set_here[key] = value


class _NotMlflow(Exception):
    pass


def _probe(url: str, timeout: float) -> str | None:
    """None if the server answers at ``url`` (a 401 or 403 from an auth proxy still proves
    it is up); else why not, in a few words. Raises _NotMlflow for a 404: something else
    listens there, and retrying will not change that."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise _NotMlflow() from None
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, OSError) and reason.strerror:
            return reason.strerror.lower()
        return str(reason)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__


def _health_url(uri: str) -> str:
    """The server's /health URL, without any user:password part (urllib would take it for
    the host name); /health needs no credentials, and a 401 still proves the server answers."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc, path=parts.path.rstrip("/") + "/health", query="", fragment=""))


def check_tracking_server(uri: str, tracking, origin: str = "tracking.uri or MLFLOW_TRACKING_URI") -> None:
    """Raise TrackingServerError, in bounded time, if ``uri`` is an http(s) MLflow server
    that does not answer. Other stores (sqlite, file) need no server."""
    import time

    if not uri.lower().startswith(("http://", "https://")):
        return
    url = _health_url(uri)
    tries = tracking.retries + 1
    started = time.monotonic()
    for attempt in range(tries):
        try:
            reason = _probe(url, tracking.connect_timeout_s)
        except _NotMlflow:
            raise TrackingServerError(
                f"{redact_url(uri)} (from {origin}) answers, but not as an MLflow tracking server "
                "(HTTP 404 for /health); check the host, port and any path prefix in the URI"
            ) from None
        if reason is None:
            return
        log.debug("MLflow server %s: try %d of %d: %s", redact_url(uri), attempt + 1, tries, reason)
        if attempt + 1 < tries:
            time.sleep(tracking.retry_backoff_s * 2**attempt)
    raise TrackingServerError(
        f"MLflow tracking server {redact_url(uri)} (from {origin}) does not answer: {reason} "
        f"({tries} {'try' if tries == 1 else 'tries'} in {time.monotonic() - started:.0f} s). Start it (`make stack` runs one on this "
        "machine), or point tracking.uri / MLFLOW_TRACKING_URI at a running server, or unset both "
        "for the local sqlite store"
    )


def _looks_like_a_lost_server(exc: BaseException) -> bool:
    """Whether ``exc`` is MLflow failing to get an answer from a server (after its own
    retries), not an answer it got: MLflow wraps every failed REST request into an
    MlflowException "API request to <url> failed with ...", whose context is requests'
    (urllib3's) ConnectionError; artifact uploads may raise requests' errors as they are."""
    import requests
    from mlflow.exceptions import MlflowException

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if isinstance(exc, MlflowException) and str(exc.message).startswith("API request to "):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def lost_server_error(exc: BaseException, uri: str, tracking, origin: str, during: str) -> TrackingServerError | None:
    """A TrackingServerError for ``exc`` if it is a request to the http(s) server ``uri``
    that got no answer and the server still does not answer (one /health probe); else None
    (the server answered, or came back: the original error stands)."""
    if not uri.lower().startswith(("http://", "https://")) or not _looks_like_a_lost_server(exc):
        return None
    try:
        reason = _probe(_health_url(uri), tracking.connect_timeout_s)
    except _NotMlflow:
        reason = "HTTP 404 for /health"
    if reason is None:
        return None
    return TrackingServerError(
        f"MLflow tracking server {redact_url(uri)} (from {origin}) stopped answering during {during}: {reason}. "
        "Start it again (`make stack` runs one on this machine) or point tracking.uri / MLFLOW_TRACKING_URI at "
        "a running server, then rerun `recall update` or `dvc repro`: it resumes at this stage, and a model "
        "version registered before the failure is reused, not registered twice"
    )


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model, load_model) pointed at ``uri`` for a
    while. ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` for the whole
    process; both are put back afterwards so nothing leaks into later steps."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, previous_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
