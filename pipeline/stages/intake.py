"""Stage `intake@NN` (stream mode): embed one batch's images, streamed from its source, and
its classes' text features.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from pipeline import scaleout
from pipeline.clip import backbone as backbone_lib
from pipeline.clip import embedding as embed_lib
from pipeline.config import Config
from pipeline.io import write_json
from pipeline.stages._common import TaskInputError, checked_task_inputs, metrics_file, set_torch_threads
from pipeline.tracking.runs import Tracker

log = logging.getLogger(__name__)


def run_intake(cfg: Config, task: int) -> dict[str, Any]:
    """The stream's task ``task``: embed its batch's train and test images, streamed from
    the source its manifest names (nothing is copied into the project), and its classes'
    text features. Earlier batches are never read again."""
    from pipeline.io import write_tensors
    from pipeline.stream.images import embed_task
    from pipeline.stream.ledger import load_task_manifest
    from pipeline.stream.sources import open_source

    set_torch_threads()
    if not cfg.stream:
        raise TaskInputError("recall intake embeds a stream task's batch; this config is a benchmark (dataset.name != stream)")
    inputs = checked_task_inputs(cfg, task)
    manifest = load_task_manifest(cfg.paths.tasks, task)
    tracker = Tracker(cfg)
    with tracker.step("intake", task=task, params={"embed": cfg.embed.model_dump(mode="json"), "batch": manifest["batch"]}) as run:
        device = embed_lib.resolve_device(cfg.embed.device)
        backbone = backbone_lib.load_backbone(cfg.paths.backbone, device=device)
        source = open_source(manifest["source"], cfg.dataset.endpoint_url)
        figures: dict[str, float] = {}
        with scaleout.cluster_client(cfg.cluster) as client:
            for split_name, out in (("train", inputs.train), ("test", inputs.test)):
                index = embed_task(
                    source, manifest, split_name, backbone, out, class_ids=inputs.class_ids,
                    batch_size=cfg.embed.batch_size, num_workers=cfg.embed.num_workers, chunk_size=cfg.embed.chunk_size,
                    on_bad_image=cfg.embed.on_bad_image, precision=cfg.embed.precision,
                    client=client, backbone_dir=cfg.paths.backbone,
                )
                figures[f"{split_name}_samples"] = index["n_samples"]
                figures[f"{split_name}_skipped"] = len(index["skipped"])
                figures[f"{split_name}_images_per_second"] = index["images_per_second"]
        class_features, per_template = embed_lib.class_text_features(backbone, inputs.class_names, list(cfg.dataset.templates))
        write_tensors(
            inputs.text,
            {"class_features": class_features, "template_features": per_template,
             "class_ids": torch.tensor(inputs.class_ids, dtype=torch.long)},
            metadata={"backbone_sha256": backbone.sha256, "task": str(task), "task_digest": manifest["digest"],
                      "class_names": json.dumps(inputs.class_names)},
        )
        run.log_metrics(figures, step=task)
        run.set_tag("recall.batch", manifest["batch"])
        run.set_tag("recall.backbone_sha256", backbone.sha256)
        write_json(metrics_file(cfg, f"intake-{task:02d}"), {"batch": manifest["batch"], **figures})
        log.info("task %d (%s): %d train and %d test images embedded", task, manifest["batch"],
                 figures["train_samples"], figures["test_samples"])
    return figures
