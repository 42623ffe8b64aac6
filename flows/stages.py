"""The DVC side of the flows: which stages exist, which must run, where they run, and
running one of them (``dvc repro --single-item``) with its failure classified.

No Prefect here: these are plain functions the flows call and the fast tests check. The
stage list always comes from DVC (``dvc.yaml`` as DVC resolves it, foreach families
included), never from a list kept here, so new or renamed stages need no change.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BAD_INPUT_EXIT_CODE

# Stage families (the name before ``@``) whose command wants a GPU; all others go to cpu.
GPU_FAMILIES = frozenset({"embed", "intake", "generators", "finetune"})
GPU_POOL, CPU_POOL = "gpu", "cpu"

# The environment variable every stage process reads its MLflow parent run key from
# (pipeline.tracking.pipeline_key).
PIPELINE_RUN_ENV = "RECALL_PIPELINE_RUN"

# pipeline/cli.py's `_run` turns the errors a user causes (pipeline.errors.UserError) into
# one "error: ..." line and BAD_INPUT_EXIT_CODE; typer's usage errors also exit with 2.
_FAILED_COMMAND = re.compile(
    r"failed to reproduce '(?P<stage>[^']+)': failed to run: .*, exited with (?P<code>-?\d+)"
)
_LOCKED = "Unable to acquire lock"


class StageError(RuntimeError):
    """A DVC stage did not complete; ``output`` holds what ``dvc repro`` printed."""

    retryable = True

    def __init__(self, stage: str, message: str, output: str = ""):
        super().__init__(f"stage {stage!r}: {message}")
        self.stage = stage
        self.output = output


class StageBadInput(StageError):
    """The stage's command refused its input (config, data, task): retrying cannot help."""

    retryable = False


class StageSetupError(StageError):
    """DVC could not start the stage (unknown stage, invalid dvc.yaml, missing dependency)."""

    retryable = False


class StageTransientError(StageError):
    """The command crashed or DVC's lock was held: worth another try (S3, MLflow, lock)."""


class StageRemoteError(StageError):
    """A step deployment's flow run of the stage failed; that flow run already retried
    what was worth retrying."""

    retryable = False


def is_retryable(exc: BaseException | None) -> bool:
    """Only stage failures that are not the input's or the project's fault are retried."""
    return not isinstance(exc, StageError) or exc.retryable


@dataclass(frozen=True)
class Pipeline:
    """The stages of a DVC project in an order that runs dependencies first, and each
    stage's direct upstream stages."""

    stages: tuple[str, ...]
    upstream: Mapping[str, frozenset[str]]

    def plan(self, changed: Iterable[str]) -> list[str]:
        """The stages to run so that nothing is out of date: the changed ones and everything
        downstream of them, in dependency order. A downstream stage is not yet "changed" to
        ``dvc status`` (its inputs on disk are still the old ones) but will be once its
        upstream has run."""
        selected: set[str] = set(changed)
        unknown = selected - set(self.stages)
        if unknown:
            raise StageSetupError(", ".join(sorted(unknown)), "not a stage of this project's dvc.yaml")
        plan = []
        for stage in self.stages:
            if stage in selected or self.upstream.get(stage, frozenset()) & selected:
                selected.add(stage)
                plan.append(stage)
        return plan

    def tasks(self) -> frozenset[str]:
        """The foreach keys that name a task: those several families share (generators@01,
        replay@01, finetune@01, ...). A key of one family only (embed@train) is an item of
        that family, not a task."""
        families: dict[str, set[str]] = {}
        for stage in self.stages:
            key = task_key(stage)
            if key is not None:
                families.setdefault(key, set()).add(family(stage))
        return frozenset(key for key, names in families.items() if len(names) > 1)

    def units(self, plan: list[str]) -> list[tuple[str, ...]]:
        """``plan`` cut into units that run back to back, dependencies first: each task's
        stages in one unit (its whole chain, to go to one worker as one flow run), every
        other stage a unit of its own. Of the units ready to run, one of the same pool as
        the unit before comes first (fewer hand-overs between pools: the flows send
        consecutive units to the same deployment as one flow run), then ``plan``'s order.
        When no such order exists (a stage outside a task sits between two of that task's
        stages), one unit per stage in ``plan``'s order."""
        tasks = self.tasks()
        position = {stage: i for i, stage in enumerate(plan)}

        def unit_of(stage: str) -> str:
            key = task_key(stage)
            return f"@{key}" if key in tasks else stage

        members: dict[str, list[str]] = {}
        for stage in plan:
            members.setdefault(unit_of(stage), []).append(stage)
        pools = {unit: GPU_POOL if any(pool_for(s) == GPU_POOL for s in stages) else CPU_POOL
                 for unit, stages in members.items()}
        needs: dict[str, set[str]] = {unit: set() for unit in members}
        needed_by: dict[str, set[str]] = {unit: set() for unit in members}
        for stage in plan:
            for up in self.upstream.get(stage, frozenset()):
                if up in position and unit_of(up) != unit_of(stage):
                    needs[unit_of(stage)].add(unit_of(up))
                    needed_by[unit_of(up)].add(unit_of(stage))
        ready = {unit for unit in members if not needs[unit]}
        ordered: list[tuple[str, ...]] = []
        pool = None
        while ready:
            unit = min(ready, key=lambda u: (pools[u] != pool, position[members[u][0]]))
            ready.remove(unit)
            ordered.append(tuple(members[unit]))
            pool = pools[unit]
            for later in needed_by[unit]:
                needs[later].discard(unit)
                if not needs[later]:
                    ready.add(later)
        if len(ordered) < len(members):
            return [(stage,) for stage in plan]
        return ordered

def family(stage: str) -> str:
    """``finetune@03`` -> ``finetune``; ``embed-text`` -> ``embed-text``; a stage in a
    sub-folder's dvc.yaml (``sub/dvc.yaml:embed@train``) -> ``embed``."""
    return stage.rsplit(":", 1)[-1].split("@", 1)[0]


def pool_for(stage: str, gpu_families: Iterable[str] = GPU_FAMILIES) -> str:
    return GPU_POOL if family(stage) in set(gpu_families) else CPU_POOL


def task_key(stage: str) -> str | None:
    """The foreach key of a per-task stage (``evaluate@03`` -> ``03``), else None."""
    _, _, key = stage.rsplit(":", 1)[-1].partition("@")
    return key or None


def discover(project_dir: str | Path) -> Pipeline:
    """Read the stage graph from DVC itself (dvc.yaml with params.yaml interpolated)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(project_dir)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        # Post-order over dependency edges: every stage after its dependencies, and
        # otherwise in dvc.yaml's order (DVC's own plan_repro does the same).
        ordered = [s for s in nx.dfs_postorder_nodes(graph) if isinstance(s, PipelineStage)]

        def address(stage) -> str:
            # What `dvc repro` run in the project root accepts (DVC's own `addressing` is
            # relative to this process's cwd).
            dvcfile = os.path.relpath(stage.dvcfile.path, repo.root_dir)
            return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

        upstream = {
            address(s): frozenset(address(d) for d in graph.successors(s) if isinstance(d, PipelineStage))
            for s in ordered
        }
        return Pipeline(tuple(address(s) for s in ordered), upstream)


def dvc_program() -> str:
    """The ``dvc`` installed beside this Python (the project's venv or the worker's image)."""
    return str(Path(sys.executable).parent / "dvc")


def stage_env(pipeline_run: str | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage process: this one's, the venv's programs first on PATH
    (dvc.yaml calls ``recall``), and the MLflow parent-run key when there is one."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.defpath)}"
    if pipeline_run:
        env[PIPELINE_RUN_ENV] = pipeline_run
    return env


def changed_stages(project_dir: str | Path, env: Mapping[str, str] | None = None) -> list[str]:
    """The stages ``dvc status`` reports as not up to date."""
    import json

    result = subprocess.run(
        [dvc_program(), "status", "--json"], cwd=project_dir, env=dict(env or stage_env(None)),
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise StageSetupError("*", f"dvc status failed ({result.returncode}): {_last_lines(result.stderr)}", result.stderr)
    return list(json.loads(result.stdout or "{}"))


def classify_failure(stage: str, returncode: int, output: str) -> StageError:
    """Turn a failed ``dvc repro --single-item`` into the error the flow should raise."""
    command = _FAILED_COMMAND.search(output)
    if command is not None:
        code = int(command.group("code"))
        if code == BAD_INPUT_EXIT_CODE:
            return StageBadInput(stage, _cli_error_line(output) or f"its command exited with {code}", output)
        return StageTransientError(stage, f"its command exited with {code}: {_cli_error_line(output) or _last_lines(output)}",
                                   output)
    if _LOCKED in output:
        return StageTransientError(stage, "DVC's lock is held by another dvc process", output)
    return StageSetupError(stage, f"dvc repro exited with {returncode}: {_last_lines(output)}", output)


def run_stage(project_dir: str | Path, stage: str, env: Mapping[str, str]) -> str:
    """``dvc repro --single-item <stage>``: runs it if it is out of date (DVC skips it
    otherwise); returns what DVC printed, raises a classified ``StageError``."""
    result = subprocess.run(
        [dvc_program(), "repro", "--single-item", stage], cwd=project_dir, env=dict(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if result.returncode != 0:
        raise classify_failure(stage, result.returncode, result.stdout)
    return result.stdout


def default_remote(project_dir: str | Path) -> str | None:
    """The name of the project's default DVC remote, or None when it has none."""
    result = subprocess.run([dvc_program(), "remote", "default"], cwd=project_dir, env=stage_env(None),
                            capture_output=True, text=True)
    name = result.stdout.strip()
    return name if result.returncode == 0 and name else None


def run_push(project_dir: str | Path, stages: list[str]) -> str:
    """Send the outputs of ``stages`` (all of the project's when empty) and the run cache to
    the default DVC remote (machines share state through it: a later stage elsewhere pulls
    them)."""
    result = subprocess.run(
        [dvc_program(), "push", "--run-cache", *stages], cwd=project_dir, env=stage_env(None),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if result.returncode != 0:
        raise StageTransientError(",".join(stages) or "dvc push", f"dvc push failed: {_last_lines(result.stdout)}",
                                  result.stdout)
    return result.stdout


def run_recall(project_dir: str | Path, args: list[str], env: Mapping[str, str]) -> str:
    """A ``recall`` command outside DVC (compose-params, ingest); exit 2 is bad input, any
    other failure (75: a server does not answer) is worth a retry."""
    program = Path(sys.executable).parent / "recall"
    result = subprocess.run(
        [str(program), *args], cwd=project_dir, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode == BAD_INPUT_EXIT_CODE:
        raise StageBadInput(f"recall {args[0]}", _cli_error_line(result.stdout) or "bad input", result.stdout)
    if result.returncode != 0:
        raise StageTransientError(
            f"recall {args[0]}", f"exited with {result.returncode}: {_cli_error_line(result.stdout) or _last_lines(result.stdout)}",
            result.stdout)
    return result.stdout


def _cli_error_line(output: str) -> str | None:
    """The CLI's one-line error (``error: ...``), as the user would read it."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("error:")]
    return lines[-1] if lines else None


def _last_lines(output: str, n: int = 5) -> str:
    return " | ".join(line.strip() for line in output.strip().splitlines()[-n:])
