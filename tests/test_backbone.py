from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.clip import backbone as backbone_lib
from pipeline.clip.backbone import BackboneError
from pipeline.io import write_tensors


def _random_tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return backbone_lib.create_untrained("recall-tiny").eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_backbone_from_a_local_checkpoint_file(project, suffix):
    model = _random_tiny(0)
    path = project / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        write_tensors(path, {k: v.clone() for k, v in model.state_dict().items()})
    cfg = config.load(None, ["backbone=local_file", "backbone.arch=recall-tiny", f"backbone.checkpoint={path}"])
    info = backbone_lib.materialise(cfg.backbone, "models/backbone")
    loaded = backbone_lib.load_backbone("models/backbone")
    assert loaded.sha256 == info["sha256"] and len(info["sha256"]) == 64
    assert loaded.info["source"] == "file" and loaded.embed_dim == 128
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded.model.encode_image(images), model.encode_image(images), atol=1e-6)
    tokens = loaded.tokenizer(["a red circle"])
    assert tokens.shape == (1, loaded.info["context_length"])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace_method` is deprecated")
def test_backbone_from_openai_torchscript_release(project):
    """OpenAI's original ``ViT-B-16.pt`` (what ``clip.load`` downloads) is a TorchScript
    archive holding the weights under open_clip's names plus a few settings."""
    model = _random_tiny(0)
    for key, value in {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}.items():
        model.__dict__.pop(key, None)  # open_clip keeps some as plain attributes; OpenAI as tensors
        model.register_buffer(key, torch.tensor(value))
    images = torch.randn(2, 3, 32, 32)
    path = project / "ViT-tiny.pt"
    torch.jit.trace_module(model, {"encode_image": (images,)}).save(str(path))
    cfg = config.load(None, ["backbone=local_file", "backbone.arch=recall-tiny", f"backbone.checkpoint={path}"])
    backbone_lib.materialise(cfg.backbone, "models/backbone")
    loaded = backbone_lib.load_backbone("models/backbone")
    with torch.inference_mode():
        assert torch.allclose(loaded.model.encode_image(images), model.encode_image(images), atol=1e-6)


def test_missing_checkpoint_file_is_named(project):
    cfg = config.load(None, ["backbone=local_file", "backbone.arch=recall-tiny", "backbone.checkpoint=/nowhere/w.pt"])
    with pytest.raises(BackboneError, match=r"file not found: /nowhere/w\.pt"):
        backbone_lib.materialise(cfg.backbone, "models/backbone")
    assert not (project / "models/backbone").exists()


def test_checkpoint_of_another_architecture_is_refused(project):
    path = project / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3)}, path)
    cfg = config.load(None, ["backbone=local_file", "backbone.arch=recall-tiny", f"backbone.checkpoint={path}"])
    with pytest.raises(BackboneError, match=r"wrong\.pt: not a usable 'recall-tiny' checkpoint"):
        backbone_lib.materialise(cfg.backbone, "models/backbone")


def test_hub_tag_offline_names_the_local_file_alternative(project):
    cfg = config.load(None, ["backbone=vit_b16_openai"])
    with pytest.raises(BackboneError) as err:
        backbone_lib.materialise(cfg.backbone, "models/backbone")
    message = str(err.value)
    assert "ViT-B-16" in message and "backbone=local_file" in message and "backbone.checkpoint=" in message
    assert not (project / "models/backbone").exists()


def test_unknown_hub_tag_lists_known_tags(project):
    cfg = config.load(None, ["backbone=vit_b16_openai", "backbone.pretrained=nope"])
    with pytest.raises(BackboneError, match=r"known tags: .*openai"):
        backbone_lib.materialise(cfg.backbone, "models/backbone")


def test_weights_changed_after_materialising_are_refused(project):
    path = project / "ckpt.pt"
    torch.save(_random_tiny(0).state_dict(), path)
    cfg = config.load(None, ["backbone=local_file", "backbone.arch=recall-tiny", f"backbone.checkpoint={path}"])
    backbone_lib.materialise(cfg.backbone, "models/backbone")
    write_tensors("models/backbone/weights.safetensors", {k: v.clone() for k, v in _random_tiny(1).state_dict().items()})
    with pytest.raises(BackboneError, match=r"does not match backbone\.json"):
        backbone_lib.load_backbone("models/backbone")


def test_demo_backbone_pretrains_and_reports_zero_shot(world):
    info = backbone_lib.read_info(world.paths.backbone)
    metrics = info["metrics"]
    assert info["source"] == "pretrain" and info["arch"] == "recall-tiny"
    for key in ("zeroshot_acc_pretrain_pairs", "zeroshot_acc_heldout_pairs", "chance"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["chance"] == pytest.approx(1 / 9)
