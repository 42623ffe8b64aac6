"""What each task is made of, in benchmark mode and in the stream alike.

A task's per-task stages read its classes and embeddings through :func:`task_inputs`, from
the paths its entry in ``split.tasks`` names (see pipeline/config/task_chain.py):

- benchmark: the classes from the task split, the embeddings from the whole-split folders
  shared by every task (filtered to the task's classes), the text features of every class;
- stream: the classes from the task's manifest (written once by ``recall ingest``), the
  embeddings and text features of its own batch (``recall intake``).

Class ids are global: the dataset's class index in benchmark mode, the order in which the
stream's classes arrived (ledger order) in the stream. Earlier tasks are reached through
their own (immutable) entries, never through a file that grows with the stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.errors import UserError


class TaskDefinitionError(UserError):
    """A task's classes cannot be read; names the file and task."""


@dataclass(frozen=True)
class TaskInputs:
    task: int
    class_ids: list[int]
    class_names: list[str]
    train: Path
    test: Path
    text: Path
    # Classes of later tasks that are already known (benchmark only: the stream never knows
    # what arrives next); their test images measure transfer and novel-class detection.
    future_class_ids: list[int] = field(default_factory=list)
    future_tasks: list[list[int]] = field(default_factory=list)


def _entry(cfg: Config, task: int):
    key = f"{task:02d}"
    if key not in cfg.split.tasks:
        known = f"tasks 1..{cfg.split.n_tasks}" if cfg.split.n_tasks else "no tasks yet"
        hint = " (run `recall ingest`)" if cfg.stream else ""
        raise TaskDefinitionError(f"task {task} is not in split.tasks ({known}){hint}")
    return cfg.split.tasks[key]


def _read(path: Path, task: int) -> dict:
    if not path.exists():
        hint = "run `recall ingest`" if "task-" in path.name else "run the split step"
        raise TaskDefinitionError(f"{path}: missing, it defines task {task}'s classes ({hint})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise TaskDefinitionError(f"{path}: not valid JSON ({exc}); it defines task {task}'s classes") from None


def manifest_class_ids(cfg: Config, manifest: dict) -> list[int]:
    """Global ids of a stream task's classes: recorded at ingest, or (manifests written
    before ids were recorded) the count of classes of the tasks before it onwards."""
    if "class_ids" in manifest:
        return [int(c) for c in manifest["class_ids"]]
    offset = 0
    for earlier in range(1, int(manifest["task"])):
        offset += len(_read(Path(_entry(cfg, earlier).classes), earlier)["classes"])
    return list(range(offset, offset + len(manifest["classes"])))


def task_inputs(cfg: Config, task: int) -> TaskInputs:
    entry = _entry(cfg, task)
    source = Path(entry.classes)
    data = _read(source, task)
    if cfg.stream:
        if int(data.get("task", -1)) != task:
            raise TaskDefinitionError(f"{source}: is the manifest of task {data.get('task')}, not of task {task}")
        ids, names, future = manifest_class_ids(cfg, data), list(data["classes"]), []
    else:
        if task > data["n_tasks"]:
            raise TaskDefinitionError(f"{source}: the split has {data['n_tasks']} tasks; there is no task {task}")
        ids, names = list(data["tasks"][task - 1]), list(data["task_class_names"][task - 1])
        future = [list(t) for t in data["tasks"][task:]]
    return TaskInputs(
        task=task, class_ids=ids, class_names=names, train=Path(entry.train), test=Path(entry.test),
        text=Path(entry.text), future_class_ids=[c for t in future for c in t], future_tasks=future,
    )


def class_names(inputs: list[TaskInputs]) -> dict[int, str]:
    return {c: n for t in inputs for c, n in zip(t.class_ids, t.class_names)}


def load_class_text(path: Path, backbone_sha256: str, class_ids: list[int]) -> dict[str, torch.Tensor]:
    """Text features of ``class_ids`` (rows in that order) from a text-features file: the
    benchmark's holds every class by id, a stream task's its own classes and their ids."""
    from pipeline.clip.embedding import EmbeddingMismatch, load_text_features

    text = load_text_features(path, backbone_sha256)
    if "class_ids" in text:
        row = {int(c): i for i, c in enumerate(text["class_ids"].tolist())}
    else:
        row = {c: c for c in range(len(text["class_features"]))}
    missing = [c for c in class_ids if c not in row]
    if missing:
        raise EmbeddingMismatch(f"{path}: no text features of class id(s) {missing}; re-run the stage that writes it")
    rows = torch.tensor([row[c] for c in class_ids], dtype=torch.long)
    return {"class_features": text["class_features"][rows], "template_features": text["template_features"][rows]}


def load_task_embeddings(folders: list[Path], backbone_sha256: str, class_ids: list[int]) -> dict[str, torch.Tensor]:
    """Embeddings of ``class_ids`` from the given folders (each read once)."""
    from pipeline.clip.embedding import load_embeddings

    parts = [load_embeddings(folder, backbone_sha256, classes=class_ids) for folder in dict.fromkeys(folders)]
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([p[key] for p in parts]) for key in ("embeddings", "labels", "sample_ids")}
