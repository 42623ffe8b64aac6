"""The backbone step: materialise frozen CLIP weights into one safetensors file.

Sources: an open_clip pretrained tag (hub), a local checkpoint file, or, for the demo,
the tiny CLIP that ``pipeline.clip.demo_clip`` pretrains here. Whatever the source, the output
is ``weights.safetensors`` plus ``backbone.json`` (architecture, preprocessing, sha256),
and every later step loads the backbone from that folder alone.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.compat import import_open_clip
from pipeline.config import BackboneConfig
from pipeline.errors import UserError
from pipeline.io import atomic_dir, read_json, read_tensors, sha256_file, write_json, write_tensors

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
INFO_FILE = "backbone.json"
_MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


class BackboneError(UserError):
    """The backbone cannot be built or loaded; the message says what to do instead."""


def open_clip():
    """open_clip with the project's own architectures (``recall-tiny``) registered."""
    module = import_open_clip()
    if "recall-tiny" not in module.list_models():
        module.add_model_config(_MODEL_CONFIGS)
    return module


@dataclass
class Backbone:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    info: dict[str, Any]

    @property
    def sha256(self) -> str:
        return self.info["sha256"]

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])


def create_untrained(arch: str) -> torch.nn.Module:
    """The architecture with random weights (callers load or train the weights)."""
    oc = open_clip()
    if arch not in oc.list_models():
        raise BackboneError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    # open_clip warns on the root logger that no pretrained weights were loaded: expected here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return oc.create_model(arch, pretrained=None)
    finally:
        root.setLevel(level)


def _from_hub(cfg: BackboneConfig) -> torch.nn.Module:
    oc = open_clip()
    known = oc.list_pretrained_tags_by_model(cfg.arch) if cfg.arch in oc.list_models() else []
    if cfg.pretrained not in known:
        raise BackboneError(
            f"backbone.pretrained={cfg.pretrained!r} is not an open_clip tag for {cfg.arch!r}; "
            f"known tags: {known or 'none (unknown architecture)'}"
        )
    try:
        return oc.create_model(cfg.arch, pretrained=cfg.pretrained)
    except Exception as exc:  # network errors come from requests, urllib or huggingface_hub
        raise BackboneError(
            f"could not fetch open_clip weights {cfg.arch} / {cfg.pretrained} "
            f"({type(exc).__name__}: {exc}). Offline? Download the checkpoint on a machine with "
            f"internet access and use it as a local file: backbone=local_file "
            f"backbone.arch={cfg.arch} backbone.checkpoint=/path/to/open_clip_model.safetensors"
        ) from None


# Entries of OpenAI's TorchScript releases that are settings, not weights of the model.
_OPENAI_ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def _read_checkpoint(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return read_tensors(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            torchscript = any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
        if torchscript:
            # OpenAI's original releases (what `clip.load` downloads) are TorchScript archives,
            # which torch.load refuses with weights_only; torch.jit.load runs no pickled Python.
            # (torch deprecates torch.jit in favour of torch.export, which cannot read these files.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            return {k: v for k, v in state.items() if k not in _OPENAI_ARCHIVE_EXTRAS}
    return torch.load(path, map_location="cpu", weights_only=True)


def _from_file(cfg: BackboneConfig) -> torch.nn.Module:
    path = Path(cfg.checkpoint or "").expanduser()
    if not path.is_file():
        raise BackboneError(f"backbone.checkpoint: file not found: {path}")
    model = create_untrained(cfg.arch)
    try:
        state = _read_checkpoint(path)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        # Buffers the model computes itself (the causal mask) are not weights; a TorchScript
        # archive saves them all the same.
        computed = set(dict(model.named_buffers())) - set(model.state_dict())
        state = {k.removeprefix("module."): v for k, v in state.items() if k.removeprefix("module.") not in computed}
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BackboneError(f"{path}: not a usable {cfg.arch!r} checkpoint: {exc}") from None
    return model


def _describe(model: torch.nn.Module, cfg: BackboneConfig) -> dict[str, Any]:
    oc = open_clip()
    model_cfg = oc.get_model_config(cfg.arch) or {}
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    image_size = getattr(model.visual, "image_size", model_cfg.get("vision_cfg", {}).get("image_size"))
    if isinstance(image_size, (tuple, list)):
        image_size = int(image_size[0])
    mean = preprocess_cfg.get("mean") or oc.OPENAI_DATASET_MEAN
    std = preprocess_cfg.get("std") or oc.OPENAI_DATASET_STD
    return {
        "name": cfg.name,
        "arch": cfg.arch,
        "source": cfg.source,
        "pretrained": cfg.pretrained,
        "checkpoint": cfg.checkpoint,
        "embed_dim": int(model_cfg.get("embed_dim") or model.text_projection.shape[1]),
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "context_length": int(model.context_length),
    }


def materialise(
    cfg: BackboneConfig,
    out: str | Path,
    pretrain: Callable[[], tuple[torch.nn.Module, dict[str, float]]] | None = None,
) -> dict[str, Any]:
    """Build the backbone from its source and write it to ``out``; return its info.

    ``pretrain`` trains the demo backbone (source ``pretrain``) and returns it with its
    metrics; the caller supplies it because it needs the prepared data.
    """
    metrics: dict[str, float] = {}
    if cfg.source == "hub":
        model = _from_hub(cfg)
    elif cfg.source == "file":
        model = _from_file(cfg)
    else:
        if pretrain is None:
            raise BackboneError("backbone.source='pretrain' needs the prepared demo data")
        model, metrics = pretrain()
    model = model.float().eval()
    info = _describe(model, cfg)
    with atomic_dir(out) as tmp:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        write_tensors(tmp / WEIGHTS_FILE, state, metadata={"arch": cfg.arch})
        info["sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        info["metrics"] = metrics
        write_json(tmp / INFO_FILE, info)
    log.info("backbone %s (%s) sha256 %s", cfg.arch, cfg.source, info["sha256"][:12])
    return info


def read_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INFO_FILE
    if not path.exists():
        raise BackboneError(f"{path}: no materialised backbone here (run the backbone step first)")
    return read_json(path)


def load_backbone(folder: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Backbone:
    """Rebuild the frozen backbone from a materialised folder."""
    folder = Path(folder)
    info = read_info(folder)
    weights = folder / WEIGHTS_FILE
    if verify:
        actual = sha256_file(weights)
        if actual != info["sha256"]:
            raise BackboneError(
                f"{weights}: sha256 {actual[:12]} does not match {INFO_FILE} ({info['sha256'][:12]}); "
                "the weights changed after the backbone step - run it again"
            )
    oc = open_clip()
    model = create_untrained(info["arch"])
    model.load_state_dict(read_tensors(weights), strict=True)
    model = model.to(device).eval().requires_grad_(False)
    preprocess = oc.image_transform(info["image_size"], is_train=False, mean=info["mean"], std=info["std"])
    tokenizer = oc.get_tokenizer(info["arch"])
    return Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, info=info)
