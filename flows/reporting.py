"""What a flow run shows about the pipeline it ran: the MLflow parent run tagged with the
Prefect flow run, and per task a table of its evaluation and the gate's decision with links.

The figures are read from what the stages wrote (``<paths.evaluations>/task-NN.json``) and
from MLflow; nothing is recomputed here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

FLOW_RUN_TAG = "prefect.flow_run_id"


@contextlib.contextmanager
def _project_root(project_dir: str | Path) -> Iterator[None]:
    """pipeline.tracking resolves the local store against DVC_ROOT (else the cwd)."""
    previous = os.environ.get("DVC_ROOT")
    os.environ["DVC_ROOT"] = str(Path(project_dir).resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DVC_ROOT", None)
        else:
            os.environ["DVC_ROOT"] = previous


def project_config(project_dir: str | Path):
    from pipeline import config

    return config.load(Path(project_dir) / "params.yaml")


def tracking_uri(project_dir: str | Path) -> str:
    """The MLflow store the stages of this project log to (the same rule they use)."""
    from pipeline.tracking.server import tracking_uri as resolve

    with _project_root(project_dir):
        return resolve(project_config(project_dir))


def evaluation_file(project_dir: str | Path, key: str) -> Path:
    """The evaluate stage's output for the task with foreach key ``key`` ("03")."""
    from pipeline.config.task_chain import task_stem

    return Path(project_dir) / project_config(project_dir).paths.evaluations / f"{task_stem(int(key))}.json"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    from pipeline.compat import disable_telemetry

    disable_telemetry()
    return MlflowClient(tracking_uri=uri)


def find_parent_run(client, pipeline_run: str):
    """The pipeline's MLflow parent run, found by its key tag in any experiment."""
    from pipeline.tracking.runs import PIPELINE_KEY_TAG

    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{pipeline_run}'", max_results=1)
    return runs[0] if runs else None


def tag_parent_run(project_dir: str | Path, pipeline_run: str, flow_run_id: str) -> str | None:
    """Tag the parent run with the Prefect flow run that drove it; returns its run id, or
    None when no stage has created it (every stage was up to date)."""
    client = _client(tracking_uri(project_dir))
    parent = find_parent_run(client, pipeline_run)
    if parent is None:
        return None
    client.set_tag(parent.info.run_id, FLOW_RUN_TAG, flow_run_id)
    return parent.info.run_id


def metrics_table(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per figure of a task's evaluation."""
    rows = [
        {"metric": "step_accuracy", "value": evaluation["step_accuracy"]},
        {"metric": "calibration.ece", "value": evaluation["calibration"]["ece"]},
    ]
    rows += [{"metric": f"accuracy_row.task_{int(k):02d}", "value": v} for k, v in evaluation["accuracy_row"].items()]
    rows += [{"metric": f"novelty.{score}.auroc", "value": figures["auroc"]}
             for score, figures in (evaluation.get("novelty") or {}).items() if "auroc" in figures]
    registry = evaluation.get("registry") or {}
    rows += [{"metric": f"registry.{field}", "value": registry[field]}
             for field in ("model", "version", "promoted") if field in registry]
    return rows


def gate_decision(evaluation: Mapping[str, Any], evaluate_run) -> dict[str, Any] | None:
    """The registry's decision: from the evaluation file when it carries it, else from the
    tags the evaluate step put on its MLflow run (recall.registered.<model>, recall.gate)."""
    if evaluation.get("registry"):
        return dict(evaluation["registry"])
    if evaluate_run is None:
        return None
    tags = evaluate_run.data.tags
    registered = {k.removeprefix("recall.registered."): v for k, v in tags.items() if k.startswith("recall.registered.")}
    if not registered or "recall.gate" not in tags:
        return None
    model, version = next(iter(registered.items()))
    return {
        "model": model, "version": version, "promoted": tags["recall.gate"] == "passed",
        "reasons": [r for r in tags.get("recall.gate_reasons", "").split(" | ") if r] or [tags["recall.gate"]],
    }


def _ui_links(uri: str, experiment_id: str | None, runs: Mapping[str, str], decision: Mapping[str, Any] | None) -> list[str]:
    """Markdown links into the MLflow UI when the store is a server, else plain ids."""
    web = uri.rstrip("/") if uri.startswith(("http://", "https://")) else None
    lines = []
    for label, run_id in runs.items():
        if web and experiment_id:
            lines.append(f"- {label}: [{run_id}]({web}/#/experiments/{experiment_id}/runs/{run_id})")
        else:
            lines.append(f"- {label}: run `{run_id}` in `{uri}`")
    if decision:
        name, version = decision.get("model"), decision.get("version")
        if web:
            lines.append(f"- model version: [{name} v{version}]({web}/#/models/{name}/versions/{version})")
        else:
            lines.append(f"- model version: `{name}` v{version}")
    return lines


def gate_markdown(task: str, evaluation: Mapping[str, Any], decision: Mapping[str, Any] | None,
                  links: list[str]) -> str:
    lines = [f"# Task {task}: gate decision", ""]
    if decision is None:
        lines.append("No model version registered for this task (tracking.register_classifier is off, "
                     "or the evaluate run could not be found).")
    else:
        verdict = "promoted to champion" if decision.get("promoted") else "not promoted"
        lines.append(f"**{decision.get('model')} v{decision.get('version')}: {verdict}**")
        lines += ["", "Reasons:", *[f"- {reason}" for reason in decision.get("reasons", [])]]
    lines += ["", f"Accuracy over seen classes: {evaluation['step_accuracy']:.4f}; "
              f"ECE: {evaluation['calibration']['ece']:.4f}", "", "MLflow:", *links]
    return "\n".join(lines)


def task_report(project_dir: str | Path, key: str, pipeline_run: str) -> tuple[list[dict[str, Any]], str] | None:
    """The table and the markdown for the task with foreach key ``key``, or None when its
    evaluation file is absent."""
    path = evaluation_file(project_dir, key)
    if not path.exists():
        return None
    evaluation = json.loads(path.read_text())
    uri = tracking_uri(project_dir)
    client = _client(uri)
    parent = find_parent_run(client, pipeline_run)
    evaluate_run = None
    runs: dict[str, str] = {}
    if parent is not None:
        runs["pipeline run"] = parent.info.run_id
        found = client.search_runs(
            [parent.info.experiment_id],
            filter_string=(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`recall.step` = 'evaluate' "
                           f"and tags.`recall.task` = '{int(evaluation['task'])}'"),
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if found:
            evaluate_run = found[0]
            runs["evaluate run"] = evaluate_run.info.run_id
    decision = gate_decision(evaluation, evaluate_run)
    links = _ui_links(uri, parent.info.experiment_id if parent else None, runs, decision)
    return metrics_table(evaluation), gate_markdown(key, evaluation, decision, links)
