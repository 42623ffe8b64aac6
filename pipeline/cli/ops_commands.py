"""The operator's commands: serve a prediction, the registry's champion and rollback, the
update loop (ingest, update, the demo producer), the shared DVC remote, params.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.core import OverridesArg, ParamsOption, app, load_config, run_step


@app.command()
def classify(
    images: Optional[list[Path]] = typer.Argument(None, help="Image files to classify."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model name (default: the classifier of the current params' lineage, <experiment>-<lineage>-classifier)."),
    alias: str = typer.Option("champion", "--alias", "-a", help="Alias of the version to use: champion, task-3, ..."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="A safetensors file with an 'embeddings' tensor [N, d] instead of images."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input instead of a table."),
    params: Path = ParamsOption,
) -> None:
    """Classify images (or embeddings) with a registered model version, by name and alias."""

    def run():
        import json
        import math

        import mlflow
        import pandas as pd
        from mlflow.exceptions import MlflowException

        from pipeline import config
        from pipeline.io import read_tensors
        from pipeline.serving.model import ServingError
        from pipeline.tracking.registry import model_name
        from pipeline.tracking.server import (
            bound_mlflow_retries,
            check_tracking_server,
            tracking_uri,
            tracking_uri_origin,
            using_tracking_uri,
        )

        cfg = config.load(params if params.exists() else None, None)
        if bool(images) == bool(embeddings):
            raise ServingError("give image files or --embeddings (one of the two)")
        name = model or model_name(cfg, "classifier")
        uri = f"models:/{name}@{alias}"
        bound_mlflow_retries(cfg.tracking)
        check_tracking_server(tracking_uri(cfg), cfg.tracking, tracking_uri_origin(cfg))
        try:
            with using_tracking_uri(tracking_uri(cfg)):
                loaded = mlflow.pyfunc.load_model(uri)
        except MlflowException as exc:
            raise ServingError(f"{uri} ({tracking_uri(cfg)}): {exc.message}") from None
        if images:
            missing = [str(p) for p in images if not p.is_file()]
            if missing:
                raise ServingError(f"no such image file(s): {', '.join(missing)}")
            frame = pd.DataFrame({"image": [str(p.resolve()) for p in images]})
            names = [str(p) for p in images]
        else:
            x = read_tensors(embeddings).get("embeddings")
            if x is None:
                raise ServingError(f"{embeddings}: no 'embeddings' tensor")
            frame = pd.DataFrame({"embedding": [row.tolist() for row in x.double()]})
            names = [f"{embeddings.name}[{i}]" for i in range(len(x))]
        result = loaded.predict(frame)
        for source, row in zip(names, result.to_dict(orient="records")):
            if as_json:
                row["probabilities"] = [float(p) for p in row["probabilities"]]
                typer.echo(json.dumps({"input": source, **row}))
            else:
                variance = "n/a" if math.isnan(row["sample_variance"]) else f"{row['sample_variance']:.4f}"
                typer.echo(
                    f"{source}: {row['label']} (p={row['max_probability']:.3f}, entropy {row['entropy']:.3f}, "
                    f"energy {row['energy']:.2f}, sample variance {variance})"
                )

    run_step(run)


def _registry_client(params: Path, model: Optional[str]):
    """The MLflow client of the current params' tracking store, and the model to address:
    ``model``, else the classifier of the params' lineage (as the pipeline derives it)."""
    from mlflow.tracking import MlflowClient

    from pipeline import config
    from pipeline.tracking.registry import model_name
    from pipeline.tracking.server import bound_mlflow_retries, check_tracking_server, tracking_uri, tracking_uri_origin

    cfg = config.load(params if params.exists() else None, None)
    name = model or model_name(cfg, "classifier")
    bound_mlflow_retries(cfg.tracking)
    check_tracking_server(tracking_uri(cfg), cfg.tracking, tracking_uri_origin(cfg))
    return MlflowClient(tracking_uri(cfg)), name


RegistryModelOption = typer.Option(None, "--model", "-m", help="Registered model name (default: the classifier of the current params' lineage, <experiment>-<lineage>-classifier).")


@app.command()
def champion(model: Optional[str] = RegistryModelOption, params: Path = ParamsOption) -> None:
    """Show which version holds `champion`, and every recorded move of the alias."""
    from pipeline.tracking import gate

    def show():
        client, name = _registry_client(params, model)
        return gate.history_text(client, name)

    typer.echo(run_step(show))


@app.command()
def rollback(
    to: str = typer.Option(..., "--to", help="Version number that takes the champion alias."),
    reason: str = typer.Option(None, "--reason", help="Why (recorded with the move; required)."),
    model: Optional[str] = RegistryModelOption,
    params: Path = ParamsOption,
) -> None:
    """Move `champion` to an earlier (or any) version by hand; the move is recorded like the gate's."""
    from pipeline.tracking import gate

    def move():
        client, name = _registry_client(params, model)
        return name, gate.rollback(client, name, to, reason or "")

    name, record = run_step(move)
    if record is None:
        typer.echo(f"{name}: v{to} already holds champion; nothing moved")
    else:
        typer.echo(f"{name}: champion moved from {'v' + record['from'] if record['from'] else 'no version'} to v{record['to']}")


@app.command()
def ingest(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Take every ready batch of the stream source into the ledger (dataset=stream)."""
    cfg, entries = run_step(lambda: _ingest(params, overrides))
    if not entries:
        typer.echo(f"no new ready batches; {cfg.paths.ledger} unchanged")
    for entry in entries:
        if entry["status"] == "accepted":
            counts = entry["counts"].values()
            typer.echo(
                f"{entry['batch']}: task {entry['task']}, {len(entry['classes'])} classes "
                f"({', '.join(entry['classes'])}), {sum(c['train'] for c in counts)} train / "
                f"{sum(c['test'] for c in counts)} test images"
            )
        else:
            typer.echo(f"{entry['batch']}: rejected: {entry['reason']}")
    _fail_on_rejected_batches(cfg, entries)


def _fail_on_rejected_batches(cfg, entries: list[dict]) -> None:
    """A batch rejected now is the producer's to fix: say which and why, and exit 2 (bad
    input), so that cron, CI and the scheduled flow run show it failed, instead of a quiet
    success that ran nothing. The ledger keeps the rejection and every accepted batch."""
    rejected = [entry for entry in entries if entry["status"] != "accepted"]
    if not rejected:
        return
    reasons = "; ".join(f"batch {entry['batch']!r} rejected: {entry['reason']}" for entry in rejected)
    typer.secho(
        f"error: {reasons} (recorded in {cfg.paths.ledger}; a rejected batch is never taken again: "
        "fix it and land it under a new batch name)", fg=typer.colors.RED, err=True,
    )
    raise typer.Exit(code=2)


def _ingest(params: Path, overrides: Optional[list[str]]):
    """Ingest, then make params.yaml's task count follow the ledger (DVC expands the new
    tasks' stages from it)."""
    from pipeline import config
    from pipeline.config.task_chain import ledger_tasks
    from pipeline.stream.ingest import ingest_from_config

    cfg = load_config(params, overrides)
    entries = ingest_from_config(cfg)
    if not overrides and config.set_task_count(params, ledger_tasks(cfg.paths.ledger)):
        typer.echo(f"{params}: split.n_tasks = {ledger_tasks(cfg.paths.ledger)}")
    return cfg, entries


@app.command()
def update(
    params: Path = ParamsOption,
    dry: bool = typer.Option(False, "--dry", help="Ingest, then show what `dvc repro` would run without running it."),
) -> None:
    """The update loop, once: ingest every ready batch, then `dvc repro` (the new tasks'
    stages and the report; nothing of the earlier tasks)."""
    import os
    import shutil
    import subprocess

    from pipeline import config

    def check():
        cfg = config.load(params)
        if not cfg.stream:
            raise config.ConfigError(
                f"{params}: dataset {cfg.dataset.name!r} is a benchmark; the update loop needs dataset=stream. "
                "Offline demo: `recall compose-params experiment=stream_demo` (git checkout params.yaml undoes it)"
            )
        return cfg

    run_step(check)
    _, entries = run_step(lambda: _ingest(params, None))
    for entry in entries:
        typer.echo(f"{entry['batch']}: " + (f"task {entry['task']}" if entry["status"] == "accepted" else f"rejected: {entry['reason']}"))
    cfg = run_step(lambda: config.load(params))
    if cfg.split.n_tasks == 0:
        typer.echo(f"no task yet: no ready batch in {cfg.dataset.source} (a batch is ready once <batch>/_READY exists)")
        _fail_on_rejected_batches(cfg, entries)
        return
    # The venv's programs first: dvc runs `recall` for every stage.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
    command = [dvc, "status"] if dry else [dvc, "repro"]
    code = subprocess.call(command, env=env)
    if code:
        raise typer.Exit(code=code)
    # The accepted batches' tasks ran first: a rejected one holds up nothing.
    _fail_on_rejected_batches(cfg, entries)


@app.command("stream-demo")
def stream_demo(
    folder: Path = typer.Argument(..., help="Local stream source folder to write batches into."),
    batches: Optional[int] = typer.Option(None, "--batches", "-n", help="Number of batches the world is cut into (default: split.n_tasks)."),
    next_only: bool = typer.Option(False, "--next", help="Write only the next batch not yet in the folder."),
    flat: bool = typer.Option(False, "--flat", help="<batch>/<class>/ without train/test folders (the hash split decides)."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Write the shapes demo world as a stream of batches (one class set each, _READY last)."""
    from pipeline import config
    from pipeline.stream.demo import write_demo_batches

    def run():
        cfg = config.load(None, ["dataset=shapes", *(overrides or [])])
        return write_demo_batches(cfg, folder, n_batches=batches, only_next=next_only, flat=flat)

    written = run_step(run)
    typer.echo(f"wrote {', '.join(written)} into {folder}" if written else f"{folder}: every batch is already there")


@app.command()
def remote(
    url: str = typer.Argument(..., help="Where DVC keeps shared state: s3://bucket/prefix, or a local folder."),
    endpoint_url: Optional[str] = typer.Option(
        None, "--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, ...): http(s)://host[:port]."
    ),
    name: str = typer.Option("storage", "--name", "-n", help="Name of the DVC remote."),
    check: bool = typer.Option(
        True, "--check/--no-check", help="First check the bucket answers with this machine's AWS environment."
    ),
) -> None:
    """Make URL the project's default DVC remote, shared by every machine that runs stages.

    Only the location goes into .dvc/config (commit it); credentials and region come from
    the standard AWS environment of each machine and are never written to the repo."""
    from pipeline import remote as remotes

    def configure():
        spec = remotes.validate(url, endpoint_url, name)
        project = remotes.find_project()
        remotes.configure(spec, project, check=check)
        return spec, project

    spec, project = run_step(configure)
    endpoint = f", endpoint {spec.endpoint_url}" if spec.endpoint_url else ""
    typer.echo(f"default DVC remote '{spec.name}': {spec.url}{endpoint} (written to {project / '.dvc' / 'config'})")
    if spec.is_s3:
        typer.echo(
            "credentials and region: from each machine's AWS environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION or AWS_PROFILE), never from the repo"
        )
    typer.echo("share state between machines (commit .dvc/config first):")
    typer.echo(f"  {remotes.PUSH_COMMAND}   # after dvc repro: cached outputs and the run cache")
    typer.echo(f"  {remotes.PULL_COMMAND}   # on a fresh clone, before dvc repro")
    typer.echo(
        "  git add -A && git commit   # dvc.lock and the `cache: false` outputs "
        "(metrics, evaluations, plots, the split), which the remote does not hold"
    )


@app.command("compose-params")
def compose_params(
    output: Path = typer.Option(Path("params.yaml"), "--output", "-o"),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Write conf/'s default composition (plus overrides) to params.yaml."""
    from pipeline import config

    def write():
        raw = config.compose(overrides or [])
        config.validate(raw, source="composed config")
        config.write_params(output, raw)

    run_step(write)
    typer.echo(f"wrote {output}")


if __name__ == "__main__":  # pragma: no cover
    app()
