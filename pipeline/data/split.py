"""Class-incremental task split: disjoint class sets, order permuted by the run's seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.io import read_json, write_json


class SplitError(UserError):
    pass


def make_split(
    classes: list[str], n_tasks: int, seed: int, class_order: list[str] | list[int] | None = None
) -> dict:
    n = len(classes)
    if n_tasks > n:
        raise SplitError(f"split.n_tasks={n_tasks} but the dataset has only {n} classes")
    if class_order is None:
        order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    else:
        order = [_class_index(c, classes) for c in class_order]
        if sorted(order) != list(range(n)):
            missing = [classes[i] for i in sorted(set(range(n)) - set(order))]
            repeated = sorted({classes[i] for i in order if order.count(i) > 1})
            raise SplitError(
                "split.class_order must list every class exactly once"
                + (f"; missing: {missing}" if missing else "")
                + (f"; repeated: {repeated}" if repeated else "")
            )
    # The first n % n_tasks tasks take one class more.
    sizes = [n // n_tasks + (1 if t < n % n_tasks else 0) for t in range(n_tasks)]
    tasks, start = [], 0
    for size in sizes:
        tasks.append(order[start : start + size])
        start += size
    return {
        "seed": seed,
        "n_tasks": n_tasks,
        "class_order": order,
        "tasks": tasks,
        "task_class_names": [[classes[c] for c in task] for task in tasks],
    }


def _class_index(item: str | int, classes: list[str]) -> int:
    if isinstance(item, int):
        if not 0 <= item < len(classes):
            raise SplitError(f"split.class_order: class index {item} is outside 0..{len(classes) - 1}")
        return item
    if item not in classes:
        raise SplitError(f"split.class_order: unknown class {item!r}")
    return classes.index(item)


def write_split(path: str | Path, split: dict) -> None:
    write_json(path, split)


def load_split(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no task split (run the split step first)")
    return read_json(path)


def check_task(split: dict, task: int) -> None:
    if not 1 <= task <= split["n_tasks"]:
        raise SplitError(f"task {task} is outside the split (tasks 1..{split['n_tasks']})")


def task_classes(split: dict, task: int) -> list[int]:
    """Classes of task ``task`` (numbered from 1)."""
    check_task(split, task)
    return list(split["tasks"][task - 1])


def seen_classes(split: dict, task: int) -> list[int]:
    """Classes of tasks 1..``task``, in task order."""
    check_task(split, task)
    return [c for t in split["tasks"][:task] for c in t]
