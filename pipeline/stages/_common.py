"""What the stage modules share: the per-task file names, a task's checked inputs and
torch's thread count.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.config.task_chain import task_stem
from pipeline.errors import UserError
from pipeline.stages import task_inputs as tasks_lib
from pipeline.stages.task_inputs import TaskInputs


def metrics_file(cfg: Config, name: str) -> Path:
    return Path(cfg.paths.metrics) / f"{name}.json"


def set_torch_threads() -> None:
    """All cores for torch, unless OMP_NUM_THREADS says otherwise (steps sharing a machine
    with other jobs: oversubscribed OpenMP threads spin and slow everyone down)."""
    import os

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else max(1, os.cpu_count() or 1))


def task_file(folder: str, task: int, suffix: str = ".safetensors") -> Path:
    return Path(folder) / f"{task_stem(task)}{suffix}"


class TaskInputError(UserError):
    """Inputs of a per-task step that cannot be used; names the task and class."""


def checked_task_inputs(cfg: Config, task: int) -> TaskInputs:
    try:
        return tasks_lib.task_inputs(cfg, task)
    except tasks_lib.TaskDefinitionError as exc:
        raise TaskInputError(str(exc)) from None


def seen_task_inputs(cfg: Config, task: int) -> list[TaskInputs]:
    return [checked_task_inputs(cfg, t) for t in range(1, task + 1)]


def real_embeddings(folders: list[Path], sha256: str, classes: list[int]) -> dict[str, torch.Tensor]:
    data = tasks_lib.load_task_embeddings(folders, sha256, classes)
    finite = torch.isfinite(data["embeddings"]).all(dim=1)
    if not finite.all():
        bad = sorted(set(data["labels"][~finite].tolist()))
        raise TaskInputError(f"NaN or inf in the train embeddings of class(es) {bad} ({', '.join(map(str, folders))})")
    return data


def replay_index_file(cfg: Config, task: int) -> Path:
    return task_file(cfg.paths.replay, task, ".json")


def feature_dim(backbone) -> int:
    with torch.no_grad():
        return int(backbone.model.encode_text(backbone.tokenizer(["a"])).shape[-1])


def arrivals_folder(cfg: Config) -> str:
    return str(Path(cfg.paths.metrics) / "arrivals")


def seconds_of(path: Path) -> float:
    from pipeline.io import read_tensor_metadata

    return float(read_tensor_metadata(path).get("seconds", "nan"))
