"""Prefect flows over Recall's DVC stages (design section 7).

- ``recall-step``: runs named stages, one Prefect task each, through ``dvc repro
  --single-item`` (one DVC cache and lock: DVC skips what is up to date), holding a slot of
  the ``gpu`` limit throughout when any of them is GPU work. Deployed twice,
  ``recall-step/cpu`` and ``recall-step/gpu``, one per work pool.
- ``recall-benchmark``: composes params.yaml from Hydra overrides, then runs every stage
  that is out of date in dependency order. Sent to step deployments (``routing``), each
  task's stages go as one flow run: the whole chain to ``recall-step/gpu`` when any of it is
  GPU work (a flow run costs a worker's poll and a process start; per stage, that cost
  was more than the tiny demo's stages themselves).
- ``recall-update``: ``recall ingest``, then the stages that became out of date (the new
  tasks' and the report).

Every stage process gets ``RECALL_PIPELINE_RUN=<flow run id of the top flow>``: the MLflow
parent run of the whole pipeline run is keyed by it, and tagged ``prefect.flow_run_id``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows import reporting
from flows import stages as dvc_stages

STEP_FLOW = "recall-step"
PARAMS_FILE = "params.yaml"
# The global concurrency limit that keeps one job per GPU (created by `make prefect`).
GPU_LIMIT = "gpu"
# A slot is leased and the lease renewed while the stage runs; a process killed with its
# machine renews nothing, and the server takes the slot back this long after (Prefect's
# default, 300 s, would hold the GPU from the re-run that long; 60 s is the least allowed).
GPU_LEASE_SECONDS = 60
# Routing of stages: everything in this flow run; GPU families on recall-step/gpu and the
# rest on recall-step/cpu; only GPU families on their deployment; or "deployments" when the
# step deployments exist, else "inline" (a flow run without a server's deployments). Sent to
# deployments, a task's chain goes whole to recall-step/gpu when any of it is GPU work
# (dispatches).
ROUTINGS = ("inline", "deployments", "gpu-deployment", "auto")


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retries a failed stage only when the failure may pass (S3 or MLflow down, a
    crashed process, DVC's lock); bad input and setup errors fail at once."""
    return dvc_stages.is_retryable(state.result(raise_on_failure=False))


# DVC is the cache (NO_CACHE): Prefect's default cache key includes the flow run id and
# would skip a stage that must run again within one flow run.
@task(name="dvc-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_jitter_factor=0.5, retry_condition_fn=_retry_unless_bad_input, cache_policy=NO_CACHE)
def dvc_stage(stage: str, project_dir: str, pipeline_run: str, take_gpu_slot: bool = True) -> str:
    """One DVC stage; a GPU family holds a slot of the ``gpu`` limit while it runs, unless
    its caller holds one already (``take_gpu_slot=False``: a step flow run holds it for
    all its stages)."""
    logger = get_run_logger()
    env = dvc_stages.stage_env(pipeline_run)
    if take_gpu_slot and _needs_gpu([stage]):
        with _gpu_slot():
            output = dvc_stages.run_stage(project_dir, stage, env)
    else:
        output = dvc_stages.run_stage(project_dir, stage, env)
    logger.info("%s", output.strip())
    return output


@task(name="task-artifacts", task_run_name="artifacts of task {key}", cache_policy=NO_CACHE)
def publish_task_artifacts(project_dir: str, key: str, pipeline_run: str) -> bool:
    """A table of task ``key``'s metrics and a note of the gate's decision with MLflow links."""
    report = reporting.task_report(project_dir, key, pipeline_run)
    if report is None:
        get_run_logger().warning("no evaluation file for task %s; no artifacts", key)
        return False
    table, markdown = report
    create_table_artifact(table, key=f"task-{key}-metrics", description=(
        f"What evaluate@{key} measured after training on task {key}: accuracy over the classes seen so far, "
        f"accuracy on each task's classes, calibration (ECE), novelty AUROC, registered model version"))
    create_markdown_artifact(markdown, key=f"task-{key}-gate", description=(
        f"Whether task {key}'s model version was promoted to champion, why, and links to its MLflow runs"))
    return True


@task(name="recall-command", task_run_name="recall {args[0]}", retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_condition_fn=_retry_unless_bad_input,
      cache_policy=NO_CACHE)
def recall_command(args: list[str], project_dir: str) -> str:
    output = dvc_stages.run_recall(project_dir, args, dvc_stages.stage_env(None))
    get_run_logger().info("%s", output.strip())
    return output


def _compose(project_dir: str, overrides: list[str]) -> None:
    recall_command(["compose-params", *overrides], project_dir)


def _needs_gpu(stages: list[str]) -> bool:
    return any(dvc_stages.pool_for(stage) == dvc_stages.GPU_POOL for stage in stages)


def _gpu_slot():
    return concurrency(GPU_LIMIT, occupy=1, lease_duration=GPU_LEASE_SECONDS)


def _run_inline(stage: str, project_dir: str, pipeline_run: str, take_gpu_slot: bool = True) -> None:
    dvc_stage(stage, project_dir, pipeline_run, take_gpu_slot)
    key = dvc_stages.task_key(stage)
    if dvc_stages.family(stage) == "evaluate" and key:
        publish_task_artifacts(project_dir, key, pipeline_run)


# Where GPU work goes: recall-step/gpu (a process or compose worker's pool), or on Kubernetes
# recall-step/gpu-k8s (infra/k8s/prefect.yaml), chosen by this variable in the environment of
# the flow run that dispatches (the update or benchmark deployment's job variables).
GPU_STEP_DEPLOYMENT_ENV = "RECALL_GPU_STEP_DEPLOYMENT"


def step_deployment(pool: str) -> str:
    """The step deployment that serves ``pool``."""
    if pool == dvc_stages.GPU_POOL and os.environ.get(GPU_STEP_DEPLOYMENT_ENV):
        return os.environ[GPU_STEP_DEPLOYMENT_ENV]
    return f"{STEP_FLOW}/{pool}"


def route(stage: str, routing: str) -> str | None:
    """The step deployment that runs ``stage`` under ``routing``, or None for this flow run."""
    if routing not in ROUTINGS or routing == "auto":
        raise ValueError(f"routing {routing!r}: expected one of inline, deployments, gpu-deployment")
    pool = dvc_stages.pool_for(stage)
    if routing == "deployments" or (routing == "gpu-deployment" and pool == dvc_stages.GPU_POOL):
        return step_deployment(pool)
    return None


def _resolve_routing(routing: str) -> str:
    if routing not in ROUTINGS:
        raise ValueError(f"routing {routing!r}: expected one of {', '.join(ROUTINGS)}")
    if routing != "auto":
        return routing
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(step_deployment(dvc_stages.GPU_POOL))
        except ObjectNotFound:  # no step deployments on this server (an unreachable one raises)
            return "inline"
    return "deployments"


def _dispatch_run_name() -> str:
    from prefect.runtime import task_run

    parameters = task_run.parameters
    return f"{', '.join(parameters.get('stages') or [])} on {parameters.get('deployment')}"


@task(name="dispatch-stages", task_run_name=_dispatch_run_name, cache_policy=NO_CACHE)
def dispatch_stages(stages: list[str], deployment: str, project_dir: str, pipeline_run: str,
                    params: dict[str, Any]) -> str:
    """Run ``stages``, in this order, as one flow run of a step deployment and wait for it.
    Not retried here: the step flow retries what is worth retrying itself, stage by stage."""
    from prefect.deployments import run_deployment

    child = run_deployment(
        deployment,
        parameters={"stages": stages, "params": params, "pipeline_run": pipeline_run, "project_dir": project_dir},
        flow_run_name=step_run_name(stages, pipeline_run), poll_interval=1,
    )
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise dvc_stages.StageRemoteError(
            ", ".join(stages), f"flow run {child.name} ({child.id}) of {deployment} ended {state}: "
                               f"{child.state.message if child.state else ''}")
    return str(child.id)


def dispatches(units: list[tuple[str, ...]], tasks: frozenset[str], routing: str) -> list[tuple[str | None, list[str]]]:
    """Where each unit of ``Pipeline.units`` runs, in order: ``(deployment, stages)`` for one
    flow run of a step deployment, ``(None, stages)`` for stages of this flow run. A task's
    chain goes whole to ``recall-step/gpu`` when any of it goes there (its CPU stages are
    seconds; a flow run of their own would cost more). Consecutive units bound for the same
    deployment share a flow run, but never two tasks: each task's flow run holds the GPU
    for that task only, and shows in the UI as that task's."""
    gpu = step_deployment(dvc_stages.GPU_POOL)
    groups: list[tuple[str | None, list[str], bool]] = []
    for unit in units:
        targets = {route(stage, routing) for stage in unit}
        deployment = gpu if gpu in targets else next((t for t in sorted(targets, key=str) if t), None)
        is_task = dvc_stages.task_key(unit[0]) in tasks
        if deployment and groups and groups[-1][0] == deployment and not (is_task and groups[-1][2]):
            previous = groups.pop()
            groups.append((deployment, previous[1] + list(unit), previous[2] or is_task))
        else:
            groups.append((deployment, list(unit), is_task))
    return [(deployment, stages) for deployment, stages, _ in groups]


def run_stages(pipeline: dvc_stages.Pipeline, plan: list[str], project_dir: str, pipeline_run: str,
               routing: str) -> None:
    groups = dispatches(pipeline.units(plan), pipeline.tasks(), routing)
    # A step flow run on another machine gets the params this one composed, so both run
    # the same configuration whatever that machine's params.yaml held.
    params = _read_params(project_dir) if any(deployment for deployment, _ in groups) else {}
    for deployment, stages in groups:
        if deployment is None:
            for stage in stages:
                _run_inline(stage, project_dir, pipeline_run)
        else:
            dispatch_stages(stages, deployment, project_dir, pipeline_run, params)


# Flow run names say what a run does (Prefect's default is a random "adjective-animal"):
# made from the run's parameters when it starts.
def step_run_name(stages: list[str], pipeline_run: str | None) -> str:
    """``finetune@01 for 1a2b3c4d``: the stages, and the pipeline run (the top flow run's
    id) they belong to."""
    names = ", ".join(stages) or "no stages"
    return f"{names} for {pipeline_run[:8]}" if pipeline_run else names


def _described(overrides: list[str] | None) -> str:
    return " ".join(overrides) if overrides else "conf/ defaults"


def _step_run_name() -> str:
    parameters = flow_run.parameters
    return step_run_name(list(parameters.get("stages") or []), parameters.get("pipeline_run"))


def _benchmark_run_name() -> str:
    parameters = flow_run.parameters
    return f"benchmark: {_described(parameters.get('overrides'))}, routing {parameters.get('routing', 'auto')}"


def _update_run_name() -> str:
    parameters = flow_run.parameters
    source = parameters.get("source") or "params.yaml's dataset.source"
    return f"update from {source}: {_described(parameters.get('overrides'))}"


def _read_params(project_dir: str) -> dict[str, Any]:
    return yaml.safe_load((Path(project_dir) / PARAMS_FILE).read_text())


def _use_params(project_dir: str, params: dict[str, Any]) -> None:
    """Make params.yaml hold ``params``; left untouched when it already does (the usual
    case: a worker in the checkout that composed them)."""
    from pipeline.config import write_params

    path = Path(project_dir) / PARAMS_FILE
    if not path.exists() or yaml.safe_load(path.read_text()) != params:
        write_params(path, params)


def _tag_parent(project_dir: str, pipeline_run: str) -> None:
    try:
        run_id = reporting.tag_parent_run(project_dir, pipeline_run, pipeline_run)
    except Exception as exc:  # the pipeline's result stands; say why the link is missing
        get_run_logger().warning("could not tag the MLflow parent run of %s: %s", pipeline_run, exc)
        return
    if run_id:
        get_run_logger().info("MLflow parent run %s tagged %s=%s", run_id, reporting.FLOW_RUN_TAG, pipeline_run)


def _plan(project_dir: str) -> tuple[dvc_stages.Pipeline, list[str]]:
    """The project's stages and what is out of date now, and everything downstream of it,
    from DVC."""
    pipeline = dvc_stages.discover(project_dir)
    plan = pipeline.plan(dvc_stages.changed_stages(project_dir))
    get_run_logger().info("%d of %d stages to run: %s", len(plan), len(pipeline.stages), ", ".join(plan) or "none")
    return pipeline, plan


@flow(name=STEP_FLOW, flow_run_name=_step_run_name)
def recall_step(stages: list[str], overrides: list[str] | None = None, params: dict[str, Any] | None = None,
                pipeline_run: str | None = None, project_dir: str = ".", push: bool = False) -> list[str]:
    """Run the named DVC stages in the given order (each skipped by DVC when up to date),
    one Prefect task run each; when any is a GPU family, all of them hold one slot of the
    ``gpu`` limit.

    First, ``overrides`` (Hydra) recompose params.yaml, or ``params`` (a composed config,
    what the benchmark and update flows send) replace it; ``pipeline_run`` is the MLflow
    parent-run key of the pipeline run this belongs to (default: this flow run); ``push``
    sends outputs and run cache to the DVC remote, for a worker whose checkout is not the
    one that orchestrates."""
    if overrides is not None and params is not None:
        raise ValueError("recall-step: give overrides (to compose) or params (composed), not both")
    key = pipeline_run or str(flow_run.id)
    if overrides is not None:
        _compose(project_dir, overrides)
    elif params is not None:
        _use_params(project_dir, params)
    # One slot for the whole list (a task's chain): taken and given back once, and no
    # other GPU job between two of its stages.
    gpu = _needs_gpu(stages)
    with _gpu_slot() if gpu else contextlib.nullcontext():
        for stage in stages:
            _run_inline(stage, project_dir, key, take_gpu_slot=not gpu)
    if push:
        subprocess_output = dvc_stages.run_push(project_dir, stages)
        get_run_logger().info("%s", subprocess_output.strip())
    if pipeline_run is None:
        _tag_parent(project_dir, key)
    return stages


@flow(name="recall-benchmark", flow_run_name=_benchmark_run_name)
def recall_benchmark(overrides: list[str] | None = None, project_dir: str = ".", routing: str = "auto") -> list[str]:
    """Compose params.yaml from conf/ and ``overrides`` (``recall compose-params``), then run
    every stage that is out of date, in dependency order."""
    key = str(flow_run.id)
    resolved = _resolve_routing(routing)
    _compose(project_dir, list(overrides or []))
    return _run_what_is_out_of_date(project_dir, key, resolved)


@task(name="dvc-push", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_condition_fn=_retry_unless_bad_input, cache_policy=NO_CACHE)
def push_to_remote(project_dir: str) -> str:
    """Everything the pipeline produced and its run cache, to the project's default DVC
    remote: another machine (a fresh worker, a colleague's clone) pulls the new task from
    there instead of recomputing it."""
    output = dvc_stages.run_push(project_dir, [])
    get_run_logger().info("%s", output.strip())
    return output


@flow(name="recall-update", flow_run_name=_update_run_name)
def recall_update(source: str | None = None, overrides: list[str] | None = None, project_dir: str = ".",
                  routing: str = "auto", push: bool = True) -> list[str]:
    """Take new batches from the stream source (``recall ingest``), then run the stages they
    made out of date: the new tasks' and the report. ``source`` and ``overrides`` (e.g.
    ``dataset=stream``), when given, recompose params.yaml first. With ``push`` (default)
    and a default DVC remote in the project, the outputs go to that remote afterwards."""
    key = str(flow_run.id)
    resolved = _resolve_routing(routing)
    composed = list(overrides or []) + ([f"dataset.source={source}"] if source else [])
    if composed:
        _compose(project_dir, composed)
    recall_command(["ingest"], project_dir)
    # Discovered after the ingest: the new tasks' stages exist only from now on.
    plan = _run_what_is_out_of_date(project_dir, key, resolved)
    if push and plan:
        remote = dvc_stages.default_remote(project_dir)
        if remote:
            push_to_remote(project_dir)
        else:
            get_run_logger().info("no default DVC remote in %s: nothing pushed", project_dir)
    return plan


def _run_what_is_out_of_date(project_dir: str, key: str, routing: str) -> list[str]:
    """Plan from DVC's status, run it, and tag the MLflow parent run with this flow run."""
    pipeline, plan = _plan(project_dir)
    try:
        run_stages(pipeline, plan, project_dir, key, routing)
    finally:
        _tag_parent(project_dir, key)
    return plan


if __name__ == "__main__":
    import sys

    # `python -m flows.recall_flows benchmark [overrides...]`: one flow run without a server's
    # deployments (every stage inline).
    name, *args = sys.argv[1:] or ["benchmark"]
    if name == "benchmark":
        recall_benchmark(overrides=args, project_dir=str(Path.cwd()), routing="inline")
    elif name == "update":
        recall_update(overrides=args or None, project_dir=str(Path.cwd()), routing="inline")
    else:
        raise SystemExit(f"unknown flow {name!r}: benchmark or update")
