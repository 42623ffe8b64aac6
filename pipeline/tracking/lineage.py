"""What identifies a pipeline's results: its lineage (dataset, backbone and split), the
experiment and model names derived from it, and content digests of a version's inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.io import read_json

LINEAGE_TAG = "recall.lineage"


INPUT_DIGEST_TAG = "recall.input_digest"


# Settings that say where a dataset lives or how to fetch it, not what it holds; its
# content enters through the prepared manifest's fingerprint instead.
DATASET_LOCATION_KEYS = ("root", "manifest", "names_file", "download", "source", "endpoint_url", "ledger_uri")


# Metadata written into output files that varies between identical reruns (timings).
VOLATILE_METADATA = frozenset({"seconds"})


SHORT_HASH = 8


# The longest registered-model tag value MLflow's SQL stores keep: `registered_model_tags.value`
# is String(5000) (mlflow/store/model_registry/dbmodels/models.py, SqlRegisteredModelTag),
# though the validator lets 100,000 through to the database. A benchmark's class order at 1,000 classes
# is about 13,000 characters: the lineage tags then name the list instead of holding it (each
# model version's `classes` tag, 100,000 characters allowed, lists the classes it knows).
REGISTERED_MODEL_TAG_LIMIT = 5000


def _class_order_named(names: list[str]) -> str:
    """A class order too long for a tag, named by its count and digest."""
    digest = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    return (f"{len(names)} classes, sha256 {digest} of their JSON list (too long for a tag: each version's "
            f"`classes` tag lists the classes it knows, in this order)")


class RegistryError(UserError):
    """The registry cannot be used as asked; names the file or setting at fault."""


@dataclass(frozen=True)
class Lineage:
    key: str
    label: str
    description: dict[str, Any] = field(hash=False, compare=False)

    def model_name(self, experiment: str, kind: str) -> str:
        return f"{experiment}-{self.label}-{kind}"

    def tags(self) -> dict[str, str]:
        """What the registered model records about the lineage it holds."""
        d = self.description
        class_order = ", ".join(d["class_order"])
        if len(class_order) > REGISTERED_MODEL_TAG_LIMIT:
            class_order = _class_order_named(d["class_order"])
        description = json.dumps(d, sort_keys=True)
        if len(description) > REGISTERED_MODEL_TAG_LIMIT:
            description = json.dumps({**d, "class_order": _class_order_named(d["class_order"])}, sort_keys=True)
        return {
            LINEAGE_TAG: self.key,
            f"{LINEAGE_TAG}.label": self.label,
            f"{LINEAGE_TAG}.method": d["method"]["name"],
            f"{LINEAGE_TAG}.seed": str(d["seed"]),
            f"{LINEAGE_TAG}.dataset": d["dataset"]["name"],
            f"{LINEAGE_TAG}.dataset_fingerprint": d["dataset_fingerprint"],
            f"{LINEAGE_TAG}.n_tasks": str(d["n_tasks"]),
            f"{LINEAGE_TAG}.class_order": class_order,
            f"{LINEAGE_TAG}.backbone_sha256": d["backbone"]["sha256"],
            f"{LINEAGE_TAG}.generator": d["generator"]["name"],
            f"{LINEAGE_TAG}.description": description,
        }


def _read_json(path: Path, what: str) -> Any:
    if not path.exists():
        raise RegistryError(
            f"{path}: missing, and the registered model's name depends on the {what} "
            "(run the pipeline up to that step, or pass the model name explicitly)"
        )
    return read_json(path)


def lineage_of(cfg: Config) -> Lineage:
    """The lineage of ``cfg``'s pipeline run, from its config and the prepared dataset,
    task split and backbone it produced."""
    from pipeline.clip.backbone import INFO_FILE
    from pipeline.data.manifest import CLASSES_FILE

    prepared = _read_json(Path(cfg.paths.prepared) / CLASSES_FILE, "prepared dataset")
    backbone = _read_json(Path(cfg.paths.backbone) / INFO_FILE, "backbone weights")
    dataset = {k: v for k, v in cfg.dataset.model_dump(mode="json").items() if k not in DATASET_LOCATION_KEYS}
    if cfg.stream:
        # A stream grows: its lineage is where it starts (the first batch, by content), not
        # how many tasks it has so far, so every task of it meets the same champion.
        first = _read_json(Path(cfg.split.tasks["01"].classes), "first task's manifest") if "01" in cfg.split.tasks else None
        if first is None:
            raise RegistryError("the stream has no task yet, so no lineage (run `recall ingest`)")
        origin = {"dataset_fingerprint": first["digest"], "class_order": [f"stream from batch {first['batch']}"], "n_tasks": "growing"}
    else:
        split = _read_json(Path(cfg.paths.split), "task split")
        origin = {
            "dataset_fingerprint": prepared["fingerprint"],
            "class_order": [prepared["classes"][c] for c in split["class_order"]],
            "n_tasks": split["n_tasks"],
        }
    description = {
        "dataset": dataset,
        **origin,
        "backbone": {"arch": cfg.backbone.arch, "sha256": backbone["sha256"]},
        "embed": {"precision": cfg.embed.precision, "on_bad_image": cfg.embed.on_bad_image},
        "method": cfg.method.model_dump(mode="json"),
        "generator": cfg.generator.model_dump(mode="json"),
        "seed": cfg.seed,
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    label = cfg.tracking.lineage or f"{cfg.method.name}-s{cfg.seed}-{key[:SHORT_HASH]}"
    return Lineage(key, label, description)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensors_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> str:
    """sha256 over named tensors (dtype, shape and bytes) and optional metadata."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    if metadata:
        digest.update(json.dumps(dict(metadata), sort_keys=True).encode())
    return digest.hexdigest()


def safetensors_digest(path: str | Path) -> str:
    """The content of a safetensors file, without the timings a rerun changes (its md5
    would differ between two runs that produced the same tensors)."""
    from pipeline.io import read_tensor_metadata, read_tensors

    path = Path(path)
    if not path.exists():
        raise RegistryError(f"{path}: missing; cannot digest the inputs of the model to register")
    metadata = {k: v for k, v in read_tensor_metadata(path).items() if k not in VOLATILE_METADATA}
    return tensors_digest(read_tensors(path), metadata)


def input_digest(lineage: Lineage, kind: str, task: int, inputs: Mapping[str, Any]) -> str:
    """What a version is identified by: its lineage, kind, task and the digests (or other
    plain values) of every input that determined it."""
    blob = json.dumps({"lineage": lineage.key, "kind": kind, "task": task, "inputs": dict(inputs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def task_test_digests(test: Mapping[str, torch.Tensor], tasks: list[list[int]], class_names: list[str]) -> dict[str, str]:
    """Per task: a digest of its classes (by name) and of their test images' embeddings.
    Two versions' accuracies on a task compare only when these are equal."""
    digests = {}
    for number, classes in enumerate(tasks, start=1):
        keep = torch.isin(test["labels"], torch.tensor(classes, dtype=test["labels"].dtype))
        order = torch.argsort(test["sample_ids"][keep])
        digests[str(number)] = tensors_digest(
            {"embeddings": test["embeddings"][keep][order], "sample_ids": test["sample_ids"][keep][order]},
            {"classes": sorted(class_names[c] for c in classes)},
        )[:16]
    return digests


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"recall-{cfg.dataset.name}-{cfg.backbone.name}"
