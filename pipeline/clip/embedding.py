"""The embed step: CLIP image embeddings per split and class text features.

Image embeddings are stored raw (not normalised) in bounded chunks,
``<embeddings>/<split>/part-NNNNN.safetensors`` with ``embeddings``, ``labels`` and
``sample_ids`` (row numbers of the split's manifest), plus ``index.json`` written last.
They depend on (dataset, split, backbone weights) only: class order and method never
enter, so one cache serves every experiment. Each file carries the sha256 of the backbone
weights that made it, and readers refuse files made with other weights.

One module, over 400 lines: image decoding, batching, sharded scale-out and the chunked
file format are one path from images to an embeddings folder and are read together.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pipeline.clip.backbone import Backbone
from pipeline.data.manifest import Prepared, Sample
from pipeline.data.prepare import DataError
from pipeline.errors import UserError
from pipeline.io import atomic_dir, read_json, read_tensor_metadata, read_tensors, write_json, write_tensors

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
TEXT_FILE = "text.safetensors"


class EmbeddingMismatch(UserError):
    """An embedding file that does not belong to the current backbone or dataset."""


class BadImage(DataError):
    pass


# --------------------------------------------------------------------------- images


class ImageDataset(Dataset):
    """Decoded, preprocessed images of a manifest; a bad image is reported, not raised,
    so the main process can name it (or skip it) instead of a worker dying."""

    def __init__(self, prepared: Prepared, samples: list[Sample], preprocess):
        self.prepared = prepared
        self.samples = samples
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path = self.prepared.image_path(self.samples[index])
        tensor, error = decode_image(path, self.preprocess, str(path))
        return tensor, index, error

    def sample_id(self, index: int) -> str:
        return self.samples[index].sample_id


def decode_image(image_file, preprocess, name: str):
    """(tensor, None) for a readable image, (None, "<name>: <why>") for a bad one.

    ``image_file`` is a path or a binary file object; every image dataset decodes through
    here, so a bad image is reported the same way whichever source it came from.
    """
    try:
        with Image.open(image_file) as image:
            return preprocess(image.convert("RGB")), None
    except Exception as exc:  # PIL raises several types for unreadable files
        return None, f"{name}: {type(exc).__name__}: {exc}"


def collate_images(batch):
    good = [(x, i) for x, i, err in batch if err is None]
    bad = [(i, err) for _, i, err in batch if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, indices, bad


def screen_bad_images(batches, on_bad_image: str, where: str, sample_id, skipped: list[str]):
    """Yield (images, indices) of collated batches, applying ``on_bad_image`` to the rest.

    ``error`` raises BadImage naming the image; ``skip`` logs it and appends its
    ``sample_id(index)`` to ``skipped``.
    """
    for images, indices, bad in batches:
        for index, error in bad:
            if on_bad_image == "error":
                raise BadImage(f"unreadable image {where} (sample {sample_id(index)}): {error}")
            log.warning("skipping unreadable image: %s", error)
            skipped.append(sample_id(index))
        if images is not None:
            yield images, indices


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def effective_precision(device: torch.device, precision: str) -> str:
    """``bf16`` or ``fp32``: what ``auto`` means on this device."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str):
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- image embeddings


def embed_split(prepared: Prepared, split: str, backbone: Backbone, out: str | Path, **options) -> dict[str, Any]:
    """Embed every image of ``split``; reuse ``out`` when it already matches. ``options``:
    those of ``embed_images`` (batch size, workers, chunk size, on_bad_image, precision,
    a dask client and the backbone's folder)."""
    samples = prepared.samples(split)
    images = ImageDataset(prepared, samples, backbone.preprocess)
    return embed_images(
        images,
        labels=[s.label for s in samples],
        sample_id=images.sample_id,
        backbone=backbone,
        out=out,
        key={"split": split, "dataset_fingerprint": prepared.fingerprint},
        n_classes=len(prepared.classes),
        **options,
    )


def embed_images(
    dataset: Dataset,
    *,
    labels: list[int],
    sample_id,
    backbone: Backbone,
    out: str | Path,
    key: dict[str, Any],
    n_classes: int,
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_size: int = 8192,
    on_bad_image: str = "error",
    precision: str = "auto",
    progress: bool = True,
    client=None,
    backbone_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Embed the images of ``dataset`` (items as ``ImageDataset``'s) into bounded parts under
    ``out``, or reuse ``out`` when its index matches ``key`` (what the images are: a split
    and dataset fingerprint, a task manifest's digest), the backbone, chunking, bad-image
    policy and precision. ``labels[i]`` is item ``i``'s label; ``sample_id(i)`` names it in
    errors and in the index's list of skipped images. Parts hold item indices as
    ``sample_ids``.

    With a dask ``client`` (``pipeline.scaleout``), contiguous shards of whole batches are
    encoded on the cluster's workers, each loading the backbone from ``backbone_dir`` (the
    folder ``backbone`` was loaded from); every batch is the one the single-process path
    encodes, so the parts written here are the same. ``dataset`` and ``sample_id`` must
    then pickle, and the files they read be at the same absolute paths on the workers."""
    out = Path(out)
    model = backbone.model
    device = next(model.parameters()).device
    # bf16 and fp32 embeddings differ: a cache made at one precision never serves the other.
    wanted = {
        **key,
        "backbone_sha256": backbone.sha256,
        "chunk_size": chunk_size,
        "on_bad_image": on_bad_image,
        "precision": effective_precision(device, precision),
    }
    if (out / INDEX_FILE).exists():
        existing = read_json(out / INDEX_FILE)
        if all(existing.get(k) == v for k, v in wanted.items()):
            log.info("%s: embeddings already match the backbone and data; reusing", out)
            return {**existing, "reused": True}

    metadata = {k: str(v) for k, v in key.items()}
    metadata["backbone_sha256"] = backbone.sha256
    where = f"task {key['task']} {key['split']}" if "task" in key else str(key["split"])
    skipped: list[str] = []
    parts: list[dict[str, Any]] = []
    buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
    buffered = 0
    encode_seconds = 0.0
    start = time.perf_counter()
    options = {"batch_size": batch_size, "on_bad_image": on_bad_image, "precision": precision, "where": where}
    if client is None:
        batches = encode_batches(dataset, model, 0, len(dataset), num_workers=num_workers, sample_id=sample_id,
                                 skipped=skipped, progress=progress, **options)
    else:
        if backbone_dir is None:
            raise ValueError("embed_images on a dask cluster needs backbone_dir (workers load the backbone themselves)")
        from pipeline import scaleout

        shards = shard_ranges(len(dataset), batch_size, chunk_size, scaleout.n_workers(client))
        results = scaleout.map_shards(
            client, embed_shard, shards, dataset=dataset, sample_id=sample_id, backbone_dir=str(Path(backbone_dir).resolve()),
            device=str(device), backbone_sha256=backbone.sha256, **options,
        )
        results = tqdm(results, total=len(shards), desc=f"embed {where} (dask)", unit="shard", disable=not progress)
        batches = _shard_batches(results, skipped)

    with atomic_dir(out) as tmp:

        def flush(final: bool = False) -> None:
            """Write full parts of exactly ``chunk_size`` rows (and, at the end, the rest)."""
            nonlocal buffer, buffered
            if not buffered:
                return
            embeddings = torch.cat([e for e, _ in buffer])
            ids = torch.cat([i for _, i in buffer])
            cut = len(ids) if final else (len(ids) // chunk_size) * chunk_size
            for start in range(0, cut, chunk_size):
                part_ids = ids[start : start + chunk_size]
                part_labels = torch.tensor([labels[i] for i in part_ids.tolist()], dtype=torch.long)
                name = f"part-{len(parts):05d}.safetensors"
                write_tensors(
                    tmp / name,
                    {"embeddings": embeddings[start : start + chunk_size], "labels": part_labels, "sample_ids": part_ids},
                    metadata={**metadata, "part": str(len(parts))},
                )
                parts.append({"file": name, "n": int(part_ids.numel())})
            buffer = [(embeddings[cut:], ids[cut:])] if cut < len(ids) else []
            buffered = len(ids) - cut

        for features, indices, seconds in batches:
            encode_seconds += seconds
            buffer.append((features, indices))
            buffered += len(indices)
            if buffered >= chunk_size:
                flush()
        flush(final=True)

        elapsed = time.perf_counter() - start
        n = sum(p["n"] for p in parts)
        if n == 0:
            raise DataError(f"{where}: no readable images ({len(skipped)} skipped)")
        index = {
            **wanted,
            "dim": backbone.embed_dim,
            "n_samples": n,
            "n_classes": n_classes,
            "parts": parts,
            "skipped": skipped,
            "seconds": round(elapsed, 3),
            "images_per_second": round(n / elapsed, 2),
            "encode_images_per_second": round(n / max(encode_seconds, 1e-9), 2),
        }
        write_json(tmp / INDEX_FILE, index)
    return {**index, "reused": False}


def encode_batches(
    dataset: Dataset,
    model: torch.nn.Module,
    start: int,
    stop: int,
    *,
    batch_size: int,
    num_workers: int,
    on_bad_image: str,
    precision: str,
    where: str,
    sample_id,
    skipped: list[str],
    progress: bool = False,
):
    """Yield ``(features, indices, encode_seconds)`` for the items ``start:stop`` of
    ``dataset``, in batches of ``batch_size`` from ``start`` (CPU float32 features, item
    indices of ``dataset``); unreadable images go by ``on_bad_image`` into ``skipped``.
    The one encoding loop: the whole dataset in one process, or a shard on a dask worker."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    items = dataset if (start, stop) == (0, len(dataset)) else Subset(dataset, range(start, stop))
    loader = DataLoader(
        items,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    with torch.inference_mode():
        batches = tqdm(loader, desc=f"embed {where}", unit="batch", disable=not progress)
        for images, indices in screen_bad_images(batches, on_bad_image, f"in {where}", sample_id, skipped):
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            with autocast_for(device, precision):
                features = model.encode_image(images)
            features = features.float().cpu()
            yield features, indices, time.perf_counter() - t0


def shard_ranges(n: int, batch_size: int, chunk_size: int, n_workers: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` shards of ``n`` items, each a whole number of batches
    (so every batch is the single-process path's), at most about ``chunk_size`` rows (a
    worker holds one shard's embeddings), and a few per worker to balance the load."""
    n_batches = -(-n // batch_size)
    per_shard = max(1, min(chunk_size // batch_size, -(-n_batches // (4 * max(1, n_workers)))))
    step = per_shard * batch_size
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


_WORKER_BACKBONE: dict[tuple[str, str, str], Backbone] = {}


def worker_backbone(folder: str, device: str, sha256: str) -> Backbone:
    """The backbone in ``folder``, loaded once per worker process (and again only when the
    folder's weights change)."""
    from pipeline.clip.backbone import load_backbone, read_info

    key = (folder, device, sha256)
    if key not in _WORKER_BACKBONE:
        if read_info(folder)["sha256"] != sha256:
            raise EmbeddingMismatch(f"{folder}: on this worker the backbone is not {sha256[:12]}; the stage's backbone")
        _WORKER_BACKBONE.clear()
        _WORKER_BACKBONE[key] = load_backbone(folder, device=device)
    return _WORKER_BACKBONE[key]


def embed_shard(
    start: int, stop: int, *, dataset: Dataset, sample_id, backbone_dir: str, device: str, backbone_sha256: str, **options
) -> dict[str, Any]:
    """One shard on a dask worker: ``encode_batches`` over items ``start:stop`` with the
    backbone loaded from its folder. Workers are daemon processes without DataLoader
    workers of their own: the cluster is the parallelism."""
    model = worker_backbone(backbone_dir, device, backbone_sha256).model
    skipped: list[str] = []
    batches = list(encode_batches(dataset, model, start, stop, num_workers=0, sample_id=sample_id, skipped=skipped, **options))
    return {"batches": batches, "skipped": skipped}


def _shard_batches(results, skipped: list[str]):
    """The batches of shard results, in order, as ``encode_batches`` yields them."""
    for result in results:
        skipped.extend(result["skipped"])
        yield from result["batches"]


def read_index(folder: str | Path, expected_backbone_sha256: str | None = None) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.exists():
        raise EmbeddingMismatch(f"{path}: missing; the embeddings in {folder} are incomplete or absent (run the embed step)")
    index = read_json(path)
    if expected_backbone_sha256 is not None and index["backbone_sha256"] != expected_backbone_sha256:
        raise EmbeddingMismatch(
            f"{folder}: embeddings were made with backbone weights {index['backbone_sha256'][:12]}, "
            f"but the current backbone is {expected_backbone_sha256[:12]}; re-run the embed step"
        )
    return index


def load_embeddings(
    folder: str | Path,
    expected_backbone_sha256: str,
    classes: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Embeddings of one split, optionally only the given classes (a task's view).

    Parts are read one at a time and filtered, so memory holds only what is returned.
    """
    folder = Path(folder)
    index = read_index(folder, expected_backbone_sha256)
    wanted = torch.tensor(sorted(classes), dtype=torch.long) if classes is not None else None
    chunks: dict[str, list[torch.Tensor]] = {"embeddings": [], "labels": [], "sample_ids": []}
    for part in index["parts"]:
        path = folder / part["file"]
        meta = read_tensor_metadata(path)
        if meta.get("backbone_sha256") != expected_backbone_sha256:
            raise EmbeddingMismatch(
                f"{path}: made with backbone weights {meta.get('backbone_sha256', '?')[:12]}, "
                f"expected {expected_backbone_sha256[:12]}; re-run the embed step"
            )
        tensors = read_tensors(path)
        keep = torch.isin(tensors["labels"], wanted) if wanted is not None else slice(None)
        for key in chunks:
            chunks[key].append(tensors[key][keep])
    return {key: torch.cat(values) if values else torch.empty(0) for key, values in chunks.items()}


# --------------------------------------------------------------------------- text features


@torch.inference_mode()
def class_text_features(
    backbone: Backbone, classes: list[str], templates: list[str], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_c = norm(mean_j norm(E_T(template_j(c))))`` and the per-template features."""
    model = backbone.model
    device = next(model.parameters()).device
    texts = [template.format(name) for name in classes for template in templates]
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = backbone.tokenizer(texts[start : start + batch_size]).to(device)
        features.append(model.encode_text(tokens).float())
    per_template = torch.nn.functional.normalize(torch.cat(features), dim=-1)
    per_template = per_template.view(len(classes), len(templates), -1)
    class_features = torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)
    return class_features.cpu(), per_template.cpu()


def write_text_features(prepared: Prepared, backbone: Backbone, out: str | Path) -> dict[str, Any]:
    class_features, per_template = class_text_features(backbone, prepared.classes, prepared.templates)
    write_tensors(
        out,
        {"class_features": class_features, "template_features": per_template},
        metadata={
            "backbone_sha256": backbone.sha256,
            "dataset_fingerprint": prepared.fingerprint,
            "n_classes": str(len(prepared.classes)),
            "n_templates": str(len(prepared.templates)),
        },
    )
    return {"n_classes": len(prepared.classes), "n_templates": len(prepared.templates)}


def load_text_features(path: str | Path, expected_backbone_sha256: str) -> dict[str, torch.Tensor]:
    meta = read_tensor_metadata(path)
    if meta.get("backbone_sha256") != expected_backbone_sha256:
        raise EmbeddingMismatch(
            f"{path}: text features were made with backbone weights {meta.get('backbone_sha256', '?')[:12]}, "
            f"expected {expected_backbone_sha256[:12]}; re-run the embed step"
        )
    return read_tensors(path)


def zero_shot_accuracy(image_embeddings: torch.Tensor, labels: torch.Tensor, class_features: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    logits = torch.nn.functional.normalize(image_embeddings.float(), dim=-1) @ class_features.float().T
    return (logits.argmax(dim=-1) == labels).float().mean().item()
