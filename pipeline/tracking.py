"""MLflow tracking used by every step.

One experiment per (dataset, backbone). One parent run per pipeline run, found again by
every step process through its ``recall.pipeline_key`` tag; one child run per step
execution, tagged with step and task. The default store is a sqlite file inside the
project; ``tracking.uri`` in config, else ``MLFLOW_TRACKING_URI``, switches to a server.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.compat import disable_telemetry
from pipeline.config import Config
from pipeline.errors import Unavailable

log = logging.getLogger(__name__)

PIPELINE_KEY_TAG = "recall.pipeline_key"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# The MLflow UI opens a model-training experiment on its runs and charts, not on GenAI traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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


def redact_uri(uri: str) -> str:
    """``uri`` without any user:password part, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


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
                f"{redact_uri(uri)} (from {origin}) answers, but not as an MLflow tracking server "
                "(HTTP 404 for /health); check the host, port and any path prefix in the URI"
            ) from None
        if reason is None:
            return
        log.debug("MLflow server %s: try %d of %d: %s", redact_uri(uri), attempt + 1, tries, reason)
        if attempt + 1 < tries:
            time.sleep(tracking.retry_backoff_s * 2**attempt)
    raise TrackingServerError(
        f"MLflow tracking server {redact_uri(uri)} (from {origin}) does not answer: {reason} "
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
        f"MLflow tracking server {redact_uri(uri)} (from {origin}) stopped answering during {during}: {reason}. "
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


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"recall-{cfg.dataset.name}-{cfg.backbone.name}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=project_root(), timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pipeline_key(cfg: Config) -> str:
    """What identifies one pipeline run across the step processes that make it up.

    An orchestrator can name it (``RECALL_PIPELINE_RUN``); a DVC experiment is named by
    DVC; a plain ``dvc repro`` is identified by its config and code version.
    """
    if explicit := os.environ.get("RECALL_PIPELINE_RUN"):
        return explicit
    if dvc_exp := os.environ.get("DVC_EXP_NAME"):
        return f"dvc-exp:{dvc_exp}"
    return f"config:{cfg.fingerprint()}@{(git_commit() or 'nogit')[:12]}"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def content_md5(path: Path) -> str:
    import hashlib
    import json

    from pipeline.io import file_digest

    if path.is_file():
        return file_digest(path, "md5")
    entries = [
        {"md5": file_digest(f, "md5"), "relpath": f.relative_to(path).as_posix()}
        for f in sorted(path.rglob("*")) if f.is_file()
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


class StepRun:
    """The MLflow run of one step execution."""

    def __init__(self, client, run_id: str, parent_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id

    def log_pipeline_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Also on the pipeline (parent) run, where one chart then shows a metric over all
        tasks instead of one point per task run."""
        if self.parent_id is not None:
            self._log_numbers(self.parent_id, metrics, step)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log_numbers(self.run_id, metrics, step)

    def _log_numbers(self, run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(run_id, key, float(value), step=step or 0)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in _flatten(params).items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def record_inputs(self, **paths: str | Path) -> None:
        """Lineage: a ``recall.input_md5.<name>`` tag per input read (md5 of a file, as DVC
        hashes files; for a folder, md5 over its files' relative paths and md5s)."""
        for name, path in paths.items():
            path = Path(path)
            if path.exists():
                self.set_tag(f"recall.input_md5.{name}", content_md5(path))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def register_model(self, name: str, files: list[str | Path], tags: Mapping[str, Any], *,
                       input_digest: str, lineage) -> str:
        """Log ``files`` under ``model/`` and register them as a new version of ``name``,
        unless a version from the same inputs (``input_digest``) exists: that one is reused."""
        from pipeline.registry import INPUT_DIGEST_TAG, ensure_registered_model, find_version

        ensure_registered_model(self.client, name, lineage)
        existing = find_version(self.client, name, input_digest)
        if existing is not None:
            log.info("%s: inputs identical to version %s; reusing it", name, existing.version)
            self.set_tag(f"recall.registered.{name}", existing.version)
            self.set_tag(f"recall.reused.{name}", existing.version)
            return existing.version
        for path in files:
            self.log_artifact(path, "model")
        version = self.client.create_model_version(
            name, source=f"runs:/{self.run_id}/model", run_id=self.run_id,
            tags={**{k: str(v) for k, v in tags.items()}, INPUT_DIGEST_TAG: input_digest},
        )
        self.set_tag(f"recall.registered.{name}", version.version)
        return version.version


class Tracker:
    def __init__(self, cfg: Config):
        disable_telemetry()
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        # Before any MLflow call: a down server is one clear line in seconds, not minutes
        # of MLflow's retries ending in a urllib3 traceback.
        bound_mlflow_retries(cfg.tracking)
        check_tracking_server(self.uri, cfg.tracking, tracking_uri_origin(cfg))
        self.client = MlflowClient(tracking_uri=self.uri)
        with self.server_errors("the step's start"):
            self.experiment_id = self._experiment()
        self.commit = git_commit()

    @contextlib.contextmanager
    def server_errors(self, during: str) -> Iterator[None]:
        """A server that stops answering half-way through a step (after MLflow's own
        bounded retries) becomes one TrackingServerError line naming it (the CLI exits 75),
        instead of an MlflowException that ends in urllib3's "Max retries exceeded"."""
        try:
            yield
        except TrackingServerError:
            raise
        except Exception as exc:
            error = lost_server_error(exc, self.uri, self.cfg.tracking, tracking_uri_origin(self.cfg), during)
            if error is None:
                raise
            raise error from exc

    def _experiment(self) -> str:
        name = experiment_name(self.cfg)
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return existing.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:"):
            artifact_location = (project_root() / LOCAL_ARTIFACTS).as_uri()
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except Exception:
            # Another step process created it in the meantime.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _common_tags(self) -> dict[str, str]:
        tags = {
            "recall.dataset": self.cfg.dataset.name,
            "recall.backbone": self.cfg.backbone.name,
            "recall.method": self.cfg.method.name,
            "recall.config_hash": self.cfg.fingerprint(),
        }
        if self.commit:
            tags["mlflow.source.git.commit"] = self.commit
        return tags

    @functools.cached_property
    def lineage(self):
        """Read on first use: steps before the split and backbone exist register nothing."""
        from pipeline.registry import lineage_of

        return lineage_of(self.cfg)

    def model_name(self, kind: str) -> str:
        """Registered model name: one per (experiment, lineage) and kind."""
        return self.lineage.model_name(experiment_name(self.cfg), kind)

    def version_tags(self, task: int) -> dict[str, str]:
        from pipeline.registry import LINEAGE_TAG

        return {
            "task": str(task),
            "dataset": self.cfg.dataset.name,
            "backbone": self.cfg.backbone.name,
            "method": self.cfg.method.name,
            "seed": str(self.cfg.seed),
            LINEAGE_TAG: self.lineage.key,
            "git_commit": self.commit or "unknown",
        }

    def parent_run_id(self) -> str:
        key = pipeline_key(self.cfg)
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'", max_results=1
        )
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.cfg.method.name} seed={self.cfg.seed} ({self.cfg.dataset.name}/{self.cfg.backbone.name})",
            tags={**self._common_tags(), PIPELINE_KEY_TAG: key, "recall.role": "pipeline"},
        )
        self.client.log_param(run.info.run_id, "seed", self.cfg.seed)
        return run.info.run_id

    @contextlib.contextmanager
    def step(self, name: str, task: int | None = None, params: Mapping[str, Any] | None = None) -> Iterator[StepRun]:
        run_name = f"task-{task:02d}/{name}" if task is not None else name
        during = f"step {run_name}"
        with self.server_errors(during):
            parent = self.parent_run_id()
            tags = {
                **self._common_tags(),
                "mlflow.parentRunId": parent,
                "recall.role": "step",
                "recall.step": name,
            }
            if task is not None:
                tags["recall.task"] = str(task)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.client.update_run(parent, status="RUNNING")
            step_run = StepRun(self.client, run.info.run_id, parent)
            if params:
                step_run.log_params(params)
        status = "FAILED"
        try:
            with self.server_errors(during):
                yield step_run
            status = "FINISHED"
        finally:
            try:
                with self.server_errors(during):
                    self.client.set_terminated(run.info.run_id, status)
                    self.client.set_terminated(parent, status)
            except TrackingServerError:
                # The step failed already (often because of this same server): its own
                # error is the one to report. The runs stay RUNNING in MLflow.
                if status == "FINISHED":
                    raise
