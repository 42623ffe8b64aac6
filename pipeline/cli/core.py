"""The ``recall`` app: its options, logging, and the error boundary every command runs in.

An error the user caused (:class:`pipeline.errors.UserError`) becomes one line and exit
code 2, a server or source that does not answer (:class:`pipeline.errors.Unavailable`) one
line and exit code 75; anything else one line and exit code 1 (``recall -v``: tracebacks).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.compat import disable_telemetry
from pipeline.errors import redact_urls_in

APP_HELP = """``recall``: run one pipeline step from the command line (what dvc.yaml calls).

Every command reads the composed ``params.yaml`` (``--params``) or, given Hydra
overrides such as ``dataset=imagefolder dataset.root=/data``, composes ``conf/`` itself."""

# Set by `recall -v`: tracebacks are for developers; users get one line.
_verbose = False


def _one_line(exc: BaseException) -> str:
    """An unexpected exception as one line, credentials in URLs masked."""
    text = redact_urls_in(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
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


app = _RecallApp(add_completion=False, no_args_is_help=True, help=APP_HELP, pretty_exceptions_enable=False)

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="Composed params file (DVC's params.yaml).")
OverridesArg = typer.Argument(None, help="Hydra overrides, e.g. dataset=cifar100 seed=1 (composes conf/ instead of reading --params).")


def load_config(params: Path, overrides: Optional[list[str]]):
    from pipeline import config

    return config.load(params, overrides or None)


def run_step(fn):
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


