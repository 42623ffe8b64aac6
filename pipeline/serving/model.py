"""The servable classifier of a task: an MLflow pyfunc model (the promotion gate is pipeline.tracking.gate).

A version holds what classifying needs after that task, and nothing of the training data:
the learned class features ``f_c`` of the seen classes, the probabilistic head (if the
method has one) with its fixed inference noise, the class names, and a *reference* to the
frozen backbone (its folder and sha256), which is loaded only when images are given.
``predict`` takes images (paths, raw bytes or base64 strings) or precomputed embeddings and
returns per input the label, the class probabilities and the uncertainty scores.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.io import read_tensor_metadata, read_tensors, write_tensors
from pipeline.method.classifier import Classifier, head_state, load_head

CLASSIFIER_FILE = "classifier.safetensors"
OUTPUT_COLUMNS = ["label", "class_id", "max_probability", "entropy", "energy", "sample_variance", "probabilities"]


class ServingError(UserError):
    pass


def save_classifier(path: str | Path, classifier: Classifier, class_names: list[str], backbone_ref: dict[str, Any], extra: dict[str, Any]) -> None:
    tensors = {"class_features": classifier.class_features.detach().float()}
    if classifier.head is not None:
        tensors.update(head_state(classifier.head))
        tensors["class_task"] = classifier.class_task
        tensors["noise"] = classifier.noise
    metadata = {
        "class_ids": json.dumps(classifier.class_ids),
        "class_names": json.dumps([class_names[c] for c in classifier.class_ids]),
        "logit_scale": repr(classifier.logit_scale),
        "head_tasks": str(classifier.head.n_tasks if classifier.head is not None else 0),
        "std_floor": repr(classifier.head.std_floor if classifier.head is not None else 0.0),
        "backbone": json.dumps(backbone_ref),
        **{k: json.dumps(v) for k, v in extra.items()},
    }
    write_tensors(path, tensors, metadata=metadata)


def load_classifier_file(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise ServingError(f"{path}: no saved classifier")
    meta = read_tensor_metadata(path)
    tensors = read_tensors(path)
    classifier = Classifier(json.loads(meta["class_ids"]), tensors["class_features"], float(meta["logit_scale"]))
    n_tasks = int(meta["head_tasks"])
    if n_tasks:
        dim = tensors["class_features"].shape[1]
        classifier.head = load_head(tensors, dim, n_tasks, float(meta["std_floor"]))
        classifier.class_task = tensors["class_task"]
        classifier.noise = tensors["noise"]
    info = {k: json.loads(v) for k, v in meta.items() if k not in ("logit_scale", "head_tasks", "std_floor")}
    return classifier, info


def predictions_table(classifier: Classifier, class_names: list[str], embeddings: torch.Tensor) -> list[dict[str, Any]]:
    out = classifier.predict(embeddings)
    position = {c: i for i, c in enumerate(classifier.class_ids)}
    rows = []
    for i in range(len(embeddings)):
        class_id = int(out["label"][i])
        variance = out["variance"]
        rows.append({
            "label": class_names[position[class_id]],
            "class_id": class_id,
            "max_probability": float(out["probs"][i].max()),
            "entropy": float(out["entropy"][i]),
            "energy": float(out["energy"][i]),
            # A deterministic classifier has no samples to vary over.
            "sample_variance": float(variance[i]) if variance is not None else math.nan,
            "probabilities": [float(p) for p in out["probs"][i]],
        })
    return rows


def decode_image(value: Any, row: int):
    """A PIL image from a path, raw bytes or a base64 string."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            if Path(value).exists():
                return Image.open(value).convert("RGB")
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ServingError(f"row {row}: {value[:80]!r} is neither an existing image file nor base64 image bytes") from None
            return Image.open(io.BytesIO(raw)).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ServingError(f"row {row}: cannot read the image ({exc})") from None
    raise ServingError(f"row {row}: an image must be a path, bytes or a base64 string, not {type(value).__name__}")


class RecallClassifierModel:
    """Body of the pyfunc model; kept free of MLflow so the CLI and tests can use it directly."""

    def __init__(self, classifier_path: str | Path):
        self.classifier, self.info = load_classifier_file(classifier_path)
        self.class_names: list[str] = self.info["class_names"]
        self._backbone = None

    def backbone(self):
        if self._backbone is None:
            from pipeline.clip.backbone import BackboneError, load_backbone

            ref = self.info["backbone"]
            try:
                backbone = load_backbone(ref["folder"])
            except BackboneError as exc:
                raise ServingError(
                    f"images need the frozen backbone {ref['name']} (sha256 {ref['sha256'][:12]}) at {ref['folder']}: {exc}"
                ) from None
            if backbone.sha256 != ref["sha256"]:
                raise ServingError(
                    f"{ref['folder']}: backbone sha256 {backbone.sha256[:12]} is not the one this model was trained "
                    f"with ({ref['sha256'][:12]})"
                )
            self._backbone = backbone
        return self._backbone

    @torch.no_grad()
    def embed_images(self, images: list[Any]) -> torch.Tensor:
        backbone = self.backbone()
        batch = torch.stack([backbone.preprocess(decode_image(value, i)) for i, value in enumerate(images)])
        return backbone.model.encode_image(batch).float()

    def predict_rows(self, images: list[Any] | None = None, embeddings: list[Any] | None = None) -> list[dict[str, Any]]:
        if images is not None:
            x = self.embed_images(images)
        elif embeddings is not None:
            try:
                x = torch.tensor([list(map(float, e)) for e in embeddings], dtype=torch.float32)
            except (TypeError, ValueError) as exc:
                raise ServingError(f"embeddings must be lists of numbers: {exc}") from None
            dim = self.classifier.class_features.shape[1]
            if x.ndim != 2 or x.shape[1] != dim:
                raise ServingError(f"embeddings must have {dim} values each, got shape {tuple(x.shape)}")
        else:
            raise ServingError("give an 'image' or an 'embedding' column")
        if not torch.isfinite(x).all():
            bad = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten().tolist()
            raise ServingError(f"rows {bad}: NaN or inf in the embedding")
        return predictions_table(self.classifier, self.class_names, x)

    def predict_frame(self, frame):
        import pandas as pd

        columns = set(frame.columns)
        images = embeddings = None
        if "image" in columns and frame["image"].notna().all():
            images = list(frame["image"])
        elif "embedding" in columns and frame["embedding"].notna().all():
            embeddings = list(frame["embedding"])
        else:
            raise ServingError(f"input needs an 'image' or an 'embedding' column filled in every row; got columns {sorted(columns)}")
        return pd.DataFrame(self.predict_rows(images=images, embeddings=embeddings), columns=OUTPUT_COLUMNS)
