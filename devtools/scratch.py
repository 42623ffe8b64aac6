"""Scratch projects: a copy of this checkout's code and config under git + DVC in a temporary
folder, for tests and benchmarks that run the real stages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# The checkout this module belongs to: scratch projects copy its code, conf and dvc.yaml.
CHECKOUT = Path(__file__).resolve().parent.parent


# The tiny world (conf/experiment/tiny.yaml): its values, merged into a scratch project's
# conf/config.yaml, and as Hydra overrides for tests that compose in-process.
TINY_EXPERIMENT = CHECKOUT / "conf/experiment/tiny.yaml"


def tiny_config() -> dict:
    """The tiny experiment's values (its group choices are the demo's, already the default)."""
    import yaml

    values = yaml.safe_load(TINY_EXPERIMENT.read_text())
    values.pop("defaults", None)
    return values


def as_overrides(values: dict, prefix: str = "") -> list[str]:
    """Nested config values as Hydra overrides (``a.b=1``, ``a.c=[x,y z]``)."""
    overrides = []
    for key, value in values.items():
        if isinstance(value, dict):
            overrides += as_overrides(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            overrides.append(f"{prefix}{key}=[{','.join(map(str, value))}]")
        else:
            overrides.append(f"{prefix}{key}={value}")
    return overrides


TINY_CONFIG = tiny_config()


def merge_config(into: dict, update: dict) -> None:
    """Merge ``update`` into ``into`` in place, nested mappings key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_config(into[key], value)
        else:
            into[key] = value


def project_env(root: str | Path) -> dict[str, str]:
    """The environment of commands in a scratch project: the venv's programs first on PATH,
    and the copy's own code. (`recall`, a console script, would otherwise import the
    editable install's ``pipeline``.)"""
    env = dict(os.environ)
    env.pop("RECALL_CONF_DIR", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["PYTHONPATH"] = str(root)
    env.update(GIT_AUTHOR_NAME="recall", GIT_AUTHOR_EMAIL="recall@example.com",
               GIT_COMMITTER_NAME="recall", GIT_COMMITTER_EMAIL="recall@example.com")
    return env


def scratch_project(root: str | Path, config_update: dict | None = None, *, compose: list[str] | None = None,
                    folders: tuple[str, ...] = ("pipeline", "conf"), files: tuple[str, ...] = ("dvc.yaml", ".gitignore"),
                    ) -> Path:
    """A copy of this checkout's ``folders`` and ``files`` at ``root`` (a new folder) under
    git + DVC (Hydra composition on), ``config_update`` merged into conf/config.yaml.
    ``compose``: overrides for ``recall compose-params`` to write params.yaml with (None:
    no params.yaml, as a flow run that composes its own wants). Committed."""
    import yaml

    root = Path(root)
    root.mkdir()
    for folder in folders:
        shutil.copytree(CHECKOUT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in files:
        shutil.copy(CHECKOUT / name, root)
    config = yaml.safe_load((root / "conf/config.yaml").read_text())
    merge_config(config, config_update or {})
    (root / "conf/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    commands = [["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "hydra.enabled", "true"]]
    if compose is not None:
        commands.append(["recall", "compose-params", *compose])
    commands += [["git", "add", "-A"], ["git", "commit", "-qm", "scratch copy"]]
    for command in commands:
        result = subprocess.run(command, cwd=root, env=project_env(root), capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed in {root} ({result.returncode}):\n"
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return root
