"""The prepare step: turn a dataset (demo, a user's folder, a benchmark) into a manifest.

The whole prepared folder is built under a temporary name and renamed into place at the
end, so a failure or a kill leaves the previous output untouched.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.config import (
    Cifar100Dataset,
    Config,
    ImageFolderDataset,
    ImageNetRDataset,
    ShapesDataset,
    StreamDataset,
)
from pipeline.data import shapes as shapes_world
from pipeline.data.manifest import Prepared, Sample, load_prepared, write_manifest
from pipeline.errors import UserError
from pipeline.io import atomic_dir

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class DataError(UserError):
    """Bad input data; the message names the file or class at fault."""


class DatasetUnavailable(DataError):
    """A benchmark that is not on disk (and cannot be downloaded here)."""


def prepare_dataset(cfg: Config, out: str | Path | None = None) -> Prepared:
    out = Path(out or cfg.paths.prepared)
    dataset = cfg.dataset
    with atomic_dir(out) as tmp:
        if isinstance(dataset, ShapesDataset):
            _prepare_shapes(dataset, tmp)
        elif isinstance(dataset, ImageFolderDataset):
            _prepare_imagefolder(dataset, tmp)
        elif isinstance(dataset, Cifar100Dataset):
            _prepare_cifar100(dataset, tmp)
        elif isinstance(dataset, ImageNetRDataset):
            _prepare_imagenet_r(dataset, tmp)
        elif isinstance(dataset, StreamDataset):
            _prepare_stream(dataset, tmp)
        else:  # pragma: no cover - the config's discriminated union rules this out
            raise DataError(f"no preparation for dataset {dataset.name!r}")
    return load_prepared(out)


# --------------------------------------------------------------------------- demo world


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _prepare_shapes(dataset: ShapesDataset, out: Path) -> None:
    world = dataset.shapes
    classes = shapes_world.class_names(world.colors, world.shapes)
    holdout = set(world.holdout_pairs)
    counts = {"train": world.train_per_class, "test": world.test_per_class, "pretrain": world.pretrain_per_class}
    splits: dict[str, list[Sample]] = {}
    for split, per_class in counts.items():
        samples = []
        for label, name in enumerate(classes):
            if split == "pretrain" and name in holdout:
                continue
            color, shape = name.split(" ", 1)
            folder = out / "images" / split / _slug(name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = shapes_world.sample_rng(world.seed, split, label, i)
                image = shapes_world.draw(color, shape, world.image_size, rng, world.noise)
                rel = f"images/{split}/{_slug(name)}/{i:05d}.png"
                image.save(out / rel, optimize=False, compress_level=1)
                samples.append(Sample(f"{split}/{_slug(name)}/{i:05d}", rel, label))
        splits[split] = samples
    write_manifest(
        out,
        "shapes",
        classes,
        list(dataset.templates),
        splits,
        extra={"colors": world.colors, "shapes": world.shapes, "holdout_pairs": sorted(holdout)},
    )
    log.info("shapes: %d classes, %s", len(classes), {k: len(v) for k, v in splits.items()})


def _prepare_stream(dataset: StreamDataset, out: Path) -> None:
    """The stream's classes arrive batch by batch (recall ingest, recall intake); all there
    is to prepare is the demo world the demo backbone pretrains on, when there is one."""
    if dataset.shapes is not None:
        _prepare_shapes(ShapesDataset(name="shapes", shapes=dataset.shapes, templates=dataset.templates), out)
    else:
        write_manifest(out, "stream", [], list(dataset.templates), {})


# --------------------------------------------------------------------------- image folders


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _read_names_file(path: Path) -> dict[str, str]:
    if not path.exists():
        raise DataError(f"{path}: names file not found")
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, name = line.partition("\t") if "\t" in line else line.partition(",")
        if not sep or not name.strip():
            raise DataError(f"{path}:{number}: expected 'folder<TAB>name' or 'folder,name', got {line!r}")
        names[key.strip()] = name.strip()
    return names


def _class_name(folder: str, names: dict[str, str] | None, names_file: str | None) -> str:
    if names is None:
        return folder.replace("_", " ").strip()
    if folder not in names:
        raise DataError(f"class {folder!r} is missing from the names file {names_file}")
    return names[folder]


def _scan_class_folders(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders (expected one sub-folder per class)")
    found: dict[str, list[Path]] = {}
    for folder in folders:
        images = sorted(p for p in folder.rglob("*") if _is_image(p))
        if not images:
            raise DataError(f"class {folder.name!r} is empty: no images under {folder}")
        found[folder.name] = images
    return found


def _holdout_split(
    per_class: dict[str, list[str]], fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    train, test = {}, {}
    for index, (key, paths) in enumerate(sorted(per_class.items())):
        if len(paths) < 2:
            raise DataError(f"class {key!r} has {len(paths)} image; at least 2 are needed to split train/test")
        order = np.random.default_rng([seed, index]).permutation(len(paths))
        n_test = min(len(paths) - 1, max(1, round(fraction * len(paths))))
        test[key] = [paths[i] for i in sorted(order[:n_test])]
        train[key] = [paths[i] for i in sorted(order[n_test:])]
    return train, test


def _samples(per_class: dict[str, list[str]], labels: dict[str, int], split: str) -> list[Sample]:
    samples = []
    for key in sorted(per_class, key=labels.__getitem__):
        for i, path in enumerate(per_class[key]):
            samples.append(Sample(f"{split}/{_slug(key)}/{i:06d}", path, labels[key]))
    return samples


def _build_from_folders(
    out: Path,
    dataset_name: str,
    templates: list[str],
    train: dict[str, list[str]],
    test: dict[str, list[str]],
    names: dict[str, str] | None,
    names_file: str | None,
) -> None:
    keys = sorted(set(train) | set(test))
    for key in keys:
        if not train.get(key):
            raise DataError(f"class {key!r} has no training images")
        if not test.get(key):
            raise DataError(f"class {key!r} has no test images")
    classes = [_class_name(k, names, names_file) for k in keys]
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise DataError(f"class names {duplicates} are used by more than one class folder")
    labels = {k: i for i, k in enumerate(keys)}
    write_manifest(
        out,
        dataset_name,
        classes,
        templates,
        {"train": _samples(train, labels, "train"), "test": _samples(test, labels, "test")},
        extra={"class_keys": keys},
    )


def _prepare_imagefolder(dataset: ImageFolderDataset, out: Path) -> None:
    root = Path(dataset.root).expanduser().resolve()
    names = _read_names_file(Path(dataset.names_file)) if dataset.names_file else None
    if dataset.manifest:
        train, test = _read_csv_manifest(Path(dataset.manifest), root, dataset)
    elif (root / "train").is_dir() and (root / "test").is_dir():
        train = {k: [str(p) for p in v] for k, v in _scan_class_folders(root / "train").items()}
        test = {k: [str(p) for p in v] for k, v in _scan_class_folders(root / "test").items()}
    else:
        found = {k: [str(p) for p in v] for k, v in _scan_class_folders(root).items()}
        train, test = _holdout_split(found, dataset.test_fraction, dataset.split_seed)
    _build_from_folders(out, "imagefolder", list(dataset.templates), train, test, names, dataset.names_file)


def _read_csv_manifest(
    manifest: Path, root: Path, dataset: ImageFolderDataset
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    if not manifest.exists():
        raise DataError(f"{manifest}: manifest not found")
    by_split: dict[str, dict[str, list[str]]] = {"train": defaultdict(list), "test": defaultdict(list)}
    unsplit: dict[str, list[str]] = defaultdict(list)
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{manifest}: missing column(s) {sorted(missing)}; expected path,label[,split]")
        for line, row in enumerate(reader, 2):
            path = Path(row["path"])
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise DataError(f"{manifest}:{line}: image file not found: {path}")
            label = (row.get("label") or "").strip()
            if not label:
                raise DataError(f"{manifest}:{line}: empty label")
            split = (row.get("split") or "").strip()
            if split:
                if split not in by_split:
                    raise DataError(f"{manifest}:{line}: split must be train or test, got {split!r}")
                by_split[split][label].append(str(path))
            else:
                unsplit[label].append(str(path))
    if unsplit:
        extra_train, extra_test = _holdout_split(dict(unsplit), dataset.test_fraction, dataset.split_seed)
        for key in extra_train:
            by_split["train"][key].extend(extra_train[key])
            by_split["test"][key].extend(extra_test[key])
    return dict(by_split["train"]), dict(by_split["test"])


# --------------------------------------------------------------------------- benchmarks

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def _prepare_cifar100(dataset: Cifar100Dataset, out: Path) -> None:
    from pipeline.compat import import_torchvision

    torchvision = import_torchvision()
    root = Path(dataset.root).expanduser()
    splits: dict[str, list[Sample]] = {}
    classes: list[str] = []
    for split, train in (("train", True), ("test", False)):
        try:
            data = torchvision.datasets.CIFAR100(str(root), train=train, download=dataset.download)
        except Exception as exc:  # torchvision raises RuntimeError offline, URLError on download
            raise DatasetUnavailable(
                f"CIFAR-100 is not available under {root} ({exc}). Download {_CIFAR_URL} "
                f"and extract it so that {root / 'cifar-100-python'} exists, or set "
                f"dataset.download=true on a machine with internet access."
            ) from None
        classes = [c.replace("_", " ") for c in data.classes]
        samples = []
        for i, (image, label) in enumerate(zip(data.data, data.targets)):
            rel = f"images/{split}/{i:05d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(image).save(out / rel, compress_level=1)
            samples.append(Sample(f"{split}/{i:05d}", rel, int(label)))
        splits[split] = samples
    write_manifest(out, "cifar100", classes, list(dataset.templates), splits)


def _prepare_imagenet_r(dataset: ImageNetRDataset, out: Path) -> None:
    root = Path(dataset.root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetUnavailable(
            f"ImageNet-R is not available: {root} does not exist. Download {_IMAGENET_R_URL}, "
            f"extract it so that {root}/n01443537/ holds images, and set dataset.root to it."
        )
    found = {k: [str(p) for p in v] for k, v in _scan_class_folders(root).items()}
    names = _read_names_file(Path(dataset.names_file)) if dataset.names_file else None
    if names is None and all(re.fullmatch(r"n\d{8}", k) for k in found):
        raise DataError(
            f"{root}: class folders are WordNet ids (e.g. {next(iter(found))!r}); set "
            f"dataset.names_file to a file with one 'wnid<TAB>class name' line per folder"
        )
    train, test = _holdout_split(found, dataset.test_fraction, dataset.split_seed)
    _build_from_folders(out, "imagenet_r", list(dataset.templates), train, test, names, dataset.names_file)
