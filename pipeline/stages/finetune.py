"""Stage `finetune@NN`: grow task NN-1's prompt state by task NN's classes and train it on
fresh replay.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.clip import backbone as backbone_lib
from pipeline.config import Config
from pipeline.stages import task_inputs as tasks_lib
from pipeline.stages._common import (
    TaskInputError,
    real_embeddings,
    replay_index_file,
    seen_task_inputs,
    set_torch_threads,
    task_file,
)
from pipeline.stages.saved_classifier import load_head_from_state
from pipeline.stages.task_inputs import TaskInputs
from pipeline.tracking.lineage import input_digest, safetensors_digest, tensors_digest
from pipeline.tracking.runs import Tracker


def _training_set(cfg: Config, task: int, seen_inputs: list[TaskInputs], sha256: str):
    """What the method trains on at this task (a ``prompts.TrainingSet``, or None): real
    embeddings, or fresh draws from every seen class's generators (the task's index)."""
    from pipeline.method.head import task_seed
    from pipeline.method.prompts import TrainingSet, real_training_set
    from pipeline.method.replay import ReplayError, ReplaySampler

    train_on = cfg.method.train_on
    if train_on == "none":
        return None
    seed = task_seed(cfg.seed, task)
    per_class = cfg.method.prompt.per_class_per_epoch
    if train_on in ("current_real", "all_real"):
        chosen = seen_inputs[-1:] if train_on == "current_real" else seen_inputs
        classes = [c for t in chosen for c in t.class_ids]
        data = real_embeddings([t.train for t in chosen], sha256, classes)
        digest = tensors_digest({"embeddings": data["embeddings"], "labels": data["labels"]})
        return real_training_set(data["embeddings"], data["labels"], classes, per_class, seed, digest)
    seen = [c for t in seen_inputs for c in t.class_ids]
    try:
        sampler = ReplaySampler.from_index(replay_index_file(cfg, task), seen, per_class, seed, task)
    except ReplayError as exc:
        raise TaskInputError(f"task {task}: {exc}") from None
    return TrainingSet(seen, sampler.draw, sampler.digest())


def _previous_state(cfg: Config, task: int, expected_seen: list[int]):
    from pipeline.method.prompts import PromptError, load_prompt_state

    path = task_file(cfg.paths.prompts, task - 1)
    try:
        state, info = load_prompt_state(path)
    except PromptError as exc:
        raise TaskInputError(f"task {task}: {exc}") from None
    if info["seen"] != expected_seen:
        raise TaskInputError(
            f"task {task}: the previous prompt state ({path}) covers classes {info['seen']}, not those of "
            f"tasks 1..{task - 1} {expected_seen}; re-run the earlier tasks"
        )
    return state, info, path


def run_finetune(cfg: Config, task: int) -> dict[str, Any]:
    """Grow the previous task's state by this task's classes (their prompts, text statistics,
    a head encoder) and train it on what the method trains on."""
    import time

    from pipeline.method.head import text_statistics
    from pipeline.method.prompts import learner_from_state, save_prompt_state, train_prompts

    set_torch_threads()
    tracker = Tracker(cfg)
    with tracker.step("finetune", task=task, params={"method": cfg.method.model_dump(mode="json")}) as run:
        seen_inputs = seen_task_inputs(cfg, task)
        inputs = seen_inputs[-1]
        backbone = backbone_lib.load_backbone(cfg.paths.backbone)
        state, previous, previous_path = _previous_state(cfg, task, [c for t in seen_inputs[:-1] for c in t.class_ids])
        learner = learner_from_state(backbone.model, backbone.tokenizer, state, previous)
        text = tasks_lib.load_class_text(inputs.text, backbone.sha256, inputs.class_ids)
        learner.add_classes(inputs.class_ids, inputs.class_names, text["class_features"], seed=cfg.seed)
        seen = learner.class_ids
        templates = text["template_features"].float()
        mean, variance = text_statistics(templates)
        text_mean = torch.cat([state["text_mean"], mean])
        text_variance = torch.cat([state["text_variance"], variance])
        class_task = torch.cat([state["class_task"], torch.full((len(inputs.class_ids),), task, dtype=torch.long)])
        start = time.perf_counter()
        training = _training_set(cfg, task, seen_inputs, backbone.sha256)
        run.record_inputs(previous_state=previous_path, text_features=inputs.text)
        if cfg.method.train_on == "replay":
            run.record_inputs(generator_index=replay_index_file(cfg, task))
        elif cfg.method.train_on != "none":
            run.record_inputs(train_embeddings=inputs.train)
        logit_scale = backbone.model.logit_scale.exp().item()
        losses: list[float] = []
        extra, tensors = {}, {"text_mean": text_mean, "text_variance": text_variance, "class_task": class_task}
        if cfg.method.head is not None:
            from pipeline.method.classifier import head_state
            from pipeline.method.head import task_seed, train_with_head

            # Every seen class's per-template features: the language regulariser of balanced
            # finetuning covers every seen task.
            all_templates = torch.cat([state["template_features"], templates]) if task > 1 else templates
            head = load_head_from_state(cfg, state, previous, previous_path, learner.class_features.shape[1], task - 1)
            head.add_task(text_mean, text_variance, seed=task_seed(cfg.seed, task))
            if training is not None:
                losses = train_with_head(
                    learner, head, training, seen, class_task, task, all_templates,
                    cfg.method.prompt, cfg.method.head, logit_scale, seed=task_seed(cfg.seed, task), log_metric=run.log_metric,
                )
            extra = {"head_tasks": str(head.n_tasks)}
            tensors.update(head_state(head))
            tensors["template_features"] = all_templates
        elif cfg.method.name == "probe":
            from pipeline.method.classifier import train_probe

            vectors = torch.cat([state["probe_vectors"], learner.class_features[len(state["probe_vectors"]):]])
            vectors, losses = train_probe(vectors, training, seen, cfg.method.prompt, logit_scale, log_metric=run.log_metric)
            tensors["probe_vectors"] = vectors
        elif training is not None:
            losses = train_prompts(learner, training, seen, cfg.method.prompt, logit_scale, log_metric=run.log_metric)
        seconds = time.perf_counter() - start
        out = task_file(cfg.paths.prompts, task)
        save_prompt_state(out, learner, seen=seen, trained=training is not None or previous["trained"],
                          extra={"task": str(task), "seconds": f"{seconds:.3f}", "method": cfg.method.name, **extra},
                          extra_tensors=tensors)
        figures = {"finetune_seconds": seconds, **({"final_loss": losses[-1]} if losses else {})}
        run.log_metrics(figures, step=task)
        if training is not None:
            # The new state is determined by the previous one, what it trained on and the
            # text features, given the lineage (method settings, seed).
            digest = input_digest(tracker.lineage, "prompts", task, {
                "previous_state": safetensors_digest(previous_path),
                "training_set": training.digest,
                "text_features": tensors_digest(text),
            })
            run.register_model(tracker.model_name("prompts"), [out], tracker.version_tags(task),
                               input_digest=digest, lineage=tracker.lineage)
    return figures
