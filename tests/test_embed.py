from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.clip import backbone as backbone_lib
from pipeline.clip import embedding as embed_lib
from pipeline.clip.embedding import BadImage, EmbeddingMismatch
from pipeline.data import load_prepared
from pipeline.io import read_json
from pipeline.stages.embed import run_embed, run_embed_text


def _embed(cfg, split="train", **kwargs):
    prepared = load_prepared(cfg.paths.prepared)
    backbone = backbone_lib.load_backbone(cfg.paths.backbone)
    options = dict(batch_size=8, chunk_size=10, progress=False)
    options.update(kwargs)
    return embed_lib.embed_split(prepared, split, backbone, Path(cfg.paths.embeddings) / split, **options), backbone


def test_embeddings_are_chunked_raw_and_complete(world):
    index, backbone = _embed(world)
    assert index["n_samples"] == 54 and index["dim"] == 128
    assert [p["n"] for p in index["parts"]] == [10, 10, 10, 10, 10, 4]
    data = embed_lib.load_embeddings(Path(world.paths.embeddings) / "train", backbone.sha256)
    assert data["embeddings"].shape == (54, 128)
    assert sorted(data["sample_ids"].tolist()) == list(range(54))
    # Raw, not normalised.
    assert not torch.allclose(data["embeddings"].norm(dim=-1), torch.ones(54))
    # Same values as encoding the images directly.
    prepared = load_prepared(world.paths.prepared)
    samples = prepared.samples("train")
    dataset = embed_lib.ImageDataset(prepared, samples, backbone.preprocess)
    first = int(data["sample_ids"][0])
    with torch.inference_mode():
        direct = backbone.model.encode_image(dataset[first][0][None])[0]
    assert torch.allclose(direct, data["embeddings"][0], atol=1e-5)
    assert int(data["labels"][0]) == samples[first].label


def test_task_view_reads_only_the_requested_classes(world):
    _, backbone = _embed(world)
    data = embed_lib.load_embeddings(Path(world.paths.embeddings) / "train", backbone.sha256, classes=[2, 5])
    assert sorted(set(data["labels"].tolist())) == [2, 5]
    assert len(data["labels"]) == 12


def test_embeddings_are_reused_when_backbone_and_data_match(world):
    first, _ = _embed(world)
    part = Path(world.paths.embeddings) / "train" / first["parts"][0]["file"]
    stamp = part.stat().st_mtime_ns
    again, _ = _embed(world)
    assert again["reused"] and part.stat().st_mtime_ns == stamp
    # Batch size does not change the embeddings, so it does not invalidate them.
    assert _embed(world, batch_size=4)[0]["reused"]


def test_embeddings_of_another_precision_are_not_reused(world):
    first, _ = _embed(world)
    assert first["precision"] == "fp32"  # what `auto` means on a CPU
    bf16, _ = _embed(world, precision="bf16")
    assert not bf16["reused"] and bf16["precision"] == "bf16"
    back, _ = _embed(world, precision="auto")
    assert not back["reused"] and back["precision"] == "fp32"


def test_embeddings_of_other_weights_are_refused_and_recomputed(world):
    _, old = _embed(world)
    torch.manual_seed(123)
    other = backbone_lib.create_untrained("recall-tiny")
    ckpt = Path("other.pt")
    torch.save(other.state_dict(), ckpt)
    from pipeline import config

    cfg = config.load(None, ["backbone=local_file", "backbone.arch=recall-tiny", f"backbone.checkpoint={ckpt}"])
    new_info = backbone_lib.materialise(cfg.backbone, world.paths.backbone)
    assert new_info["sha256"] != old.sha256
    folder = Path(world.paths.embeddings) / "train"
    with pytest.raises(EmbeddingMismatch, match=r"re-run the embed step"):
        embed_lib.load_embeddings(folder, new_info["sha256"])
    index, _ = _embed(world)
    assert not index["reused"] and index["backbone_sha256"] == new_info["sha256"]
    with pytest.raises(EmbeddingMismatch):
        embed_lib.load_embeddings(folder, old.sha256)


def test_a_part_file_from_other_weights_is_refused(world):
    index, backbone = _embed(world)
    folder = Path(world.paths.embeddings) / "train"
    part = folder / index["parts"][1]["file"]
    tensors = embed_lib.read_tensors(part)
    embed_lib.write_tensors(part, tensors, metadata={"backbone_sha256": "0" * 64})
    with pytest.raises(EmbeddingMismatch, match=part.name):
        embed_lib.load_embeddings(folder, backbone.sha256)


def _corrupt(cfg, index: int = 3) -> str:
    prepared = load_prepared(cfg.paths.prepared)
    sample = prepared.samples("train")[index]
    prepared.image_path(sample).write_bytes(b"this is not a png")
    return str(prepared.image_path(sample))


def test_corrupt_image_is_named_and_earlier_output_survives(world):
    _embed(world)
    folder = Path(world.paths.embeddings) / "train"
    before = read_json(folder / "index.json")
    path = _corrupt(world)
    # Change what the index is keyed on, so the step recomputes instead of reusing.
    with pytest.raises(BadImage, match=path.replace(".", r"\.")):
        _embed(world, chunk_size=20)
    assert read_json(folder / "index.json") == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".train")]


def test_skip_mode_counts_bad_images(world):
    _corrupt(world, 0)
    _corrupt(world, 7)
    index, _ = _embed(world, on_bad_image="skip")
    assert len(index["skipped"]) == 2 and index["n_samples"] == 52


def test_skip_count_reaches_the_run_metrics(world):
    _corrupt(world, 0)
    cfg = world.model_copy(update={"embed": world.embed.model_copy(update={"on_bad_image": "skip"})})
    run_embed(cfg, "train")
    metrics = read_json(Path(cfg.paths.metrics) / "embed-train.json")
    assert metrics["n_skipped"] == 1
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.server import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`recall.step` = 'embed-train'"
    )
    assert runs[0].data.metrics["n_skipped"] == 1


def test_text_features_are_normalised_template_means(world):
    backbone = backbone_lib.load_backbone(world.paths.backbone)
    prepared = load_prepared(world.paths.prepared)
    run_embed_text(world)
    text = embed_lib.load_text_features(Path(world.paths.embeddings) / "text.safetensors", backbone.sha256)
    per_template, classes = text["template_features"], text["class_features"]
    assert per_template.shape == (9, len(prepared.templates), 128)
    assert torch.allclose(classes.norm(dim=-1), torch.ones(9), atol=1e-5)
    expected = torch.nn.functional.normalize(per_template.mean(1), dim=-1)
    assert torch.allclose(classes, expected, atol=1e-6)
    with pytest.raises(EmbeddingMismatch):
        embed_lib.load_text_features(Path(world.paths.embeddings) / "text.safetensors", "f" * 64)


def test_missing_index_means_incomplete(world):
    _embed(world)
    folder = Path(world.paths.embeddings) / "train"
    os.remove(folder / "index.json")
    with pytest.raises(EmbeddingMismatch, match="incomplete"):
        embed_lib.load_embeddings(folder, "x")
