"""The pipeline's steps as plain functions of a validated config.

DVC stages (through the ``recall`` CLI) and Prefect flows call these and nothing else.
Each step reads and writes files under ``cfg.paths``, is tracked as one MLflow run, and
writes its outputs atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline import backbone as backbone_lib
from pipeline import embed as embed_lib
from pipeline.config import Config
from pipeline.data import load_prepared, prepare_dataset
from pipeline.io import write_json
from pipeline.split import load_split, make_split, write_split
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


def _metrics_file(cfg: Config, name: str) -> Path:
    return Path(cfg.paths.metrics) / f"{name}.json"


def _set_threads() -> None:
    # DataLoader workers and the main process share few cores; let torch use them all.
    import os

    torch.set_num_threads(max(1, os.cpu_count() or 1))


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


def run_split(cfg: Config) -> dict[str, Any]:
    with Tracker(cfg).step("split", params={"seed": cfg.seed, "split": cfg.split.model_dump(mode="json")}) as run:
        prepared = load_prepared(cfg.paths.prepared)
        split = make_split(prepared.classes, cfg.split.n_tasks, cfg.seed, cfg.split.class_order)
        write_split(cfg.paths.split, split)
        run.log_metrics({"n_tasks": split["n_tasks"], "n_classes": len(split["class_order"])})
        run.set_tag("recall.class_order", ",".join(map(str, split["class_order"])))
    return split


def run_backbone(cfg: Config) -> dict[str, Any]:
    _set_threads()
    tracker = Tracker(cfg)
    with tracker.step("backbone", params={"backbone": cfg.backbone.model_dump(mode="json")}) as run:
        pretrain = None
        if cfg.backbone.source == "pretrain":
            from pipeline.demo_clip import pretrain_tiny_clip

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
        write_json(_metrics_file(cfg, "backbone"), {"sha256": info["sha256"], **info["metrics"]})
    return info


def run_embed(cfg: Config, split: str) -> dict[str, Any]:
    _set_threads()
    tracker = Tracker(cfg)
    with tracker.step(f"embed-{split}", params={"embed": cfg.embed.model_dump(mode="json")}) as run:
        device = embed_lib.resolve_device(cfg.embed.device)
        backbone = backbone_lib.load_backbone(cfg.paths.backbone, device=device)
        prepared = load_prepared(cfg.paths.prepared)
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
            write_json(_metrics_file(cfg, f"embed-{split}"), figures)
        log.info("embedded %s: %d images, %.1f img/s end to end", split, index["n_samples"], index["images_per_second"])
    return index


def run_embed_text(cfg: Config) -> dict[str, Any]:
    with Tracker(cfg).step("embed-text") as run:
        backbone = backbone_lib.load_backbone(cfg.paths.backbone)
        prepared = load_prepared(cfg.paths.prepared)
        summary = embed_lib.write_text_features(prepared, backbone, Path(cfg.paths.embeddings) / embed_lib.TEXT_FILE)
        run.log_metrics(summary)
    return summary


def summary(cfg: Config) -> str:
    """A short plain-text report of what the pipeline has produced so far."""
    lines = []
    backbone_metrics = _metrics_file(cfg, "backbone")
    if backbone_metrics.exists():
        import json

        m = json.loads(backbone_metrics.read_text())
        if "zeroshot_acc_pretrain_pairs" in m:
            lines.append(
                "demo backbone zero-shot accuracy: "
                f"pretraining pairs {m['zeroshot_acc_pretrain_pairs']:.1%}, "
                f"held-out pairs {m['zeroshot_acc_heldout_pairs']:.1%}, "
                f"chance {m['chance']:.1%}"
            )
        lines.append(f"backbone weights sha256 {m['sha256'][:16]}")
    if Path(cfg.paths.split).exists():
        split = load_split(cfg.paths.split)
        lines.append(f"tasks (seed {split['seed']}):")
        for t, names in enumerate(split["task_class_names"]):
            lines.append(f"  task {t + 1}: {', '.join(names)}")
    for split_name in ("train", "test"):
        folder = Path(cfg.paths.embeddings) / split_name
        try:
            index = embed_lib.read_index(folder)
        except embed_lib.EmbeddingMismatch:
            continue
        lines.append(
            f"embeddings {split_name}: {index['n_samples']} x {index['dim']} "
            f"({len(index['parts'])} file(s), {len(index['skipped'])} skipped, "
            f"{index['images_per_second']:.0f} img/s end to end)"
        )
    return "\n".join(lines) or "nothing produced yet: run `dvc repro`"
