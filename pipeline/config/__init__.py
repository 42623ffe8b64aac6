"""The one typed, validated config object that reaches every step.

Configs come from Hydra groups under ``conf/`` (composed with overrides) or from the
composed ``params.yaml`` that DVC reads. Either way they are validated here: an unknown
key, an unknown group option, or a value of the wrong type or range is a ``ConfigError``
that names the key and, for group options, lists the valid ones.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.schema import (  # the schema, importable from pipeline.config
    BackboneConfig,
    Cifar100Dataset,
    ClusterConfig,
    Config,
    ConfigError,
    DatasetConfig,
    EmbedConfig,
    GateConfig,
    GaussGenerator,
    GeneratorConfig,
    HeadConfig,
    ImageFolderDataset,
    ImageNetRDataset,
    MethodConfig,
    ModeStages,
    MogGenerator,
    PathsConfig,
    PretrainConfig,
    PromptConfig,
    ScheduleConfig,
    ShapesDataset,
    ShapesWorld,
    SplitConfig,
    StreamDataset,
    TaskLink,
    TrackingConfig,
    VaeGenerator,
)

__all__ = [
    "BackboneConfig",
    "Cifar100Dataset",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "EmbedConfig",
    "GateConfig",
    "GaussGenerator",
    "GeneratorConfig",
    "HeadConfig",
    "ImageFolderDataset",
    "ImageNetRDataset",
    "MethodConfig",
    "ModeStages",
    "MogGenerator",
    "PathsConfig",
    "PretrainConfig",
    "PromptConfig",
    "ScheduleConfig",
    "ShapesDataset",
    "ShapesWorld",
    "SplitConfig",
    "StreamDataset",
    "TaskLink",
    "TrackingConfig",
    "VaeGenerator",
    "GROUPS", "compose", "conf_dir", "group_options", "load", "set_task_count", "validate", "write_params",
]

GROUPS = ("dataset", "backbone", "method", "generator", "schedule", "tracking")


def conf_dir() -> Path:
    """The Hydra config folder: $RECALL_CONF_DIR, else ./conf, else the repo's conf/."""
    if env := os.environ.get("RECALL_CONF_DIR"):
        return Path(env).resolve()
    local = Path.cwd() / "conf"
    if (local / "config.yaml").exists():
        return local.resolve()
    return (Path(__file__).resolve().parents[2] / "conf").resolve()


def group_options(group: str, directory: Path | None = None) -> list[str]:
    directory = directory or conf_dir()
    return sorted(p.stem for p in (directory / group).glob("*.yaml"))


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Turn a plain dict into a Config, or raise ConfigError naming the key at fault."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, raw, source)) from None


def _explain(exc: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for error in exc.errors():
        # Drop the discriminator tags pydantic inserts into the location.
        loc = [str(p) for p in error["loc"]]
        group = loc[0] if loc else ""
        tagged = raw.get(group, {}).get("name") if isinstance(raw.get(group), dict) else None
        loc = [p for i, p in enumerate(loc) if not (i == 1 and tagged is not None and p == tagged)]
        key = ".".join(loc) or "<root>"
        if error["type"] == "union_tag_invalid" or (
            error["type"] == "literal_error" and loc[-1:] == ["name"] and group in GROUPS
        ):
            options = ", ".join(group_options(group)) or "none found"
            value = raw.get(group, {}).get("name") if isinstance(raw.get(group), dict) else None
            lines.append(f"  {group}: unknown option {value!r}; valid options: {options}")
        elif error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif error["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def compose(overrides: list[str] | None = None, directory: Path | None = None) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra overrides into a plain dict (not validated)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import hydra_plugins.recall_resolvers  # noqa: F401  (registers ${recall_task_chain:...})

    directory = (directory or conf_dir()).resolve()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"{directory}: {exc}") from None
    return data  # type: ignore[return-value]


def load(params: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """The config a step runs with.

    With overrides, compose the Hydra groups; otherwise read the composed params file
    (what `dvc repro` and `dvc exp run -S` produce).
    """
    if overrides or params is None:
        return validate(compose(overrides), source=f"{conf_dir()}/config.yaml")
    path = Path(params)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    _reject_missing_markers(raw, str(path))
    return validate(raw, source=str(path))


def _reject_missing_markers(raw: Any, source: str, prefix: str = "") -> None:
    if isinstance(raw, dict):
        for key, value in raw.items():
            _reject_missing_markers(value, source, f"{prefix}{key}.")
    elif raw == "???":
        raise ConfigError(f"{source}: {prefix.rstrip('.')}: required value is not set ('???')")


def set_task_count(path: str | Path, n_tasks: int) -> bool:
    """Set ``split.n_tasks`` in a composed params file and re-derive what follows from it
    (the task chain, the mode's stage families), keeping every other value as it is (a
    params file may hold overrides that recomposing would lose). Returns whether it changed."""
    from pipeline.config.task_chain import stage_switches, task_chain

    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    paths, dataset = raw["paths"], raw["dataset"]["name"]
    chain = task_chain(n_tasks, dataset, paths["embeddings"], paths["split"], paths["tasks"], paths["evaluations"], paths["prompts"])
    updated = {**raw, "split": {**raw["split"], "n_tasks": n_tasks, "tasks": chain}, "mode_stages": stage_switches(dataset, chain)}
    if updated == raw:
        return False
    validate(updated, source=str(path))
    write_params(path, updated)
    return True


class _ParamsDumper(yaml.SafeDumper):
    """PyYAML writes YAML 1.1, DVC reads YAML 1.2: a string such as ``08`` (not octal in 1.1,
    so left unquoted) reads back as the integer 8 there, and task 08's stages vanish. Any
    string a 1.2 reader would take for a number is quoted."""


_YAML12_NUMBER = re.compile(r"^[-+]?(\d+|\d*\.\d+|\d+\.\d*)([eE][-+]?\d+)?$|^0x[0-9a-fA-F]+$|^0o[0-7]+$")


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "'" if _YAML12_NUMBER.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ParamsDumper.add_representer(str, _represent_str)


def write_params(path: str | Path, raw: dict[str, Any]) -> None:
    """Write a composed config as params.yaml (atomically), readable alike by YAML 1.1
    (PyYAML, Hydra) and YAML 1.2 (DVC) readers."""
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.dump(raw, Dumper=_ParamsDumper, sort_keys=False))
