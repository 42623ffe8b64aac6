"""A task's images, streamed from the source its manifest names, and their embeddings.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from pipeline.data.prepare import DataError
from pipeline.stream.sources import SPLIT_FOLDERS


class StreamImages(Dataset):
    """One split of a task's images, streamed from the source and decoded like ImageDataset.

    Items are ``(tensor | None, index, error | None)`` for ``embed.collate_images``; a bad
    image is reported, not raised, so ``embed.on_bad_image`` applies. An object whose bytes
    no longer match the MD5 recorded at ingest is a DataError: its task would silently
    change.
    """

    def __init__(self, source, manifest: dict[str, Any], split: str, preprocess):
        if split not in SPLIT_FOLDERS:
            raise DataError(f"task {manifest.get('task')}: unknown split {split!r}; use train or test")
        self.source = source
        self.preprocess = preprocess
        self.classes = list(manifest["classes"])
        self.files = [f for f in manifest["files"] if f["split"] == split]
        label = {name: i for i, name in enumerate(self.classes)}
        self.labels = [label[f["class"]] for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def sample_id(self, index: int) -> str:
        return self.files[index]["key"]

    def __getitem__(self, index: int):
        return self._item(index, self.source.read(self.files[index]["key"]))

    def __getitems__(self, indices: list[int]) -> list:
        """A DataLoader batch: its objects fetched concurrently (``source.read_many``), each
        checked and decoded here, in the batch's order, while later ones are still coming."""
        data = self.source.read_many([self.files[index]["key"] for index in indices])
        return [self._item(index, item) for index, item in zip(indices, data)]

    def _item(self, index: int, data: bytes):
        from pipeline.clip.embedding import decode_image

        item = self.files[index]
        if hashlib.md5(data).hexdigest() != item["md5"]:
            raise DataError(
                f"{self.source.key_uri(item['key'])}: changed since ingest (MD5 differs from the task "
                "manifest); upload the changed images as a new batch instead"
            )
        tensor, error = decode_image(io.BytesIO(data), self.preprocess, self.source.key_uri(item["key"]))
        return tensor, index, error


def embed_task(
    source, manifest: dict[str, Any], split: str, backbone, out: str | Path, class_ids: list[int] | None = None, **options
) -> dict[str, Any]:
    """Embed one split of a task's images, streamed from the source (nothing is copied into
    the project), into ``out`` as the benchmark's embeddings are stored. Labels are the
    classes' global ids (``class_ids``, in ``manifest["classes"]`` order; default: their
    positions); the index is keyed by the manifest's digest, so the same task is never
    embedded twice with the same backbone. ``options``: those of ``embed.embed_images``."""
    from pipeline.clip.embedding import embed_images

    images = StreamImages(source, manifest, split, backbone.preprocess)
    if not len(images):
        raise DataError(f"task {manifest['task']} ({manifest['batch']}): no {split} images")
    ids = list(class_ids) if class_ids is not None else list(range(len(manifest["classes"])))
    if len(ids) != len(manifest["classes"]):
        raise DataError(f"task {manifest['task']}: {len(ids)} class ids for {len(manifest['classes'])} classes")
    return embed_images(
        images, labels=[ids[label] for label in images.labels], sample_id=images.sample_id, backbone=backbone, out=out,
        key={"task": manifest["task"], "split": split, "task_digest": manifest["digest"], "class_ids": ids},
        n_classes=max(ids) + 1, **options,
    )
