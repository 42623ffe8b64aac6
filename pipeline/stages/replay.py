"""Stages `replay-init` and `replay@NN`: the generator index finetuning draws fresh replay
from (no synthetic sample is stored).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.stages._common import TaskInputError, replay_index_file, seen_task_inputs, task_file
from pipeline.tracking.runs import Tracker


def run_init_replay(cfg: Config) -> dict[str, Any]:
    """Task 0: the empty generator index every task's index grows from."""
    from pipeline.method.replay import write_empty_index

    with Tracker(cfg).step("replay-init"):
        write_empty_index(replay_index_file(cfg, 0))
    return {"generators": 0}


def run_replay(cfg: Config, task: int) -> dict[str, Any]:
    """Task ``task``'s generator index: task ``task - 1``'s plus this task's generator file and
    its hash. Nothing is sampled here: finetuning draws fresh samples from every file the
    index names, each epoch (pipeline/replay.py)."""
    from pipeline.method.replay import ReplayError, extend_index

    with Tracker(cfg).step("replay", task=task) as run:
        seen_inputs = seen_task_inputs(cfg, task)
        bank_path = task_file(cfg.paths.generators, task)
        previous_path = replay_index_file(cfg, task - 1)
        run.record_inputs(previous_index=previous_path, **{f"generators_task_{task:02d}": bank_path})
        try:
            index = extend_index(previous_path, task, bank_path, seen_inputs[-1].class_ids, replay_index_file(cfg, task))
        except ReplayError as exc:
            raise TaskInputError(f"task {task}: {exc}") from None
        classes = sum(len(entry["class_ids"]) for entry in index["generators"])
        run.log_metrics({"replay_classes": classes}, step=task)
    return {"generators": len(index["generators"]), "classes": classes}
