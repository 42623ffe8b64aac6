"""What orchestration and scale-out cost, measured side by side in one run (figures and
ratios, no timed asserts).

pipeline: the tiny demo pipeline (devtools.scratch.TINY_CONFIG, ``--tasks`` tasks) on
fresh, identical scratch copies of the project, each with its own git, DVC cache and
MLflow store:

- baseline: ``recall compose-params`` then ``dvc repro``;
- through Prefect: ``recall-benchmark/on-demand`` (which composes the params, then runs
  every stage) started with ``run_deployment`` on a real ``prefect server start``
  (loopback, free port, sqlite), with the pools, the ``gpu`` limit, prefect.yaml's
  deployments and a process worker per pool, as ``make prefect`` sets them up; once per
  ``--routings`` entry (``inline``: every stage a task of the flow run; ``gpu-deployment``:
  each task's chain, and the embeddings, as flow runs of ``recall-step/gpu``). Timed from
  the call to the flow run's end, so worker pick-up and process start count; the server's
  start and the deploy do not. Workers poll as ``make prefect``'s do
  (flows/local.py WORKER_POLL_SECONDS) unless ``--worker-poll`` says otherwise.

embed: images/s of the embed stage's own function (``embed_split``, the stage's batch and
chunk sizes) on the prepared train split of ``--embed-project`` (the demo, after ``make
demo``), with ``cluster.engine=local`` (one process and its loader workers) and with a
dask LocalCluster of 1 and of 2 workers (``pipeline.scaleout.cluster_client``, as the
stage opens it; the cluster's start is reported apart). Best of ``--repeats``.

    python -m benchmarks.prefect_overhead [--tasks 2] [--routings inline gpu-deployment]
        [--sections pipeline embed] [--keep DIR] [--embed-project .]

``--keep DIR`` keeps the Prefect home (DIR/prefect, its sqlite database holds the flow
runs) and the project copies, for docs/prefect_screenshots.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from devtools.scratch import CHECKOUT, TINY_CONFIG, merge_config, project_env, scratch_project
from pipeline.compat import disable_telemetry

disable_telemetry()
os.environ.setdefault("TQDM_DISABLE", "1")

ROUTINGS = ("inline", "gpu-deployment")
# What a flow run of the benchmark needs in its copy: the flows and their deployments too.
PREFECT_FOLDERS = ("pipeline", "conf", "flows")
PREFECT_FILES = ("dvc.yaml", "prefect.yaml", ".gitignore")


def tiny_project(root: Path, tasks: int) -> Path:
    """A fresh scratch copy of the project shrunk to the tiny world with ``tasks`` tasks;
    params.yaml is left to whoever runs it to compose (both sides do it in their timing)."""
    config: dict = {}
    merge_config(config, TINY_CONFIG)
    merge_config(config, {"split": {"n_tasks": tasks}})
    return scratch_project(root, config, folders=PREFECT_FOLDERS, files=PREFECT_FILES)


def _run(root: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=root, env=project_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {root}:\n{result.stdout[-3000:]}")
    return result.stdout


def time_dvc_repro(root: Path) -> tuple[float, int]:
    """Seconds for compose-params + dvc repro, and the number of stages that ran."""
    start = time.perf_counter()
    _run(root, "recall", "compose-params")
    output = _run(root, "dvc", "repro")
    seconds = time.perf_counter() - start
    return seconds, sum(line.startswith("Running stage '") for line in output.splitlines())


def time_through_prefect(projects: dict[str, Path], home: Path, worker_poll: float | None) -> dict[str, dict]:
    """One Prefect server for every routing; per routing, its own project copy: the
    deployments are applied from that copy and its workers run there."""
    from devtools.servers import prefect_env, start_prefect_server, stop

    server, api_url = start_prefect_server(home)
    # This process is a Prefect client too: its settings live in ``home``, never ~/.prefect.
    os.environ.update(prefect_env(home, api_url))
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment

    from flows.local import POOLS, configure, stack_env, start_worker

    results = {}
    try:
        for routing, root in projects.items():
            extra = {"PYTHONPATH": str(root)}
            if worker_poll is not None:
                extra["PREFECT_WORKER_QUERY_SECONDS"] = str(worker_poll)
            env = stack_env(home, api_url, root, extra)
            configure(root, env)
            logs = home / f"workers-{routing}"
            logs.mkdir(parents=True, exist_ok=True)
            workers = [start_worker(pool, root, env, logs) for pool in POOLS]
            try:
                start = time.perf_counter()
                run = run_deployment("recall-benchmark/on-demand", parameters={"routing": routing}, timeout=None,
                                     poll_interval=1, as_subflow=False)
                seconds = time.perf_counter() - start
            finally:
                for worker in workers:
                    stop(worker)
            if not run.state.is_completed():
                tails = "\n".join((logs / f"worker-{pool}.log").read_text()[-2000:] for pool in POOLS)
                raise SystemExit(f"routing={routing}: flow run {run.name} ended {run.state.name}\n{tails}")
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(run.id)
                children = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            results[routing] = {
                "seconds": seconds, "child_flow_runs": len(children), "worker_poll": env["PREFECT_WORKER_QUERY_SECONDS"],
                # From the flow run's creation to its start: the queue, the worker's
                # polling and the flow run's process start.
                "pickup_seconds": (run.start_time - run.created).total_seconds() if run.start_time else float("nan"),
            }
    finally:
        stop(server)
    return results


def pipeline_section(args, workdir: Path) -> None:
    baseline_root = tiny_project(workdir / "project-dvc-repro", args.tasks)
    prefect_roots = {routing: tiny_project(workdir / f"project-prefect-{routing}", args.tasks)
                     for routing in args.routings}
    print(f"tiny demo, {args.tasks} tasks, scratch copies in {workdir}", flush=True)

    baseline, stages = time_dvc_repro(baseline_root)
    print(f"dvc repro (compose-params + repro): {baseline:7.1f} s  ({stages} stages ran)", flush=True)
    if not args.routings:
        return
    results = time_through_prefect(prefect_roots, workdir / "prefect", args.worker_poll)
    polls = {result["worker_poll"] for result in results.values()}
    print(f"through Prefect (workers poll every {', '.join(sorted(polls))} s):", flush=True)
    for routing, result in results.items():
        print(f"  routing={routing:15s} {result['seconds']:7.1f} s  = {result['seconds'] / baseline:.2f}x dvc repro; "
              f"{result['child_flow_runs']} recall-step flow runs; "
              f"pick-up of the flow run {result['pickup_seconds']:.1f} s", flush=True)


def embed_section(args) -> None:
    # The clusters' start and stop are logged at INFO, line by line: only the figures here.
    # (Read by dask when distributed is first imported, here and in the worker processes.)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    import torch

    from pipeline import config, scaleout
    from pipeline.clip.backbone import load_backbone
    from pipeline.clip.embedding import embed_split, resolve_device
    from pipeline.config import ClusterConfig
    from pipeline.data import load_prepared

    project = Path(args.embed_project).resolve()
    cfg = config.load(project / "params.yaml")
    prepared_dir, backbone_dir = project / cfg.paths.prepared, project / cfg.paths.backbone
    if not (prepared_dir.exists() and backbone_dir.exists()):
        raise SystemExit(f"{project}: no {cfg.paths.prepared} or {cfg.paths.backbone}; run `make demo` there first")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() else max(1, os.cpu_count() or 1))
    device = resolve_device(cfg.embed.device)
    backbone = load_backbone(backbone_dir, device=device)
    prepared = load_prepared(prepared_dir)
    n_images = len(prepared.samples(args.split))
    print(f"\nembed stage's embed_split, {n_images} {args.split} images of {project}, device {device}, "
          f"batch {cfg.embed.batch_size}, {os.cpu_count()} cores, best of {args.repeats}:", flush=True)

    engines = [("engine=local", ClusterConfig(engine="local"),
                f"1 process, {torch.get_num_threads()} torch thread(s), {cfg.embed.num_workers} loader workers")]
    engines += [(f"dask x{n}", ClusterConfig(engine="dask", n_workers=n, threads_per_worker=1),
                 f"LocalCluster of {n} worker process{'es' if n > 1 else ''} x 1 thread") for n in (1, 2)]
    rates = {}
    for name, cluster, what in engines:
        started = time.perf_counter()
        with scaleout.cluster_client(cluster) as client:
            startup = time.perf_counter() - started
            best = 0.0
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="recall-embed-bench-") as out:
                    start = time.perf_counter()
                    embed_split(prepared, args.split, backbone, Path(out) / "emb", batch_size=cfg.embed.batch_size,
                                num_workers=cfg.embed.num_workers, chunk_size=cfg.embed.chunk_size,
                                precision=cfg.embed.precision, client=client, backbone_dir=backbone_dir,
                                progress=False)
                    best = max(best, n_images / (time.perf_counter() - start))
        rates[name] = best
        started_note = f"; cluster start {startup:.1f} s" if client is not None else ""
        print(f"  {name:13s} {best:8.1f} images/s  ({what}{started_note})", flush=True)
    print(f"  dask x2 / dask x1: {rates['dask x2'] / rates['dask x1']:.2f}x; "
          f"dask x2 / engine=local: {rates['dask x2'] / rates['engine=local']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=("pipeline", "embed"), default=["pipeline", "embed"])
    parser.add_argument("--tasks", type=int, default=2, help="tasks of the tiny demo (default 2)")
    parser.add_argument("--routings", nargs="*", choices=ROUTINGS, default=list(ROUTINGS))
    parser.add_argument("--worker-poll", type=float, default=None,
                        help="seconds between a worker's polls for flow runs (default: make prefect's)")
    parser.add_argument("--keep", metavar="DIR", help="keep the Prefect home and the project copies in DIR (new)")
    parser.add_argument("--embed-project", default=str(CHECKOUT),
                        help="project whose prepared data and backbone the embed section reads (default: this checkout)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    if "pipeline" in args.sections:
        if args.keep:
            workdir = Path(args.keep).resolve()
            workdir.mkdir(parents=True)
            pipeline_section(args, workdir)
            print(f"kept: Prefect home {workdir / 'prefect'}, project copies in {workdir}")
        else:
            workdir = Path(tempfile.mkdtemp(prefix="recall-prefect-bench-"))
            try:
                pipeline_section(args, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    if "embed" in args.sections:
        embed_section(args)


if __name__ == "__main__":
    main()
