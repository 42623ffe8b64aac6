"""The prepared-dataset layout every later step reads.

``<prepared>/classes.json`` holds the class names (index = label), the prompt templates and
a fingerprint of the whole manifest; ``<prepared>/<split>.csv`` lists ``sample_id,path,label``
rows. Paths are relative to the prepared folder when the images live inside it (the demo,
exported CIFAR-100), absolute otherwise (a user's image folder).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import read_json, write_json

CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class Sample:
    sample_id: str
    path: str
    label: int


@dataclass(frozen=True)
class Prepared:
    root: Path
    dataset: str
    classes: list[str]
    templates: list[str]
    splits: list[str]
    fingerprint: str
    extra: dict

    def samples(self, split: str) -> list[Sample]:
        if split not in self.splits:
            raise KeyError(f"{self.root}: no split {split!r}; prepared splits are {self.splits}")
        with open(self.root / f"{split}.csv", newline="") as handle:
            return [Sample(r["sample_id"], r["path"], int(r["label"])) for r in csv.DictReader(handle)]

    def image_path(self, sample: Sample) -> Path:
        path = Path(sample.path)
        return path if path.is_absolute() else self.root / path


def write_manifest(
    folder: Path,
    dataset: str,
    classes: list[str],
    templates: list[str],
    splits: dict[str, list[Sample]],
    extra: dict | None = None,
) -> str:
    """Write the split CSVs and classes.json into ``folder``; return the fingerprint."""
    digest = hashlib.sha256()
    digest.update("\n".join(classes).encode())
    for split, samples in splits.items():
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sample_id", "path", "label"])
            for s in samples:
                writer.writerow([s.sample_id, s.path, s.label])
                digest.update(f"{split}|{s.sample_id}|{s.label}\n".encode())
    fingerprint = digest.hexdigest()[:16]
    write_json(
        folder / CLASSES_FILE,
        {
            "dataset": dataset,
            "classes": classes,
            "templates": templates,
            "splits": {split: len(samples) for split, samples in splits.items()},
            "fingerprint": fingerprint,
            "extra": extra or {},
        },
    )
    return fingerprint


def load_prepared(folder: str | Path) -> Prepared:
    folder = Path(folder)
    meta_path = folder / CLASSES_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no prepared dataset here (run the prepare step first)")
    meta = read_json(meta_path)
    return Prepared(
        root=folder,
        dataset=meta["dataset"],
        classes=list(meta["classes"]),
        templates=list(meta["templates"]),
        splits=list(meta["splits"]),
        fingerprint=meta["fingerprint"],
        extra=meta.get("extra", {}),
    )
