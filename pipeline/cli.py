"""``recall``: run one pipeline step from the command line (what dvc.yaml calls).

Every command reads the composed ``params.yaml`` (``--params``) or, given Hydra
overrides such as ``dataset=imagefolder dataset.root=/data``, composes ``conf/`` itself.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.compat import disable_telemetry

# Set by `recall -v`: tracebacks are for developers; users get one line.
_verbose = False


def _one_line(exc: BaseException) -> str:
    """An unexpected exception as one line, credentials in URLs masked."""
    import re

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r"://[^/@\s]+@", "://***@", text)
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _RecallApp(typer.Typer):
    """The last resort: an exception no step turned into a clear message still ends in one
    line and exit code 1, not a page of traceback (``recall -v`` shows the traceback)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if _verbose:
                raise
            typer.secho(f"error: {_one_line(exc)}", fg=typer.colors.RED, err=True)
            typer.secho("(unexpected; run with -v for the traceback)", err=True)
            sys.exit(1)


app = _RecallApp(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="Composed params file (DVC's params.yaml).")
OverridesArg = typer.Argument(None, help="Hydra overrides, e.g. dataset=cifar100 seed=1 (composes conf/ instead of reading --params).")


def _config(params: Path, overrides: Optional[list[str]]):
    from pipeline import config

    return config.load(params, overrides or None)


def _run(fn):
    """Run a step; an error the user caused becomes one clear line and exit code 2, a server
    that does not answer one line and exit code 75 (pipeline/errors.py)."""
    from pipeline.errors import Unavailable, UserError, exit_code_of

    try:
        return fn()
    except (UserError, Unavailable, FileNotFoundError) as exc:
        if _verbose:
            import traceback

            traceback.print_exc()
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=exit_code_of(exc)) from None


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs, and tracebacks with errors.")) -> None:
    global _verbose
    _verbose = verbose
    disable_telemetry()
    # Libraries (open_clip logs on the root logger, MLflow's migrations) stay at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pipeline").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command()
def prepare(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Prepare the dataset: images (demo) and per-split manifests."""
    from pipeline import steps

    result = _run(lambda: steps.run_prepare(_config(params, overrides)))
    typer.echo(result)


@app.command()
def split(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Draw the class-incremental task split from the seed."""
    from pipeline import steps

    result = _run(lambda: steps.run_split(_config(params, overrides)))
    for t, names in enumerate(result["task_class_names"]):
        typer.echo(f"task {t + 1}: {', '.join(names)}")


@app.command()
def backbone(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Materialise the CLIP backbone (pretrain the demo one) into one weights file."""
    from pipeline import steps

    info = _run(lambda: steps.run_backbone(_config(params, overrides)))
    typer.echo(f"backbone {info['arch']} sha256 {info['sha256']}")
    for key, value in info["metrics"].items():
        typer.echo(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


@app.command()
def embed(
    split_name: str = typer.Option(..., "--split", "-s", help="Dataset split to embed (train, test)."),
    params: Path = ParamsOption,
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Embed every image of one split with the frozen image encoder."""
    from pipeline import steps

    index = _run(lambda: steps.run_embed(_config(params, overrides), split_name))
    typer.echo(
        f"{split_name}: {index['n_samples']} embeddings, {len(index['skipped'])} skipped, "
        f"{index['images_per_second']:.1f} img/s end to end"
        + (" (reused)" if index["reused"] else "")
    )


@app.command("embed-text")
def embed_text(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Encode every class name with the dataset's prompt templates."""
    from pipeline import steps

    result = _run(lambda: steps.run_embed_text(_config(params, overrides)))
    typer.echo(result)


TaskOption = typer.Option(..., "--task", "-t", help="Task number, from 1.")


@app.command("generators")
def fit_generators(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Fit the per-class generators of one task's classes."""
    from pipeline import steps

    typer.echo(_run(lambda: steps.run_fit_generators(_config(params, overrides), task)))


@app.command("replay-init")
def replay_init(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Write the empty replay pool (task 0) every task's pool grows from."""
    from pipeline import steps

    typer.echo(_run(lambda: steps.run_init_replay(_config(params, overrides))))


@app.command()
def replay(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """The replay pool of a task: the previous task's plus samples of this task's generators."""
    from pipeline import steps

    typer.echo(_run(lambda: steps.run_replay(_config(params, overrides), task)))


@app.command("prompts-init")
def prompts_init(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Write the untrained prompt state (task 0)."""
    from pipeline import steps

    typer.echo(_run(lambda: steps.run_init_prompts(_config(params, overrides))))


@app.command()
def intake(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Stream: embed one task's batch (train and test images, streamed from the source) and its class names."""
    from pipeline import steps

    figures = _run(lambda: steps.run_intake(_config(params, overrides), task))
    typer.echo(f"task {task}: {figures['train_samples']} train and {figures['test_samples']} test images embedded")


@app.command()
def novelty(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Before a task trains: how many of its new test images the current champion would flag as unknown."""
    from pipeline import steps

    result = _run(lambda: steps.run_novelty(_config(params, overrides), task))
    typer.echo(f"task {task}: {result.get('summary', result['status'])}")


@app.command()
def finetune(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Train the prompts of every seen class at one task."""
    from pipeline import steps

    typer.echo(_run(lambda: steps.run_finetune(_config(params, overrides), task)))


@app.command()
def evaluate(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Evaluate after one task on every task's test embeddings."""
    from pipeline import steps

    result = _run(lambda: steps.run_evaluate(_config(params, overrides), task))
    typer.echo(f"task {task}: accuracy over seen classes {100 * result['step_accuracy']:.1f}%")


@app.command()
def report(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Summarise the run: metrics, plots and a table."""
    from pipeline import steps

    typer.echo(steps.format_report(_run(lambda: steps.run_report(_config(params, overrides)))))


@app.command()
def summary(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Print what the pipeline has produced so far."""
    from pipeline import steps

    typer.echo(_run(lambda: steps.summary(_config(params, overrides))))


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
        from pipeline.serving import ServingError
        from pipeline.registry import model_name
        from pipeline.tracking import (
            bound_mlflow_retries, check_tracking_server, tracking_uri, tracking_uri_origin, using_tracking_uri,
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

    _run(run)


def _registry_client(params: Path, model: Optional[str]):
    """The MLflow client of the current params' tracking store, and the model to address:
    ``model``, else the classifier of the params' lineage (as the pipeline derives it)."""
    from mlflow.tracking import MlflowClient

    from pipeline import config
    from pipeline.registry import model_name
    from pipeline.tracking import bound_mlflow_retries, check_tracking_server, tracking_uri, tracking_uri_origin

    cfg = config.load(params if params.exists() else None, None)
    name = model or model_name(cfg, "classifier")
    bound_mlflow_retries(cfg.tracking)
    check_tracking_server(tracking_uri(cfg), cfg.tracking, tracking_uri_origin(cfg))
    return MlflowClient(tracking_uri(cfg)), name


RegistryModelOption = typer.Option(None, "--model", "-m", help="Registered model name (default: the classifier of the current params' lineage, <experiment>-<lineage>-classifier).")


@app.command()
def champion(model: Optional[str] = RegistryModelOption, params: Path = ParamsOption) -> None:
    """Show which version holds `champion`, and every recorded move of the alias."""
    from pipeline import gate

    def show():
        client, name = _registry_client(params, model)
        return gate.history_text(client, name)

    typer.echo(_run(show))


@app.command()
def rollback(
    to: str = typer.Option(..., "--to", help="Version number that takes the champion alias."),
    reason: str = typer.Option(None, "--reason", help="Why (recorded with the move; required)."),
    model: Optional[str] = RegistryModelOption,
    params: Path = ParamsOption,
) -> None:
    """Move `champion` to an earlier (or any) version by hand; the move is recorded like the gate's."""
    from pipeline import gate

    def move():
        client, name = _registry_client(params, model)
        return name, gate.rollback(client, name, to, reason or "")

    name, record = _run(move)
    if record is None:
        typer.echo(f"{name}: v{to} already holds champion; nothing moved")
    else:
        typer.echo(f"{name}: champion moved from {'v' + record['from'] if record['from'] else 'no version'} to v{record['to']}")


@app.command()
def ingest(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Take every ready batch of the stream source into the ledger (dataset=stream)."""
    cfg, entries = _run(lambda: _ingest(params, overrides))
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
    from hydra_plugins.recall_resolvers import ledger_tasks
    from pipeline import config, stream

    cfg = _config(params, overrides)
    entries = stream.ingest_from_config(cfg)
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

    _run(check)
    _, entries = _run(lambda: _ingest(params, None))
    for entry in entries:
        typer.echo(f"{entry['batch']}: " + (f"task {entry['task']}" if entry["status"] == "accepted" else f"rejected: {entry['reason']}"))
    cfg = _run(lambda: config.load(params))
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
    from pipeline import config, stream

    def run():
        cfg = config.load(None, ["dataset=shapes", *(overrides or [])])
        return stream.write_demo_batches(cfg, folder, n_batches=batches, only_next=next_only, flat=flat)

    written = _run(run)
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

    spec, project = _run(configure)
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

    _run(write)
    typer.echo(f"wrote {output}")


if __name__ == "__main__":  # pragma: no cover
    app()
