"""One MLflow run per pipeline step: its parameters, metrics, tags and artifacts, grouped by
the pipeline key, and the registered model versions a step produces.
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
from pipeline.config.task_chain import task_stem
from pipeline.tracking.lineage import experiment_name
from pipeline.tracking.server import (
    LOCAL_ARTIFACTS,
    TrackingServerError,
    bound_mlflow_retries,
    check_tracking_server,
    lost_server_error,
    project_root,
    tracking_uri,
    tracking_uri_origin,
)

log = logging.getLogger(__name__)


PIPELINE_KEY_TAG = "recall.pipeline_key"


# The MLflow UI opens a model-training experiment on its runs and charts, not on GenAI traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


EXPERIMENT_KIND = "custom_model_development"


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
        from pipeline.tracking.lineage import INPUT_DIGEST_TAG
        from pipeline.tracking.registry import ensure_registered_model, find_version

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
        from pipeline.tracking.lineage import lineage_of

        return lineage_of(self.cfg)

    def model_name(self, kind: str) -> str:
        """Registered model name: one per (experiment, lineage) and kind."""
        return self.lineage.model_name(experiment_name(self.cfg), kind)

    def version_tags(self, task: int) -> dict[str, str]:
        from pipeline.tracking.lineage import LINEAGE_TAG

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
        run_name = f"{task_stem(task)}/{name}" if task is not None else name
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
