from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from support.common import TINY

from pipeline import config
from pipeline.data import DataError, DatasetUnavailable, prepare_dataset


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_demo_world_is_deterministic_from_its_seed(project):
    cfg = config.load(None, TINY)
    prepare_dataset(cfg, "a")
    prepare_dataset(cfg, "b")
    assert _tree_digest(Path("a")) == _tree_digest(Path("b"))
    other = config.load(None, TINY + ["dataset.shapes.seed=1"])
    prepare_dataset(other, "c")
    assert _tree_digest(Path("a")) != _tree_digest(Path("c"))


def test_demo_world_layout_and_held_out_pairs(project):
    cfg = config.load(None, TINY)
    prepared = prepare_dataset(cfg)
    assert prepared.classes[:3] == ["red circle", "red square", "red triangle"]
    assert len(prepared.classes) == 9
    assert len(prepared.samples("train")) == 9 * 6
    assert len(prepared.samples("test")) == 9 * 3
    pretrain_labels = {s.label for s in prepared.samples("pretrain")}
    assert prepared.classes.index("green square") not in pretrain_labels
    assert len(pretrain_labels) == 8
    sample = prepared.samples("test")[0]
    with Image.open(prepared.image_path(sample)) as image:
        assert image.size == (32, 32)
    assert prepared.templates == cfg.dataset.templates


def test_seed_of_the_experiment_does_not_change_the_data(project):
    a = prepare_dataset(config.load(None, TINY), "a")
    b = prepare_dataset(config.load(None, TINY + ["seed=5"]), "b")
    assert a.fingerprint == b.fingerprint


# --------------------------------------------------------------------------- image folders


def _image(path: Path, color=(200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _folder_cfg(root: Path, *extra: str):
    return config.load(None, ["dataset=imagefolder", f"dataset.root={root}", *extra])


def test_imagefolder_class_names_from_folders(project):
    root = project / "imgs"
    for cls in ("golden_retriever", "tabby_cat"):
        for i in range(5):
            _image(root / cls / f"{i}.png")
    prepared = prepare_dataset(_folder_cfg(root))
    assert prepared.classes == ["golden retriever", "tabby cat"]
    assert len(prepared.samples("train")) + len(prepared.samples("test")) == 10
    assert all(len([s for s in prepared.samples("test") if s.label == c]) == 1 for c in (0, 1))


def test_imagefolder_names_file_and_missing_class(project):
    root = project / "imgs"
    for cls in ("n01", "n02"):
        for i in range(3):
            _image(root / cls / f"{i}.jpg")
    names = project / "names.tsv"
    names.write_text("n01\tgoldfish\nn02\tgreat white shark\n")
    prepared = prepare_dataset(_folder_cfg(root, f"dataset.names_file={names}"))
    assert prepared.classes == ["goldfish", "great white shark"]
    names.write_text("n01\tgoldfish\n")
    with pytest.raises(DataError, match=r"class 'n02' is missing from the names file"):
        prepare_dataset(_folder_cfg(root, f"dataset.names_file={names}"), "other")


def test_imagefolder_empty_class_is_named(project):
    root = project / "imgs"
    for i in range(3):
        _image(root / "cat" / f"{i}.png")
    (root / "dog").mkdir()
    with pytest.raises(DataError, match=r"class 'dog' is empty"):
        prepare_dataset(_folder_cfg(root))


def test_manifest_pointing_at_a_missing_file_is_named(project):
    root = project / "imgs"
    for i in range(3):
        _image(root / f"cat{i}.png")
    manifest = project / "m.csv"
    manifest.write_text("path,label\ncat0.png,cat\ncat1.png,cat\nghost.png,cat\n")
    with pytest.raises(DataError, match=r"m\.csv:4: image file not found: .*ghost\.png"):
        prepare_dataset(_folder_cfg(root, f"dataset.manifest={manifest}"))


def test_manifest_with_split_column(project):
    root = project / "imgs"
    rows = ["path,label,split"]
    for cls in ("cat", "dog"):
        for i in range(3):
            _image(root / f"{cls}{i}.png")
            rows.append(f"{cls}{i}.png,{cls},{'test' if i == 0 else 'train'}")
    manifest = project / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    prepared = prepare_dataset(_folder_cfg(root, f"dataset.manifest={manifest}"))
    assert prepared.classes == ["cat", "dog"]
    assert [Path(s.path).name for s in prepared.samples("test")] == ["cat0.png", "dog0.png"]


def test_failed_prepare_keeps_the_previous_output(project):
    root = project / "imgs"
    for i in range(3):
        _image(root / "cat" / f"{i}.png")
        _image(root / "dog" / f"{i}.png")
    prepare_dataset(_folder_cfg(root))
    before = (project / "data/prepared/classes.json").read_text()
    (root / "bird").mkdir()
    with pytest.raises(DataError):
        prepare_dataset(_folder_cfg(root))
    assert (project / "data/prepared/classes.json").read_text() == before
    assert not list((project / "data").glob(".prepared*"))


def test_cifar100_offline_says_what_to_download_and_writes_nothing(project):
    cfg = config.load(None, ["dataset=cifar100", f"dataset.root={project / 'raw'}"])
    with pytest.raises(DatasetUnavailable) as err:
        prepare_dataset(cfg)
    assert "cifar-100-python.tar.gz" in str(err.value)
    assert str(project / "raw") in str(err.value)
    assert not (project / "data/prepared").exists()
    assert not list((project / "data").glob(".prepared*"))


def test_imagenet_r_offline_says_what_to_download(project):
    cfg = config.load(None, ["dataset=imagenet_r", f"dataset.root={project / 'raw'}"])
    with pytest.raises(DatasetUnavailable, match=r"imagenet-r\.tar"):
        prepare_dataset(cfg)


def test_imagenet_r_wordnet_folders_need_names(project):
    root = project / "imagenet-r"
    for i in range(2):
        _image(root / "n01443537" / f"{i}.jpg")
        _image(root / "n01484850" / f"{i}.jpg")
    with pytest.raises(DataError, match=r"names_file"):
        prepare_dataset(config.load(None, ["dataset=imagenet_r", f"dataset.root={root}"]))
    names = project / "names.txt"
    names.write_text("n01443537,goldfish\nn01484850,great white shark\n")
    prepared = prepare_dataset(
        config.load(None, ["dataset=imagenet_r", f"dataset.root={root}", f"dataset.names_file={names}"])
    )
    assert prepared.classes == ["goldfish", "great white shark"]
    assert json.loads((project / "data/prepared/classes.json").read_text())["dataset"] == "imagenet_r"
