"""Stage `split`: the class-incremental task split (benchmark) or the tasks the stream's
ledger holds so far.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.data import load_prepared
from pipeline.data.split import make_split, write_split
from pipeline.stages._common import seen_task_inputs
from pipeline.tracking.runs import Tracker


def run_split(cfg: Config) -> dict[str, Any]:
    """The benchmark's task split; for the stream, the tasks its ledger holds so far (a
    record for people and the report: per-task stages read their own manifests)."""
    with Tracker(cfg).step("split", params={"seed": cfg.seed, "split": cfg.split.model_dump(mode="json")}) as run:
        if cfg.stream:
            inputs = seen_task_inputs(cfg, cfg.split.n_tasks)
            split = {
                "seed": cfg.seed, "n_tasks": len(inputs), "mode": "stream",
                "class_order": [c for t in inputs for c in t.class_ids],
                "tasks": [t.class_ids for t in inputs],
                "task_class_names": [t.class_names for t in inputs],
            }
        else:
            prepared = load_prepared(cfg.paths.prepared)
            split = make_split(prepared.classes, cfg.split.n_tasks, cfg.seed, cfg.split.class_order)
        write_split(cfg.paths.split, split)
        run.log_metrics({"n_tasks": split["n_tasks"], "n_classes": len(split["class_order"])})
        run.set_tag("recall.class_order", ",".join(map(str, split["class_order"])))
    return split
