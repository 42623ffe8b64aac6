"""Stage `backbone`: materialise the CLIP weights (pretrain the demo CLIP) and record their
sha256.
"""

from __future__ import annotations

from typing import Any

from pipeline.clip import backbone as backbone_lib
from pipeline.config import Config
from pipeline.data import load_prepared
from pipeline.io import write_json
from pipeline.stages._common import metrics_file, set_torch_threads
from pipeline.tracking.runs import Tracker


def run_backbone(cfg: Config) -> dict[str, Any]:
    set_torch_threads()
    tracker = Tracker(cfg)
    with tracker.step("backbone", params={"backbone": cfg.backbone.model_dump(mode="json")}) as run:
        pretrain = None
        if cfg.backbone.source == "pretrain":
            from pipeline.clip.demo_clip import pretrain_tiny_clip

            prepared = load_prepared(cfg.paths.prepared)
            if prepared.dataset != "shapes":
                raise backbone_lib.BackboneError(
                    f"backbone {cfg.backbone.name!r} is pretrained on the shapes demo world, "
                    f"not on {prepared.dataset!r}; pick an open_clip backbone (hub or local_file)"
                )

            def pretrain():
                return pretrain_tiny_clip(cfg.backbone, prepared, log_metric=run.log_metric)

        info = backbone_lib.materialise(cfg.backbone, cfg.paths.backbone, pretrain=pretrain)
        run.log_metrics(info["metrics"])
        run.set_tag("recall.backbone_sha256", info["sha256"])
        write_json(metrics_file(cfg, "backbone"), {"sha256": info["sha256"], **info["metrics"]})
    return info
