"""Stages `embed@<split>` and `embed-text@all` (benchmark mode): image embeddings in bounded
chunks and the classes' text features.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import scaleout
from pipeline.clip import backbone as backbone_lib
from pipeline.clip import embedding as embed_lib
from pipeline.config import Config
from pipeline.data import load_prepared
from pipeline.io import write_json
from pipeline.stages._common import metrics_file, set_torch_threads
from pipeline.tracking.runs import Tracker

log = logging.getLogger(__name__)


def run_embed(cfg: Config, split: str) -> dict[str, Any]:
    set_torch_threads()
    tracker = Tracker(cfg)
    with tracker.step(f"embed-{split}", params={"embed": cfg.embed.model_dump(mode="json")}) as run:
        device = embed_lib.resolve_device(cfg.embed.device)
        backbone = backbone_lib.load_backbone(cfg.paths.backbone, device=device)
        # Absolute: a cluster's workers read the images from where this process sees them.
        prepared = load_prepared(Path(cfg.paths.prepared).resolve())
        with scaleout.cluster_client(cfg.cluster) as client:
            index = embed_lib.embed_split(
                prepared,
                split,
                backbone,
                Path(cfg.paths.embeddings) / split,
                batch_size=cfg.embed.batch_size,
                num_workers=cfg.embed.num_workers,
                chunk_size=cfg.embed.chunk_size,
                on_bad_image=cfg.embed.on_bad_image,
                precision=cfg.embed.precision,
                client=client,
                backbone_dir=cfg.paths.backbone,
            )
        figures = {
            "n_samples": index["n_samples"],
            "n_skipped": len(index["skipped"]),
            "images_per_second": index["images_per_second"],
            "encode_images_per_second": index["encode_images_per_second"],
            "seconds": index["seconds"],
        }
        run.log_metrics(figures)
        run.set_tag("recall.backbone_sha256", backbone.sha256)
        run.set_tag("recall.device", str(device))
        if not index["reused"]:
            write_json(metrics_file(cfg, f"embed-{split}"), figures)
        log.info("embedded %s: %d images, %.1f img/s end to end", split, index["n_samples"], index["images_per_second"])
    return index


def run_embed_text(cfg: Config) -> dict[str, Any]:
    with Tracker(cfg).step("embed-text") as run:
        backbone = backbone_lib.load_backbone(cfg.paths.backbone)
        prepared = load_prepared(cfg.paths.prepared)
        summary = embed_lib.write_text_features(prepared, backbone, Path(cfg.paths.embeddings) / embed_lib.TEXT_FILE)
        run.log_metrics(summary)
    return summary
