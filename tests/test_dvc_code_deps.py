"""What DVC knows about the code matches the code.

- Every stage lists, as deps, the modules whose code computes its outputs: derived here from
  the `recall` command the stage runs (pipeline/cli/stage_commands.py -> the stage module it
  imports -> the pipeline modules that module imports). A stage missing one would not re-run
  after a change to it, and `dvc status` would call stale results up to date.
- The committed dvc.lock records the committed code: the metrics, plots and README figures
  come from the code a user runs (`dvc status` finds no code dependency modified).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Modules that move data around without deciding any number a stage writes: reading the
# config, atomic writes, the error classes, MLflow runs, lineage and registry names/lookups,
# the Dask client (results identical to one process: tests/test_scaleout.py), reading a
# task's inputs and the CLI around the stages. A change to them re-runs nothing, by design.
PLUMBING = {
    "pipeline/config", "pipeline/io.py", "pipeline/errors.py", "pipeline/compat.py", "pipeline/scaleout.py",
    "pipeline/tracking/server.py", "pipeline/tracking/runs.py", "pipeline/tracking/lineage.py",
    "pipeline/tracking/registry.py", "pipeline/stages/task_inputs.py", "pipeline/cli",
}
STAGE_COMMANDS = "pipeline/cli/stage_commands.py"


def _module_file(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pipeline":
        return None
    path = REPO.joinpath(*parts)
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py").relative_to(REPO).as_posix()
    if (path / "__init__.py").exists():
        return path.relative_to(REPO).as_posix()
    return None


def _imports_in(nodes: list[ast.AST], package: str) -> set[str]:
    """Pipeline modules (file or package folder) imported by these statements."""
    found = set()
    for node in nodes:
        for child in ast.walk(node):
            if isinstance(child, ast.ImportFrom) and child.module:
                base = child.module
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [child.module])
                for alias in child.names:
                    found.add(_module_file(f"{base}.{alias.name}") or _module_file(base))
            elif isinstance(child, ast.Import):
                found.update(_module_file(alias.name) for alias in child.names)
    return {f for f in found if f}


def _plumbing(module: str) -> bool:
    return any(module == p or module.startswith(p + "/") for p in PLUMBING)


@cache
def _module_closure(path: str) -> frozenset[str]:
    """``path`` and every pipeline module it imports, transitively, at module level or inside
    a function (a lazy import serves some caller, perhaps this stage): a safe superset of the
    code that runs when the stage calls into it. Plumbing is not followed."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if _plumbing(current):
            continue
        files = sorted((REPO / current).rglob("*.py")) if (REPO / current).is_dir() else [REPO / current]
        for file in files:
            module = file.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
            package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
            todo.extend(_imports_in([ast.parse(file.read_text())], package) - seen)
    return frozenset(seen)


def _stage_code(stage_module: str) -> set[str]:
    """The modules a stage module's code runs: its import closure, plumbing left out."""
    return {m for m in _module_closure(stage_module) if not _plumbing(m)}


def _cli_commands() -> dict[str, set[str]]:
    """`recall` command name -> the stage modules (pipeline/stages/*.py) it imports."""
    tree = ast.parse((REPO / STAGE_COMMANDS).read_text())
    commands = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", None) == "command":
                name = decorator.args[0].value if decorator.args else node.name.replace("_", "-")
                commands[name] = {m for m in _imports_in([node], "pipeline.cli") if m.startswith("pipeline/stages/")}
    return commands


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _covered(module: str, deps: list[str]) -> bool:
    return any(module == dep or module.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_each_stage_lists_the_code_that_computes_its_outputs():
    commands = _cli_commands()
    missing = {}
    for name, stage in _stages().items():
        command = stage["cmd"].split()[1]
        assert command in commands, f"stage {name}: `recall {command}` is not a command of {STAGE_COMMANDS}"
        code = set().union(*(_stage_code(m) for m in commands[command]))
        assert code, f"stage {name}: `recall {command}` runs no stage module"
        deps = [d for d in stage.get("deps", []) if isinstance(d, str)]
        lacking = sorted(m for m in code if not _covered(m, deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stages miss code they run: {missing}"


def test_the_derivation_sees_what_a_stage_imports():
    """The rule above can fail: finetune's code reaches the generators through the replay
    sampler, the report's reaches the metrics, evaluate's the gate; plumbing stays out."""
    commands = _cli_commands()
    assert commands["finetune"] == {"pipeline/stages/finetune.py"}
    finetune = _stage_code("pipeline/stages/finetune.py")
    assert {"pipeline/stages/finetune.py", "pipeline/method/prompts.py", "pipeline/method/head.py",
            "pipeline/method/replay.py", "pipeline/method/generators.py"} <= finetune
    assert "pipeline/method/metrics.py" in _stage_code("pipeline/stages/report.py")
    assert "pipeline/tracking/gate.py" in _stage_code("pipeline/stages/evaluate.py")
    assert not any(_plumbing(m) for m in finetune)


@pytest.mark.slow
def test_dvc_lock_records_the_committed_code():
    """`dvc status` in this checkout names no modified code dependency (outputs may be
    missing in a fresh clone: they live in the DVC cache, not in git)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([str(dvc), "status", "--json"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout or "{}")
    stale = {}
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict):
                continue
            for path, state in change.get("changed deps", {}).items():
                if path.startswith(("pipeline/", "flows/")) and state == "modified":
                    stale.setdefault(stage, []).append(path)
    assert not stale, (
        f"dvc.lock records other code than the files hold: {stale}; re-run `make demo` and commit "
        "dvc.lock, metrics/ and plots/ with the code"
    )


@pytest.mark.slow
def test_dvc_lock_holds_only_stages_dvc_yaml_defines():
    """A stage renamed or removed leaves its entry in dvc.lock (DVC does not prune it): md5s of
    code that no stage runs any more, which reads as stale."""
    from dvc.repo import Repo

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    with Repo(str(REPO)) as repo:
        defined = {stage.addressing for stage in repo.index.stages}
    assert not set(lock) - defined, f"dvc.lock has entries of stages dvc.yaml lacks: {sorted(set(lock) - defined)}"
