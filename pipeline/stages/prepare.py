"""Stage `prepare`: draw the shapes world or index an image folder into per-split manifests.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.data import prepare_dataset
from pipeline.tracking.runs import Tracker


def run_prepare(cfg: Config) -> dict[str, Any]:
    with Tracker(cfg).step("prepare", params={"dataset": cfg.dataset.model_dump(mode="json")}) as run:
        prepared = prepare_dataset(cfg)
        summary = {
            "dataset": prepared.dataset,
            "n_classes": len(prepared.classes),
            **{f"n_{split}": len(prepared.samples(split)) for split in prepared.splits},
        }
        run.log_metrics({k: v for k, v in summary.items() if k != "dataset"})
        run.set_tag("recall.dataset_fingerprint", prepared.fingerprint)
    return summary
