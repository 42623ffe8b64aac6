"""One batch scanned: its classes, its images and their train/test split.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.prepare import IMAGE_EXTENSIONS, DataError
from pipeline.stream.s3 import SourceError
from pipeline.stream.sources import SPLIT_FOLDERS


@dataclass
class BatchScan:
    """What a batch holds, and what is wrong with it regardless of earlier tasks."""

    batch: str
    uri: str
    classes: list[str] = field(default_factory=list)
    folders: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    digest: str | None = None
    problems: list[str] = field(default_factory=list)


def class_name(folder: str) -> str:
    return " ".join(folder.replace("_", " ").split())


def is_image_key(key: str) -> bool:
    return not key.endswith("/") and os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def scan_batch(source, batch: str, test_fraction: float) -> BatchScan:
    """List one batch, read its classes and assign each image to train or test.

    Without a train/test level, the test images of a class are the ``n_test`` with the
    smallest MD5 of their bytes (ties by key), with n_test = floor(fraction * n + 0.5)
    clamped to 1..n-1: content decides, so the split is the same on every machine, on
    re-ingest and under renamed keys, and every class of 2 or more images gets both.
    """
    scan = BatchScan(batch=batch, uri=source.batch_uri(batch))
    try:
        listing = source.list_batch(batch)
    except SourceError:
        raise
    except (OSError, DataError) as exc:
        scan.problems.append(f"listing unreadable: {exc}")
        return scan

    top = {obj.key.split("/")[1] for obj in listing if obj.key.count("/") >= 2 or obj.key.endswith("/")} - {""}
    explicit = bool(top & set(SPLIT_FOLDERS))
    if explicit and top - set(SPLIT_FOLDERS):
        scan.problems.append(
            f"mixes train/test folders with class folders {sorted(top - set(SPLIT_FOLDERS))}; use one layout"
        )
        return scan
    depth = 4 if explicit else 3  # batch / [split /] class / image

    # (split or None, folder) -> [(key, md5, size)]
    images: dict[tuple[str | None, str], list[tuple[str, str, int]]] = {}
    misplaced = []
    digest_lines = []
    placed = []
    for obj in listing:
        parts = obj.key.rstrip("/").split("/")
        # A class folder exists once anything is in it, so one without images is "empty".
        if len(parts) >= depth - 1 and (len(parts) > depth - 1 or obj.key.endswith("/")):
            images.setdefault((parts[1] if explicit else None, parts[depth - 2]), [])
        if not is_image_key(obj.key):
            continue
        if len(parts) != depth:
            misplaced.append(obj.key)
            continue
        placed.append((obj, parts))
    try:
        md5s = source.md5s([obj for obj, _ in placed])
    except SourceError:
        raise
    except (OSError, DataError) as exc:
        scan.problems.append(f"listing unreadable: {exc}")
        return scan
    for (obj, parts), md5 in zip(placed, md5s):
        images.setdefault((parts[1] if explicit else None, parts[-2]), []).append((obj.key, md5, obj.size))
        digest_lines.append(f"{obj.key[len(batch) + 1:]}\t{obj.size}\t{md5}\n")
    scan.digest = "sha256:" + hashlib.sha256("".join(sorted(digest_lines)).encode()).hexdigest()
    if misplaced:
        shown = ", ".join(misplaced[:3]) + (f" and {len(misplaced) - 3} more" if len(misplaced) > 3 else "")
        layout = "<batch>/train|test/<class>/<image>" if explicit else "<batch>/<class>/<image>"
        scan.problems.append(f"images outside the layout {layout}: {shown}")

    folders = sorted({folder for _, folder in images})
    by_name: dict[str, list[str]] = {}
    for folder in folders:
        by_name.setdefault(class_name(folder).casefold(), []).append(folder)
    for same in by_name.values():
        if len(same) > 1:
            scan.problems.append(f"class {class_name(same[0])!r} appears more than once (folders {same})")
    if not folders:
        scan.problems.append("no class folders")

    for folder in folders:
        name = class_name(folder)
        if not name:
            scan.problems.append(f"class folder {folder!r} has no name")
            continue
        scan.classes.append(name)
        scan.folders[name] = [folder]
        if explicit:
            split_images = {split: images.get((split, folder), []) for split in SPLIT_FOLDERS}
        else:
            split_images = _hash_split(images[(None, folder)], test_fraction)
        for split, items in split_images.items():
            for key, md5, size in items:
                scan.files.append({"key": key, "class": name, "split": split, "md5": md5, "size": size})
        scan.counts[name] = {split: len(items) for split, items in split_images.items()}
        n_train, n_test = scan.counts[name]["train"], scan.counts[name]["test"]
        if n_train + n_test == 0:
            scan.problems.append(f"class {name!r} (folder {folder!r}) is empty")
        elif n_train < 2:
            scan.problems.append(f"class {name!r} has {n_train} training image(s); at least 2 are needed")
        elif n_test == 0:
            scan.problems.append(f"class {name!r} has no test images")
    scan.files.sort(key=lambda f: f["key"])
    return scan


def _hash_split(items: list[tuple[str, str, int]], fraction: float) -> dict[str, list[tuple[str, str, int]]]:
    """About ``fraction`` of a class's images to test, chosen by content hash (stable across
    re-ingests and machines). Byte-identical files (one hash) go to the same side, so no
    test image is also a training image; at least one image stays in train."""
    n = len(items)
    if n < 2:
        return {"train": list(items), "test": []}
    n_test = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
    by_hash: dict[str, list[str]] = {}
    for key, md5, _ in items:
        by_hash.setdefault(md5, []).append(key)
    test: set[str] = set()
    for md5 in sorted(by_hash):
        if len(test) >= n_test:
            break
        if len(test) + len(by_hash[md5]) <= n - 1:
            test.update(by_hash[md5])
    return {
        "train": [item for item in items if item[0] not in test],
        "test": [item for item in items if item[0] in test],
    }
