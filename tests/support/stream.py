"""The update loop in tests: a stream project, its batches and what each task runs."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from devtools.scratch import TINY_CONFIG

STREAM_TINY = {k: v for k, v in TINY_CONFIG.items() if k != "split"}  # the stream's count is the ledger's



SETUP = {"prepare", "split", "backbone", "replay-init", "prompts-init"}


BUCKET = "recall-shared"


def task_stages(task: int) -> set[str]:
    return {f"{step}@{task:02d}" for step in ("intake", "generators", "replay", "novelty", "finetune", "evaluate")}



def classifier_versions(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    from pipeline import config
    from pipeline.tracking.registry import model_name
    from pipeline.tracking.server import tracking_uri

    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = config.load(root / "params.yaml")
        name = model_name(cfg, "classifier")
        return list(MlflowClient(tracking_uri(cfg)).search_model_versions(f"name = '{name}'"))
    finally:
        os.chdir(cwd)


def upload_batch(client, folder: Path, batch: str, bucket: str = BUCKET) -> None:
    """As a producer does: every image first, ``_READY`` last, under ``incoming/``."""
    files = sorted(p for p in (folder / batch).rglob("*") if p.is_file() and p.name != "_READY")
    for path in [*files, folder / batch / "_READY"]:
        client.put_object(Bucket=bucket, Key=f"incoming/{path.relative_to(folder)}", Body=path.read_bytes())


def write_batch_with_a_one_image_class(source: Path, batch: str = "batch-001") -> None:
    """A ready batch whose class 'lonely circle' has one training image (and a fine class)."""
    for name, n_train in (("square", 3), ("lonely_circle", 1)):
        for i in range(n_train):
            write_png(source / batch / "train" / name / f"{i}.png")
        write_png(source / batch / "test" / name / "0.png")
    (source / batch / "_READY").touch()


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
