"""The classifier after a task, rebuilt from its saved prompt state (what finetuning wrote):
used by the arrival check, evaluation and finetuning's own checks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.stages._common import TaskInputError, seen_task_inputs, task_file


def load_head_from_state(cfg: Config, state: dict[str, torch.Tensor], info: dict, path: Path, dim: int, expected_tasks: int):
    """The head of a prompt state, its priors rebuilt (finetuning trains against them)."""
    from pipeline.method.classifier import load_head
    from pipeline.method.head import task_seed

    if "head_tasks" not in info:
        raise TaskInputError(
            f"{path}: this prompt state has no probabilistic head (it was written by method "
            f"{info.get('method', 'unknown')!r}); re-run from prompts-init with method {cfg.method.name!r}"
        )
    if int(info["head_tasks"]) != expected_tasks:
        raise TaskInputError(f"{path}: the head has {info['head_tasks']} task encoder(s), expected {expected_tasks}")
    settings = cfg.method.head
    return load_head(state, dim, expected_tasks, settings.std_floor, settings.attention_dropout, settings.encoder_bias,
                     seed_of_task=lambda task: task_seed(cfg.seed, task))


def load_classifier(cfg: Config, task: int, backbone):
    """The classifier after task ``task`` over its seen classes, from its saved prompt state
    (which holds every seen class's prompts, zero-shot features and task)."""
    from pipeline.method.classifier import Classifier
    from pipeline.method.head import inference_noise
    from pipeline.method.prompts import PromptError, learner_from_state, load_prompt_state

    path = task_file(cfg.paths.prompts, task)
    try:
        state, info = load_prompt_state(path)
    except PromptError as exc:
        raise TaskInputError(f"task {task}: {exc}") from None
    seen = [c for t in seen_task_inputs(cfg, task) for c in t.class_ids]
    if info["seen"] != seen:
        raise TaskInputError(f"task {task}: the prompt state {path} covers classes {info['seen']}, not the seen classes {seen}")
    features = state["class_features"].float()
    if "probe_vectors" in state:
        features = torch.nn.functional.normalize(state["probe_vectors"].float(), dim=-1)
    elif info["trained"]:
        learner = learner_from_state(backbone.model, backbone.tokenizer, state, info)
        learner.eval()
        with torch.no_grad():
            features = learner.features(torch.tensor(seen))
    classifier = Classifier(seen, features, backbone.model.logit_scale.exp().item())
    if cfg.method.head is not None:
        classifier.head = load_head_from_state(cfg, state, info, path, features.shape[1], task)
        classifier.class_task = state["class_task"]
        classifier.noise = inference_noise(cfg.seed, seen, cfg.method.head.mc_test, features.shape[1])
    return classifier
