"""The path a user with real weights takes, at real size: OpenAI ViT-B/16's architecture
(random weights, saved as the local checkpoint a user would download) through
`backbone=local_file` on an image folder, `dvc repro` up to the first task's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from devtools.scratch import project_env, scratch_project

# Minutes on 2 cores (a 598 MB checkpoint through every stage): make test-full only.
pytestmark = [pytest.mark.slow, pytest.mark.real_size]

# What conf/backbone/local_file.yaml builds by default: OpenAI's ViT-B/16 (QuickGELU).
ARCH = "ViT-B-16-quickgelu"
CLASSES = ("golden_retriever", "tabby_cat", "red_fox")
PER_CLASS = 3  # test_fraction 0.2: 2 train and 1 test image per class


def sh(root: Path, *cmd: str) -> str:
    import subprocess

    result = subprocess.run(cmd, cwd=root, env=project_env(root), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def _images(root: Path) -> None:
    """224x224 noise around a colour per class: decodable photos of the real input size."""
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]][c], dtype=torch.float32)
        for i in range(PER_CLASS):
            pixels = (base + 40 * torch.randn(224, 224, 3, generator=g)).clamp(0, 255).to(torch.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.jpg")


@pytest.fixture(scope="module")
def vit_repo(tmp_path_factory) -> Path:
    """A scratch project on ViT-B/16 after `dvc repro evaluate@01` (embeddings in fp32)."""
    from pipeline.clip.backbone import create_untrained

    tmp = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    # The file name and format of open_clip's published checkpoints (a plain state dict);
    # the plain ViT-B-16 has the same tensors as OpenAI's, only its activation differs.
    checkpoint = tmp / "open_clip_pytorch_model.bin"
    torch.save(create_untrained("ViT-B-16").state_dict(), checkpoint)
    _images(tmp / "images")
    small = {
        "split": {"n_tasks": 1},
        "embed": {"batch_size": 8, "num_workers": 0, "chunk_size": 8, "precision": "fp32"},
        "generator": {"hidden": 16, "latent": 4, "epochs": 2, "batch_size": 4},
        "method": {"prompt": {"epochs": 1, "batch_size": 8, "per_class_per_epoch": 4}},
        "tracking": {"register_classifier": False},
    }
    repo = scratch_project(
        tmp / "repo", small,
        compose=["backbone=local_file", f"backbone.checkpoint={checkpoint}",
                 "dataset=imagefolder", f"dataset.root={tmp / 'images'}"],
    )
    # Up to the first task's evaluation, whatever stages dvc.yaml puts before it.
    sh(repo, "dvc", "repro", "evaluate@01")
    return repo


def test_vit_b16_local_file_runs_a_task_at_real_widths(vit_repo):
    from pipeline.clip.backbone import load_backbone

    backbone = load_backbone(vit_repo / "models/backbone")
    assert backbone.info["arch"] == ARCH and backbone.info["source"] == "file"
    assert backbone.embed_dim == 512 and backbone.info["image_size"] == 224 and backbone.info["context_length"] == 77
    # The activation OpenAI's weights were trained with, in both towers.
    blocks = [*backbone.model.visual.transformer.resblocks, *backbone.model.transformer.resblocks]
    assert len(blocks) == 24 and all(type(b.mlp.gelu).__name__ == "QuickGELU" for b in blocks)

    index = json.loads((vit_repo / "data/embeddings/train/index.json").read_text())
    assert index["dim"] == 512 and index["n_samples"] == 6 and index["precision"] == "fp32"
    text = _read(vit_repo / "data/embeddings/text.safetensors")
    assert text["class_features"].shape == (3, 512)
    assert text["template_features"].shape == (3, 5, 512)

    evaluation = json.loads((vit_repo / "metrics/tasks/task-01.json").read_text())
    assert evaluation["n_seen_classes"] == 3 and 0.0 <= evaluation["step_accuracy"] <= 1.0, evaluation


def test_prompt_features_cut_at_end_of_text_match_the_full_context(vit_repo):
    """The trained task-01 prompts through ViT-B/16's 12-layer text tower: the sequence cut
    after the longest end-of-text token gives the 77-token features."""
    from pipeline.clip.backbone import load_backbone
    from pipeline.method.prompts import learner_from_state, load_prompt_state

    backbone = load_backbone(vit_repo / "models/backbone")
    state, info = load_prompt_state(vit_repo / "models/prompts/task-01.safetensors")
    assert info["trained"] and len(info["seen"]) == 3
    learner = learner_from_state(backbone.model, backbone.tokenizer, state, info).eval()
    assert learner.tokens.shape[1] == 77 and int(learner.eot.max()) + 1 < 20
    ids = torch.tensor(info["seen"])
    with torch.no_grad():
        cut, full = learner.features(ids, cut=True), learner.features(ids, cut=False)
    assert cut.shape == (3, 512)
    assert torch.allclose(cut, full, atol=1e-5), (cut - full).abs().max()


def test_bf16_and_fp32_embedding_caches_load_and_agree(vit_repo):
    """The fp32 cache `dvc repro` made, and a bf16 one (what `auto` gives on a GPU) of the
    same images: both load through the loader every stage uses, and agree."""
    import shutil

    from pipeline.clip.backbone import read_info
    from pipeline.clip.embedding import load_embeddings

    shutil.copytree(vit_repo / "data/embeddings/test", vit_repo / "fp32-test")
    params = yaml.safe_load((vit_repo / "params.yaml").read_text())
    params["embed"]["precision"] = "bf16"
    (vit_repo / "params-bf16.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The fp32 cache does not serve a bf16 request: the images are embedded again.
    out = sh(vit_repo, "recall", "embed", "--split", "test", "--params", "params-bf16.yaml")
    assert "(reused)" not in out, out

    sha = read_info(vit_repo / "models/backbone")["sha256"]
    fp32 = load_embeddings(vit_repo / "fp32-test", sha)
    bf16 = load_embeddings(vit_repo / "data/embeddings/test", sha)
    assert json.loads((vit_repo / "data/embeddings/test/index.json").read_text())["precision"] == "bf16"
    assert torch.equal(fp32["sample_ids"], bf16["sample_ids"]) and torch.equal(fp32["labels"], bf16["labels"])
    assert bf16["embeddings"].shape == fp32["embeddings"].shape == (3, 512)
    assert not torch.equal(bf16["embeddings"], fp32["embeddings"])  # bf16 really ran
    # bf16 keeps 8 bits of mantissa; through 12 layers about 1% of the norm (0.9% measured).
    cosine = torch.nn.functional.cosine_similarity(bf16["embeddings"], fp32["embeddings"], dim=-1)
    assert (cosine > 0.999).all(), cosine
    relative = (bf16["embeddings"] - fp32["embeddings"]).norm(dim=-1) / fp32["embeddings"].norm(dim=-1)
    assert (relative < 0.05).all(), relative


def _read(path: Path) -> dict[str, torch.Tensor]:
    from pipeline.io import read_tensors

    return read_tensors(path)
