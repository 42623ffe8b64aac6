"""The commands dvc.yaml's stages run: one per stage family, each calling its stage module
(``pipeline.stages.*``), imported when the command runs so a stage loads only its own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.core import OverridesArg, ParamsOption, app, load_config, run_step


@app.command()
def prepare(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Prepare the dataset: images (demo) and per-split manifests."""
    from pipeline.stages.prepare import run_prepare

    result = run_step(lambda: run_prepare(load_config(params, overrides)))
    typer.echo(result)


@app.command()
def split(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Draw the class-incremental task split from the seed."""
    from pipeline.stages.split import run_split

    result = run_step(lambda: run_split(load_config(params, overrides)))
    for t, names in enumerate(result["task_class_names"]):
        typer.echo(f"task {t + 1}: {', '.join(names)}")


@app.command()
def backbone(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Materialise the CLIP backbone (pretrain the demo one) into one weights file."""
    from pipeline.stages.backbone import run_backbone

    info = run_step(lambda: run_backbone(load_config(params, overrides)))
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
    from pipeline.stages.embed import run_embed

    index = run_step(lambda: run_embed(load_config(params, overrides), split_name))
    typer.echo(
        f"{split_name}: {index['n_samples']} embeddings, {len(index['skipped'])} skipped, "
        f"{index['images_per_second']:.1f} img/s end to end"
        + (" (reused)" if index["reused"] else "")
    )


@app.command("embed-text")
def embed_text(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Encode every class name with the dataset's prompt templates."""
    from pipeline.stages.embed import run_embed_text

    result = run_step(lambda: run_embed_text(load_config(params, overrides)))
    typer.echo(result)


TaskOption = typer.Option(..., "--task", "-t", help="Task number, from 1.")


@app.command("generators")
def fit_generators(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Fit the per-class generators of one task's classes."""
    from pipeline.stages.generators import run_fit_generators

    typer.echo(run_step(lambda: run_fit_generators(load_config(params, overrides), task)))


@app.command("replay-init")
def replay_init(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Write the empty replay index (task 0) every task's index grows from."""
    from pipeline.stages.replay import run_init_replay

    typer.echo(run_step(lambda: run_init_replay(load_config(params, overrides))))


@app.command()
def replay(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """The replay index of a task: the previous task's plus this task's generator file and its hash."""
    from pipeline.stages.replay import run_replay

    typer.echo(run_step(lambda: run_replay(load_config(params, overrides), task)))


@app.command("prompts-init")
def prompts_init(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Write the untrained prompt state (task 0)."""
    from pipeline.stages.prompts import run_init_prompts

    typer.echo(run_step(lambda: run_init_prompts(load_config(params, overrides))))


@app.command()
def intake(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Stream: embed one task's batch (train and test images, streamed from the source) and its class names."""
    from pipeline.stages.intake import run_intake

    figures = run_step(lambda: run_intake(load_config(params, overrides), task))
    typer.echo(f"task {task}: {figures['train_samples']} train and {figures['test_samples']} test images embedded")


@app.command()
def novelty(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Before a task trains: how many of its new test images the current champion would flag as unknown."""
    from pipeline.stages.novelty import run_novelty

    result = run_step(lambda: run_novelty(load_config(params, overrides), task))
    typer.echo(f"task {task}: {result.get('summary', result['status'])}")


@app.command()
def finetune(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Train the prompts of every seen class at one task."""
    from pipeline.stages.finetune import run_finetune

    typer.echo(run_step(lambda: run_finetune(load_config(params, overrides), task)))


@app.command()
def evaluate(task: int = TaskOption, params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Evaluate after one task on every task's test embeddings."""
    from pipeline.stages.evaluate import run_evaluate

    result = run_step(lambda: run_evaluate(load_config(params, overrides), task))
    typer.echo(f"task {task}: accuracy over seen classes {100 * result['step_accuracy']:.1f}%")


@app.command()
def report(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Summarise the run: metrics, plots and a table."""
    from pipeline.stages.report import format_report, run_report

    typer.echo(format_report(run_step(lambda: run_report(load_config(params, overrides)))))


@app.command()
def summary(params: Path = ParamsOption, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Print what the pipeline has produced so far."""
    from pipeline.stages.report import summary

    typer.echo(run_step(lambda: summary(load_config(params, overrides))))
