"""Pretraining of the demo's tiny CLIP on the shapes world, with captions.

Captions name a colour and a shape ("a photo of a red circle"), or only one of them
("something red", "a circle"). The images and the full captions of the held-out
colour-shape pairs are never seen here, so zero-shot accuracy on those pairs measures real
compositional transfer. A caption can describe several images of a batch (every red
image matches "something red"), so the contrastive targets are spread uniformly over all
matching pairs instead of the diagonal alone.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.clip.backbone import Backbone, create_untrained, open_clip
from pipeline.clip.embedding import ImageDataset, class_text_features, collate_images, zero_shot_accuracy
from pipeline.config import BackboneConfig
from pipeline.data.manifest import Prepared

log = logging.getLogger(__name__)

FULL_TEMPLATES = ["a {c} {s}.", "a photo of a {c} {s}.", "a {s} that is {c}.", "a picture of a {c} {s}.", "{c} {s}"]
COLOR_TEMPLATES = ["something {c}.", "a {c} thing.", "a photo of something {c}."]
SHAPE_TEMPLATES = ["a {s}.", "a photo of a {s}.", "a {s} shape."]
CAPTION_KIND_PROBS = (0.6, 0.2, 0.2)  # full, colour only, shape only


def load_images(prepared: Prepared, split: str, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    samples = prepared.samples(split)
    loader = DataLoader(ImageDataset(prepared, samples, preprocess), batch_size=512, collate_fn=collate_images)
    images, labels = [], []
    for batch, indices, bad in loader:
        if bad:
            raise ValueError(f"unreadable demo image: {bad[0][1]}")
        images.append(batch)
        labels.append(torch.tensor([samples[i].label for i in indices.tolist()]))
    return torch.cat(images), torch.cat(labels)


class CaptionBank:
    """Every caption the pretraining may use, tokenised once, with its attributes."""

    def __init__(self, colors: list[str], shapes: list[str], holdout: set[str], tokenizer):
        texts, color_of, shape_of = [], [], []
        self.full: dict[tuple[int, int], list[int]] = {}
        self.color_only: dict[int, list[int]] = {}
        self.shape_only: dict[int, list[int]] = {}

        def add(text: str, ci: int, si: int) -> int:
            texts.append(text)
            color_of.append(ci)
            shape_of.append(si)
            return len(texts) - 1

        for ci, c in enumerate(colors):
            self.color_only[ci] = [add(t.format(c=c), ci, -1) for t in COLOR_TEMPLATES]
            for si, s in enumerate(shapes):
                if f"{c} {s}" not in holdout:
                    self.full[(ci, si)] = [add(t.format(c=c, s=s), ci, si) for t in FULL_TEMPLATES]
        for si, s in enumerate(shapes):
            self.shape_only[si] = [add(t.format(s=s), -1, si) for t in SHAPE_TEMPLATES]
        self.tokens = tokenizer(texts)
        self.color = torch.tensor(color_of)
        self.shape = torch.tensor(shape_of)

    def draw(self, colors: torch.Tensor, shapes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        kinds = torch.multinomial(torch.tensor(CAPTION_KIND_PROBS), len(colors), replacement=True, generator=generator)
        picks = torch.rand(len(colors), generator=generator)
        ids = []
        for kind, ci, si, u in zip(kinds.tolist(), colors.tolist(), shapes.tolist(), picks.tolist()):
            options = (self.full[(ci, si)], self.color_only[ci], self.shape_only[si])[kind]
            ids.append(options[int(u * len(options))])
        return torch.tensor(ids)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_tiny_clip(
    cfg: BackboneConfig,
    prepared: Prepared,
    log_metric: Callable[[str, float, int], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train the tiny CLIP from scratch; return it and its zero-shot figures."""
    assert cfg.pretrain is not None
    settings = cfg.pretrain
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    oc = open_clip()
    model = create_untrained(cfg.arch)
    image_size = oc.get_model_config(cfg.arch)["vision_cfg"]["image_size"]
    preprocess = oc.image_transform(image_size, is_train=False)
    tokenizer = oc.get_tokenizer(cfg.arch)

    colors, shapes = prepared.extra["colors"], prepared.extra["shapes"]
    holdout = set(prepared.extra.get("holdout_pairs", []))
    images, labels = load_images(prepared, "pretrain", preprocess)
    color_of_class = torch.tensor([colors.index(n.split(" ", 1)[0]) for n in prepared.classes])
    shape_of_class = torch.tensor([shapes.index(n.split(" ", 1)[1]) for n in prepared.classes])
    bank = CaptionBank(colors, shapes, holdout, tokenizer)

    # The captions use a few dozen of the tokenizer's 49k tokens: updating the whole token
    # table every step would cost a quarter of the step, and random token vectors are
    # distinct enough for the transformer above them to learn from.
    model.token_embedding.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    steps_per_epoch = max(1, len(images) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            x = images[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            img_color, img_shape = color_of_class[labels[idx]], shape_of_class[labels[idx]]
            caption_ids = bank.draw(img_color, img_shape, generator)
            cap_color, cap_shape = bank.color[caption_ids], bank.shape[caption_ids]
            match = ((cap_color[None, :] == img_color[:, None]) | (cap_color[None, :] < 0)) & (
                (cap_shape[None, :] == img_shape[:, None]) | (cap_shape[None, :] < 0)
            )
            match = match.float()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, settings.warmup_steps, settings.lr)
            image_features, text_features, logit_scale = model(x, bank.tokens[caption_ids])
            logits = logit_scale * image_features @ text_features.T
            loss_i = torch.sum(-match / match.sum(1, keepdim=True) * F.log_softmax(logits, 1), 1).mean()
            loss_t = torch.sum(-match.T / match.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1), 1).mean()
            loss = 0.5 * (loss_i + loss_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
            step += 1
        if log_metric:
            log_metric("pretrain_loss", running / steps_per_epoch, epoch)
        log.info("pretrain epoch %d/%d loss %.4f", epoch + 1, settings.epochs, running / steps_per_epoch)
    model.eval()
    metrics = evaluate_zero_shot(
        Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, info={}), prepared, holdout
    )
    metrics["pretrain_seconds"] = round(time.perf_counter() - start, 2)
    return model, metrics


@torch.inference_mode()
def evaluate_zero_shot(backbone: Backbone, prepared: Prepared, holdout: set[str]) -> dict[str, float]:
    """Zero-shot accuracy on the test split among all classes, for seen and held-out pairs."""
    images, labels = load_images(prepared, "test", backbone.preprocess)
    features = torch.cat([backbone.model.encode_image(images[i : i + 512]) for i in range(0, len(images), 512)])
    class_features, _ = class_text_features(backbone, prepared.classes, prepared.templates)
    held = torch.tensor([prepared.classes[int(y)] in holdout for y in labels])
    return {
        "zeroshot_acc_pretrain_pairs": zero_shot_accuracy(features[~held], labels[~held], class_features),
        "zeroshot_acc_heldout_pairs": zero_shot_accuracy(features[held], labels[held], class_features),
        "zeroshot_acc_all": zero_shot_accuracy(features, labels, class_features),
        "chance": 1.0 / len(prepared.classes),
    }
