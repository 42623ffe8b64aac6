"""Stage `prompts-init`: the untrained prompt state (task 00).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.clip import backbone as backbone_lib
from pipeline.config import Config
from pipeline.stages._common import feature_dim, task_file
from pipeline.tracking.runs import Tracker


def run_init_prompts(cfg: Config) -> dict[str, Any]:
    """Task 0: the untrained state every method starts from: no class yet (the prompts, the
    context generator's inputs and the head grow task by task), the generator's weights and
    the head's attention drawn from the seed."""
    from pipeline.method.prompts import PromptLearner, save_prompt_state

    with Tracker(cfg).step("prompts-init"):
        backbone = backbone_lib.load_backbone(cfg.paths.backbone)
        dim = feature_dim(backbone)
        n_ctx = cfg.method.prompt.n_ctx if cfg.method.prompt else 1
        learner = PromptLearner(backbone.model, backbone.tokenizer, n_ctx=n_ctx, feature_dim=dim)
        learner.reset(cfg.seed)
        extra, tensors = {}, {
            "text_mean": torch.zeros(0, dim), "text_variance": torch.zeros(0, dim),
            "class_task": torch.zeros(0, dtype=torch.long),
        }
        if cfg.method.name == "probe":
            tensors["probe_vectors"] = torch.zeros(0, dim)
        if cfg.method.head is not None:
            from pipeline.method.classifier import head_state
            from pipeline.method.head import ProbabilisticHead

            torch.manual_seed(cfg.seed)
            settings = cfg.method.head
            head = ProbabilisticHead(
                dim, std_floor=settings.std_floor, ff_width=settings.attention_ff_width,
                dropout=settings.attention_dropout, zero_init_attention=settings.zero_init_attention,
                encoder_bias=settings.encoder_bias,
            )
            extra = {"head_tasks": "0"}
            tensors.update(head_state(head))
            tensors["template_features"] = torch.zeros(0, len(cfg.dataset.templates), dim)
        save_prompt_state(task_file(cfg.paths.prompts, 0), learner, seen=[], trained=False, extra=extra, extra_tensors=tensors)
    return {"classes": 0}
