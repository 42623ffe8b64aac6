"""The pipeline's steps as plain functions of a validated config.

DVC stages (through the ``recall`` CLI) and Prefect flows call these and nothing else.
Each step reads and writes files under ``cfg.paths``, is tracked as one MLflow run, and
writes its outputs atomically.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from pipeline import backbone as backbone_lib
from pipeline import embed as embed_lib
from pipeline import registry, scaleout
from pipeline import tasks as tasks_lib
from pipeline.config import Config
from pipeline.data import load_prepared, prepare_dataset
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.split import load_split, make_split, write_split
from pipeline.tasks import TaskInputs
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


def _metrics_file(cfg: Config, name: str) -> Path:
    return Path(cfg.paths.metrics) / f"{name}.json"


def _set_threads() -> None:
    """All cores for torch, unless OMP_NUM_THREADS says otherwise (steps sharing a machine
    with other jobs: oversubscribed OpenMP threads spin and slow everyone down)."""
    import os

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else max(1, os.cpu_count() or 1))


def run_prepare(cfg: Config) -> dict[str, Any]:
    with Tracker(cfg).step("prepare", params={"dataset": cfg.dataset.model_dump(mode="json")}) as run:
        prepared = prepare_dataset(cfg)
        summary = {
            "dataset": prepared.dataset,
            "n_classes": len(prepared.classes),
            **{f"n_{split}": len(prepared.samples(split)) for split in prepared.splits},
        }
        run.log_metrics({k: v for k, v in summary.items() if k != "dataset"})
        run.set_tag("recall.dataset_fingerprint", prepared.fingerprint)
    return summary


def run_split(cfg: Config) -> dict[str, Any]:
    """The benchmark's task split; for the stream, the tasks its ledger holds so far (a
    record for people and the report: per-task stages read their own manifests)."""
    with Tracker(cfg).step("split", params={"seed": cfg.seed, "split": cfg.split.model_dump(mode="json")}) as run:
        if cfg.stream:
            inputs = _seen_inputs(cfg, cfg.split.n_tasks)
            split = {
                "seed": cfg.seed, "n_tasks": len(inputs), "mode": "stream",
                "class_order": [c for t in inputs for c in t.class_ids],
                "tasks": [t.class_ids for t in inputs],
                "task_class_names": [t.class_names for t in inputs],
            }
        else:
            prepared = load_prepared(cfg.paths.prepared)
            split = make_split(prepared.classes, cfg.split.n_tasks, cfg.seed, cfg.split.class_order)
        write_split(cfg.paths.split, split)
        run.log_metrics({"n_tasks": split["n_tasks"], "n_classes": len(split["class_order"])})
        run.set_tag("recall.class_order", ",".join(map(str, split["class_order"])))
    return split


def run_backbone(cfg: Config) -> dict[str, Any]:
    _set_threads()
    tracker = Tracker(cfg)
    with tracker.step("backbone", params={"backbone": cfg.backbone.model_dump(mode="json")}) as run:
        pretrain = None
        if cfg.backbone.source == "pretrain":
            from pipeline.demo_clip import pretrain_tiny_clip

            prepared = load_prepared(cfg.paths.prepared)
            if prepared.dataset != "shapes":
                raise backbone_lib.BackboneError(
                    f"backbone {cfg.backbone.name!r} is pretrained on the shapes demo world, "
                    f"not on {prepared.dataset!r}; pick an open_clip backbone (hub or local_file)"
                )

            def pretrain():
                return pretrain_tiny_clip(cfg.backbone, prepared, log_metric=run.log_metric)

        info = backbone_lib.materialise(cfg.backbone, cfg.paths.backbone, pretrain=pretrain)
        run.log_metrics(info["metrics"])
        run.set_tag("recall.backbone_sha256", info["sha256"])
        write_json(_metrics_file(cfg, "backbone"), {"sha256": info["sha256"], **info["metrics"]})
    return info


def run_embed(cfg: Config, split: str) -> dict[str, Any]:
    _set_threads()
    tracker = Tracker(cfg)
    with tracker.step(f"embed-{split}", params={"embed": cfg.embed.model_dump(mode="json")}) as run:
        device = embed_lib.resolve_device(cfg.embed.device)
        backbone = backbone_lib.load_backbone(cfg.paths.backbone, device=device)
        # Absolute: a cluster's workers read the images from where this process sees them.
        prepared = load_prepared(Path(cfg.paths.prepared).resolve())
        with scaleout.cluster_client(cfg.cluster) as client:
            index = embed_lib.embed_split(
                prepared,
                split,
                backbone,
                Path(cfg.paths.embeddings) / split,
                batch_size=cfg.embed.batch_size,
                num_workers=cfg.embed.num_workers,
                chunk_size=cfg.embed.chunk_size,
                on_bad_image=cfg.embed.on_bad_image,
                precision=cfg.embed.precision,
                client=client,
                backbone_dir=cfg.paths.backbone,
            )
        figures = {
            "n_samples": index["n_samples"],
            "n_skipped": len(index["skipped"]),
            "images_per_second": index["images_per_second"],
            "encode_images_per_second": index["encode_images_per_second"],
            "seconds": index["seconds"],
        }
        run.log_metrics(figures)
        run.set_tag("recall.backbone_sha256", backbone.sha256)
        run.set_tag("recall.device", str(device))
        if not index["reused"]:
            write_json(_metrics_file(cfg, f"embed-{split}"), figures)
        log.info("embedded %s: %d images, %.1f img/s end to end", split, index["n_samples"], index["images_per_second"])
    return index


def run_embed_text(cfg: Config) -> dict[str, Any]:
    with Tracker(cfg).step("embed-text") as run:
        backbone = backbone_lib.load_backbone(cfg.paths.backbone)
        prepared = load_prepared(cfg.paths.prepared)
        summary = embed_lib.write_text_features(prepared, backbone, Path(cfg.paths.embeddings) / embed_lib.TEXT_FILE)
        run.log_metrics(summary)
    return summary


# --------------------------------------------------------------------------- per task


def task_file(folder: str, task: int, suffix: str = ".safetensors") -> Path:
    return Path(folder) / f"task-{task:02d}{suffix}"


class TaskInputError(UserError):
    """Inputs of a per-task step that cannot be used; names the task and class."""


def _inputs(cfg: Config, task: int) -> TaskInputs:
    try:
        return tasks_lib.task_inputs(cfg, task)
    except tasks_lib.TaskDefinitionError as exc:
        raise TaskInputError(str(exc)) from None


def _seen_inputs(cfg: Config, task: int) -> list[TaskInputs]:
    return [_inputs(cfg, t) for t in range(1, task + 1)]


def _real_embeddings(folders: list[Path], sha256: str, classes: list[int]) -> dict[str, torch.Tensor]:
    data = tasks_lib.load_task_embeddings(folders, sha256, classes)
    finite = torch.isfinite(data["embeddings"]).all(dim=1)
    if not finite.all():
        bad = sorted(set(data["labels"][~finite].tolist()))
        raise TaskInputError(f"NaN or inf in the train embeddings of class(es) {bad} ({', '.join(map(str, folders))})")
    return data


def run_intake(cfg: Config, task: int) -> dict[str, Any]:
    """The stream's task ``task``: embed its batch's train and test images, streamed from
    the source its manifest names (nothing is copied into the project), and its classes'
    text features. Earlier batches are never read again."""
    from pipeline import stream
    from pipeline.io import write_tensors

    _set_threads()
    if not cfg.stream:
        raise TaskInputError("recall intake embeds a stream task's batch; this config is a benchmark (dataset.name != stream)")
    inputs = _inputs(cfg, task)
    manifest = stream.load_task_manifest(cfg.paths.tasks, task)
    tracker = Tracker(cfg)
    with tracker.step("intake", task=task, params={"embed": cfg.embed.model_dump(mode="json"), "batch": manifest["batch"]}) as run:
        device = embed_lib.resolve_device(cfg.embed.device)
        backbone = backbone_lib.load_backbone(cfg.paths.backbone, device=device)
        source = stream.open_source(manifest["source"], cfg.dataset.endpoint_url)
        figures: dict[str, float] = {}
        with scaleout.cluster_client(cfg.cluster) as client:
            for split_name, out in (("train", inputs.train), ("test", inputs.test)):
                index = stream.embed_task(
                    source, manifest, split_name, backbone, out, class_ids=inputs.class_ids,
                    batch_size=cfg.embed.batch_size, num_workers=cfg.embed.num_workers, chunk_size=cfg.embed.chunk_size,
                    on_bad_image=cfg.embed.on_bad_image, precision=cfg.embed.precision,
                    client=client, backbone_dir=cfg.paths.backbone,
                )
                figures[f"{split_name}_samples"] = index["n_samples"]
                figures[f"{split_name}_skipped"] = len(index["skipped"])
                figures[f"{split_name}_images_per_second"] = index["images_per_second"]
        class_features, per_template = embed_lib.class_text_features(backbone, inputs.class_names, list(cfg.dataset.templates))
        write_tensors(
            inputs.text,
            {"class_features": class_features, "template_features": per_template,
             "class_ids": torch.tensor(inputs.class_ids, dtype=torch.long)},
            metadata={"backbone_sha256": backbone.sha256, "task": str(task), "task_digest": manifest["digest"],
                      "class_names": json.dumps(inputs.class_names)},
        )
        run.log_metrics(figures, step=task)
        run.set_tag("recall.batch", manifest["batch"])
        run.set_tag("recall.backbone_sha256", backbone.sha256)
        write_json(_metrics_file(cfg, f"intake-{task:02d}"), {"batch": manifest["batch"], **figures})
        log.info("task %d (%s): %d train and %d test images embedded", task, manifest["batch"],
                 figures["train_samples"], figures["test_samples"])
    return figures


def run_fit_generators(cfg: Config, task: int) -> dict[str, Any]:
    """Fit the generators of task ``task``'s classes on their real train embeddings."""
    import time

    from pipeline import generators

    _set_threads()
    tracker = Tracker(cfg)
    with tracker.step("generators", task=task, params={"generator": cfg.generator.model_dump(mode="json")}) as run:
        inputs = _inputs(cfg, task)
        classes = inputs.class_ids
        sha256 = backbone_lib.read_info(cfg.paths.backbone)["sha256"]
        data = _real_embeddings([inputs.train], sha256, classes)
        run.record_inputs(train_embeddings=inputs.train)
        by_class = {c: data["embeddings"][data["labels"] == c] for c in classes}
        names = dict(zip(inputs.class_ids, inputs.class_names))
        for c, x in by_class.items():
            if len(x) < 2:
                raise TaskInputError(
                    f"task {task}: class {c} ({names[c]!r}) has {len(x)} training embedding(s); "
                    "a generator needs at least 2"
                )
        start = time.perf_counter()
        try:
            with scaleout.cluster_client(cfg.cluster) as client:
                bank = generators.fit_bank(by_class, cfg.generator, seed=cfg.seed, client=client)
        except generators.GeneratorError as exc:
            raise TaskInputError(f"task {task}: {exc}") from None
        seconds = time.perf_counter() - start
        out = task_file(cfg.paths.generators, task)
        generators.save_bank(out, bank, {"task": str(task), "backbone_sha256": sha256, "seconds": f"{seconds:.3f}"})
        figures = {"fit_seconds": seconds, "fit_loss_mean": sum(bank.fit_loss) / len(bank.fit_loss)}
        run.log_metrics(figures, step=task)
        # The bank is determined by its classes' train embeddings, given the lineage (which
        # holds the generator settings and seed).
        digest = registry.input_digest(tracker.lineage, f"{bank.kind}-bank", task, {
            "train_embeddings": registry.tensors_digest({str(c): x for c, x in by_class.items()}),
        })
        run.register_model(tracker.model_name(f"{bank.kind}-bank"), [out], tracker.version_tags(task),
                           input_digest=digest, lineage=tracker.lineage)
    return figures


def replay_index_file(cfg: Config, task: int) -> Path:
    return task_file(cfg.paths.replay, task, ".json")


def run_init_replay(cfg: Config) -> dict[str, Any]:
    """Task 0: the empty generator index every task's index grows from."""
    from pipeline.replay import write_empty_index

    with Tracker(cfg).step("replay-init"):
        write_empty_index(replay_index_file(cfg, 0))
    return {"generators": 0}


def run_replay(cfg: Config, task: int) -> dict[str, Any]:
    """Task ``task``'s generator index: task ``task - 1``'s plus this task's generator file and
    its hash. Nothing is sampled here: finetuning draws fresh samples from every file the
    index names, each epoch (pipeline/replay.py)."""
    from pipeline.replay import ReplayError, extend_index

    with Tracker(cfg).step("replay", task=task) as run:
        seen_inputs = _seen_inputs(cfg, task)
        bank_path = task_file(cfg.paths.generators, task)
        previous_path = replay_index_file(cfg, task - 1)
        run.record_inputs(previous_index=previous_path, **{f"generators_task_{task:02d}": bank_path})
        try:
            index = extend_index(previous_path, task, bank_path, seen_inputs[-1].class_ids, replay_index_file(cfg, task))
        except ReplayError as exc:
            raise TaskInputError(f"task {task}: {exc}") from None
        classes = sum(len(entry["class_ids"]) for entry in index["generators"])
        run.log_metrics({"replay_classes": classes}, step=task)
    return {"generators": len(index["generators"]), "classes": classes}


def _feature_dim(backbone) -> int:
    with torch.no_grad():
        return int(backbone.model.encode_text(backbone.tokenizer(["a"])).shape[-1])


def run_init_prompts(cfg: Config) -> dict[str, Any]:
    """Task 0: the untrained state every method starts from: no class yet (the prompts, the
    context generator's inputs and the head grow task by task), the generator's weights and
    the head's attention drawn from the seed."""
    from pipeline.prompts import PromptLearner, save_prompt_state

    with Tracker(cfg).step("prompts-init"):
        backbone = backbone_lib.load_backbone(cfg.paths.backbone)
        dim = _feature_dim(backbone)
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
            from pipeline.classifier import head_state
            from pipeline.head import ProbabilisticHead

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


def _load_head(cfg: Config, state: dict[str, torch.Tensor], info: dict, path: Path, dim: int, expected_tasks: int):
    from pipeline.classifier import load_head

    if "head_tasks" not in info:
        raise TaskInputError(
            f"{path}: this prompt state has no probabilistic head (it was written by method "
            f"{info.get('method', 'unknown')!r}); re-run from prompts-init with method {cfg.method.name!r}"
        )
    if int(info["head_tasks"]) != expected_tasks:
        raise TaskInputError(f"{path}: the head has {info['head_tasks']} task encoder(s), expected {expected_tasks}")
    settings = cfg.method.head
    return load_head(state, dim, expected_tasks, settings.std_floor, settings.attention_dropout, settings.encoder_bias)


def _training_set(cfg: Config, task: int, seen_inputs: list[TaskInputs], sha256: str):
    """What the method trains on at this task (a ``prompts.TrainingSet``, or None): real
    embeddings, or fresh draws from every seen class's generators (the task's index)."""
    from pipeline.prompts import TrainingSet, real_training_set
    from pipeline.replay import ReplayError, ReplaySampler

    train_on = cfg.method.train_on
    if train_on == "none":
        return None
    seed = cfg.seed * 1000 + task
    per_class = cfg.method.prompt.per_class_per_epoch
    if train_on in ("current_real", "all_real"):
        chosen = seen_inputs[-1:] if train_on == "current_real" else seen_inputs
        classes = [c for t in chosen for c in t.class_ids]
        data = _real_embeddings([t.train for t in chosen], sha256, classes)
        digest = registry.tensors_digest({"embeddings": data["embeddings"], "labels": data["labels"]})
        return real_training_set(data["embeddings"], data["labels"], classes, per_class, seed, digest)
    seen = [c for t in seen_inputs for c in t.class_ids]
    try:
        sampler = ReplaySampler.from_index(replay_index_file(cfg, task), seen, per_class, seed, task)
    except ReplayError as exc:
        raise TaskInputError(f"task {task}: {exc}") from None
    return TrainingSet(seen, sampler.draw, sampler.digest())


def _previous_state(cfg: Config, task: int, expected_seen: list[int]):
    from pipeline.prompts import PromptError, load_prompt_state

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

    from pipeline.head import text_statistics
    from pipeline.prompts import learner_from_state, save_prompt_state, train_prompts

    _set_threads()
    tracker = Tracker(cfg)
    with tracker.step("finetune", task=task, params={"method": cfg.method.model_dump(mode="json")}) as run:
        seen_inputs = _seen_inputs(cfg, task)
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
            from pipeline.classifier import head_state
            from pipeline.head import train_with_head

            # Every seen class's per-template features: the language regulariser of balanced
            # finetuning covers every seen task.
            all_templates = torch.cat([state["template_features"], templates]) if task > 1 else templates
            head = _load_head(cfg, state, previous, previous_path, learner.class_features.shape[1], task - 1)
            head.add_task(text_mean, text_variance, seed=cfg.seed * 1000 + task)
            if training is not None:
                losses = train_with_head(
                    learner, head, training, seen, class_task, task, all_templates,
                    cfg.method.prompt, cfg.method.head, logit_scale, seed=cfg.seed * 1000 + task, log_metric=run.log_metric,
                )
            extra = {"head_tasks": str(head.n_tasks)}
            tensors.update(head_state(head))
            tensors["template_features"] = all_templates
        elif cfg.method.name == "probe":
            from pipeline.classifier import train_probe

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
            digest = registry.input_digest(tracker.lineage, "prompts", task, {
                "previous_state": registry.safetensors_digest(previous_path),
                "training_set": training.digest,
                "text_features": registry.tensors_digest(text),
            })
            run.register_model(tracker.model_name("prompts"), [out], tracker.version_tags(task),
                               input_digest=digest, lineage=tracker.lineage)
    return figures


def load_classifier(cfg: Config, task: int, backbone):
    """The classifier after task ``task`` over its seen classes, from its saved prompt state
    (which holds every seen class's prompts, zero-shot features and task)."""
    from pipeline.classifier import Classifier
    from pipeline.head import inference_noise
    from pipeline.prompts import PromptError, learner_from_state, load_prompt_state

    path = task_file(cfg.paths.prompts, task)
    try:
        state, info = load_prompt_state(path)
    except PromptError as exc:
        raise TaskInputError(f"task {task}: {exc}") from None
    seen = [c for t in _seen_inputs(cfg, task) for c in t.class_ids]
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
        classifier.head = _load_head(cfg, state, info, path, features.shape[1], task)
        classifier.class_task = state["class_task"]
        classifier.noise = inference_noise(cfg.seed, seen, cfg.method.head.mc_test, features.shape[1])
    return classifier


def run_novelty(cfg: Config, task: int) -> dict[str, Any]:
    """Before task ``task`` trains: how the current champion sees the arriving classes. The
    champion scores the new classes' test images and the test images of the classes it
    knows; at the threshold that keeps 95% of the known ones, the share of new images it
    would flag as unknown, and the AUROC of known vs new (per score)."""
    from pipeline import novelty

    tracker = Tracker(cfg)
    with tracker.step("novelty", task=task) as run:
        seen_inputs = _seen_inputs(cfg, task)
        sha256 = backbone_lib.read_info(cfg.paths.backbone)["sha256"]
        result = novelty.check_arrival(tracker, task, seen_inputs, sha256)
        figures = {f"arrival_{k}": v for k, v in result.get("figures", {}).items()}
        if figures:
            run.log_metrics(figures, step=task)
        run.set_tag("recall.arrival_check", result["status"])
        write_json(task_file(_novelty_folder(cfg), task, ".json"), result)
        log.info("task %d arrival check: %s", task, result.get("summary", result["status"]))
    return result


def _novelty_folder(cfg: Config) -> str:
    return str(Path(cfg.paths.metrics) / "arrivals")


def run_evaluate(cfg: Config, task: int) -> dict[str, Any]:
    """Accuracy, calibration and novel-class detection on the real test embeddings after
    training task ``task``; then the task's classifier version and the gate's decision,
    written into the evaluation file with the figures."""
    from pipeline.evaluate import evaluate_task, plot_reliability
    from pipeline.io import read_json

    tracker = Tracker(cfg)
    with tracker.step("evaluate", task=task) as run:
        seen_inputs = _seen_inputs(cfg, task)
        inputs = seen_inputs[-1]
        seen = [c for t in seen_inputs for c in t.class_ids]
        backbone = backbone_lib.load_backbone(cfg.paths.backbone)
        classifier = load_classifier(cfg, task, backbone)
        # Benchmark: the later tasks' classes are known, and their test images measure
        # transfer and novel-class detection. The stream never knows what comes next.
        future = inputs.future_class_ids
        folders = [t.test for t in seen_inputs] + ([inputs.test] if future else [])
        test = tasks_lib.load_task_embeddings(folders, backbone.sha256, seen + future)
        run.record_inputs(test_embeddings=inputs.test, prompt_state=task_file(cfg.paths.prompts, task))
        sample_logits = classifier.sample_logits(test["embeddings"])
        all_logits = None
        if future:
            zero_shot = embed_lib.load_text_features(inputs.text, backbone.sha256)["class_features"]
            all_logits = classifier.all_class_logits(test["embeddings"], zero_shot, sample_logits)
        task_classes = [t.class_ids for t in seen_inputs]
        result = evaluate_task(task, task_classes + inputs.future_tasks, test["labels"], sample_logits, all_logits)
        arrival_path = task_file(_novelty_folder(cfg), task, ".json")
        if arrival_path.exists():
            result["arrival"] = read_json(arrival_path)
        result["seconds"] = {
            step: float(_seconds_of(path))
            for step, path in (
                ("generators", task_file(cfg.paths.generators, task)),
                ("finetune", task_file(cfg.paths.prompts, task)),
            )
            if path.exists()
        }
        run.log_metrics({"step_accuracy": result["step_accuracy"], "ece": result["calibration"]["ece"]}, step=task)
        run.log_metrics({f"accuracy_task_{int(k):02d}": v for k, v in result["accuracy_row"].items()}, step=task)
        if result["transfer"]:
            run.log_metric("transfer_mean", sum(result["transfer"].values()) / len(result["transfer"]), step=task)
        for score, figures in result.get("novelty", {}).items():
            run.log_metrics({f"novel_{figure}_{score}": value for figure, value in figures.items()}, step=task)
        per_task = {"step_accuracy": result["step_accuracy"], "ece": result["calibration"]["ece"]}
        per_task.update({f"accuracy_task_{int(k):02d}": v for k, v in result["accuracy_row"].items()})
        per_task.update({f"novel_auroc_{s}": f["auroc"] for s, f in result.get("novelty", {}).items()})
        per_task.update({f"arrival_{k}": v for k, v in result.get("arrival", {}).get("figures", {}).items()})
        run.log_pipeline_metrics(per_task, step=task)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            # One name in every task run: the UI compares the runs' diagrams side by side.
            diagram = Path(tmp) / "reliability.png"
            plot_reliability(result["calibration"]["bins"], result["calibration"]["ece"], diagram,
                             f"{cfg.method.name} after task {task}")
            run.log_artifact(diagram, "plots")
            if cfg.tracking.register_classifier:
                from pipeline import gate

                names = tasks_lib.class_names(seen_inputs)
                in_seen = torch.isin(test["labels"], torch.tensor(seen, dtype=test["labels"].dtype))
                # The seen classes' w_c, the rows the untrained prompt state starts from.
                w = torch.cat([tasks_lib.load_class_text(t.text, backbone.sha256, t.class_ids)["class_features"]
                               for t in seen_inputs])
                evidence = gate.Evidence(
                    task=task, class_ids=list(classifier.class_ids), names=names, tasks=task_classes,
                    logits=sample_logits.mean(dim=0)[in_seen], labels=test["labels"][in_seen],
                    accuracy_row={k: float(v) for k, v in result["accuracy_row"].items()},
                    test_digests=registry.task_test_digests(test, task_classes, names),
                    zero_shot_logits=gate.zero_shot_logits(test["embeddings"][in_seen], w, classifier.logit_scale),
                )
                result["registry"] = _register_classifier(cfg, tracker, run, task, classifier, backbone, result,
                                                          test, evidence, Path(tmp))
        # Written last, with the gate's decision: a step that fails before it leaves no file.
        write_json(task_file(cfg.paths.evaluations, task, ".json"), result)
    return result


def _register_classifier(cfg: Config, tracker: Tracker, run, task: int, classifier, backbone, result: dict,
                         test: dict[str, torch.Tensor], evidence, tmp: Path) -> dict:
    """A pyfunc model version of this task's classifier in its lineage's model, aliased
    ``task-<k>``; it takes the ``champion`` alias only if it passes the gate (pipeline.gate)
    against the current champion. A version registered from identical inputs is reused as
    it is: its earlier decision stands."""
    from pipeline import gate, serving

    name = tracker.model_name("classifier")
    lineage = tracker.lineage
    # The prompt state holds every seen class's zero-shot features: no other text input.
    digest = registry.input_digest(lineage, "classifier", task, {
        "prompt_state": registry.safetensors_digest(task_file(cfg.paths.prompts, task)),
        "test_embeddings": registry.tensors_digest(test),
    })
    registry.ensure_registered_model(tracker.client, name, lineage, description=(
        "Classifier after each task of one lineage (see the recall.lineage.* tags): learned prompts (and "
        "probabilistic head) over the classes seen so far. Alias task-<k> marks each task's version; champion "
        "the best one that passed the gate; recall.champion.move.<n> tags record every move of champion."
    ))
    existing = registry.find_version(tracker.client, name, digest)
    if existing is not None and "gate" in existing.tags:
        # Re-running an identical experiment (or retrying this step) must neither add a
        # version nor move an alias: the earlier decision stands.
        champion = registry.champion(tracker.client, name)
        champion_version = str(champion.version) if champion is not None else None
        earlier = [r for r in existing.tags.get("gate_reasons", "").split(" | ") if r]
        decision = {
            "model": name, "version": str(existing.version), "reused": True, "promoted": False,
            "champion": champion_version == str(existing.version), "decision": existing.tags["gate"],
            "champion_before": champion_version, "champion_after": champion_version,
            "reasons": [f"inputs identical to version {existing.version} ({registry.INPUT_DIGEST_TAG} "
                        f"{digest[:12]}): reused it; aliases left as they are; its gate decision: "
                        f"{existing.tags['gate']}", *earlier],
            "figures": json.loads(existing.tags.get("gate_figures", "{}")),
            "gate": cfg.tracking.gate.model_dump(),
        }
        run.set_tag(f"recall.registered.{name}", existing.version)
        run.set_tag(f"recall.reused.{name}", existing.version)
        run.set_tag("recall.gate", "reused")
        run.set_tag("recall.gate_reasons", decision["reasons"][0])
        _log_decision(run, decision, tmp)
        log.info("task %d classifier %s: %s", task, name, decision["reasons"][0])
        return decision

    if existing is not None:
        # An earlier attempt registered it but stopped before its gate decision.
        version = existing.version
    else:
        path = tmp / serving.CLASSIFIER_FILE
        backbone_ref = {
            "name": cfg.backbone.name, "arch": backbone.info["arch"], "sha256": backbone.sha256,
            "folder": str(Path(cfg.paths.backbone).resolve()),
            "source": cfg.backbone.source, "pretrained": cfg.backbone.pretrained,
        }
        serving.save_classifier(path, classifier, dict(evidence.names), backbone_ref, {"task": task, "method": cfg.method.name, "seed": cfg.seed})
        model_uri = serving.log_pyfunc(tracker.uri, run.run_id, path, classifier.class_features.shape[1])
        tags = {
            **tracker.version_tags(task),
            "step_accuracy": f"{result['step_accuracy']:.4f}",
            "ece": f"{result['calibration']['ece']:.4f}",
            **evidence.version_tags(),
            registry.INPUT_DIGEST_TAG: digest,
        }
        import mlflow

        from pipeline.tracking import using_tracking_uri

        # register_model links the version to the logged model (a tracking server requires it).
        with using_tracking_uri(tracker.uri):
            version = mlflow.register_model(model_uri, name, tags=tags).version
    tracker.client.set_registered_model_alias(name, f"task-{task}", version)
    decision = {**gate.decide(tracker.client, name, str(version), evidence, cfg.tracking.gate, run.run_id),
                "reused": existing is not None}
    passed = decision["promoted"]
    run.set_tag(f"recall.registered.{name}", version)
    run.set_tag("recall.gate", decision["decision"])
    run.set_tag("recall.gate_reasons", " | ".join(decision["reasons"])[:5000])
    run.log_metric("gate_passed", float(passed), step=task)
    _log_decision(run, decision, tmp)
    log.info("task %d classifier %s v%s: %s (%s)", task, name, version, "champion" if passed else "not promoted",
             "; ".join(decision["reasons"]))
    return decision


def _log_decision(run, decision: dict, tmp: Path) -> None:
    (tmp / "gate.json").write_text(json.dumps(decision, indent=2))
    run.log_artifact(tmp / "gate.json", "gate")


def _seconds_of(path: Path) -> float:
    from pipeline.io import read_tensor_metadata

    return float(read_tensor_metadata(path).get("seconds", "nan"))


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import csv

    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


def run_report(cfg: Config) -> dict[str, Any]:
    """Summary metrics, plots and a table of the whole run."""
    from pipeline.evaluate import plot_accuracy_matrix, plot_reliability, summarise
    from pipeline.io import atomic_path, read_json

    tracker = Tracker(cfg)
    with tracker.step("report") as run:
        evaluations = []
        for task in range(1, cfg.split.n_tasks + 1):
            path = task_file(cfg.paths.evaluations, task, ".json")
            if not path.exists():
                raise TaskInputError(f"task {task}: no evaluation at {path} (run the evaluate step)")
            evaluations.append(read_json(path))
        report = summarise(evaluations)
        report["method"] = cfg.method.name
        report["seed"] = cfg.seed
        report["seconds_per_task"] = {str(e["task"]): e.get("seconds", {}) for e in evaluations}
        headline = {k: report[k] for k in ("average_incremental_accuracy", "last_accuracy", "forgetting", "backward_transfer", "transfer", "ece_last", "ece_mean")}
        headline.update({f"novel_auroc_{score}": figures["auroc"] for score, figures in report["novelty"].items()})
        if report["arrivals"]:
            arrivals = list(report["arrivals"].values())
            headline["arrival_flagged_fraction_mean"] = sum(a["flagged_fraction"] for a in arrivals) / len(arrivals)
            headline["arrival_auroc_mean"] = sum(a["auroc"] for a in arrivals) / len(arrivals)
        # A quantity that does not exist (transfer in a stream) is null, not NaN (not JSON).
        headline = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in headline.items()}
        write_json(Path(cfg.paths.metrics) / "report.json", {**headline, "method": cfg.method.name, "seed": cfg.seed})
        write_json(Path(cfg.paths.metrics) / "report_details.json", report)
        plots = Path(cfg.paths.plots)
        plots.mkdir(parents=True, exist_ok=True)
        _write_csv(plots / "step_accuracy.csv", ["task", "accuracy"],
                   [[e["task"], f"{e['step_accuracy']:.4f}"] for e in evaluations])
        _write_csv(plots / "accuracy_matrix.csv", ["after_task", "on_task", "accuracy"],
                   [[t, k, f"{value:.4f}"] for t, row in enumerate(report["accuracy_matrix"], start=1)
                    for k, value in enumerate(row[:t], start=1)])
        with atomic_path(plots / "accuracy_matrix.png") as tmp:
            plot_accuracy_matrix(report["accuracy_matrix"], tmp, f"{cfg.method.name}, seed {cfg.seed}")
        _write_csv(plots / "calibration.csv", ["task", "ece"],
                   [[e["task"], f"{e['calibration']['ece']:.4f}"] for e in evaluations])
        _write_csv(plots / "novelty.csv", ["task", "score", "auroc", "aupr", "fpr_at_95_tpr"],
                   [[e["task"], score, *(f"{figures[k]:.4f}" for k in ("auroc", "aupr", "fpr_at_95_tpr"))]
                    for e in evaluations for score, figures in e.get("novelty", {}).items()])
        _write_csv(plots / "arrivals.csv", ["task", "flagged_fraction", "auroc"],
                   [[task, f"{f['flagged_fraction']:.4f}", f"{f['auroc']:.4f}"] for task, f in report["arrivals"].items()])
        last = evaluations[-1]["calibration"]
        with atomic_path(plots / "reliability.png") as tmp:
            plot_reliability(last["bins"], last["ece"], tmp, f"{cfg.method.name}, seed {cfg.seed}, all {evaluations[-1]['n_seen_classes']} classes")
        run.log_metrics(headline)
        for name in ("step_accuracy.csv", "accuracy_matrix.csv", "accuracy_matrix.png", "calibration.csv", "novelty.csv",
                     "arrivals.csv", "reliability.png"):
            run.log_artifact(plots / name, "plots")
    return report


def _figure(value: float | None, spec: str = ".1f", scale: float = 100.0, unit: str = "%") -> str:
    """A percentage (or points) for the report; ``n/a`` for a quantity that does not exist
    (transfer in a stream, forgetting after one task), never ``nan%``."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{scale * value:{spec}}{unit}"


def format_report(report: dict[str, Any]) -> str:
    steps = "  ".join(f"{100 * a:5.1f}" for a in report["step_accuracy"])
    lines = [
        f"method {report['method']}, seed {report['seed']}",
        f"  per-step accuracy (%): {steps}",
        f"  average incremental accuracy {_figure(report['average_incremental_accuracy'])}, "
        f"last {_figure(report['last_accuracy'])}, forgetting {_figure(report['forgetting'], unit=' pts')}, "
        f"backward transfer {_figure(report['backward_transfer'], '+.1f', unit=' pts')}, transfer {_figure(report['transfer'])}",
        f"  calibration error (ECE, 15 bins) after the last task {_figure(report['ece_last'])}, "
        f"mean over tasks {_figure(report['ece_mean'])}",
    ]
    if report["novelty"]:  # benchmark mode: the later tasks' classes are known
        lines.append(
            "  novel-class detection AUROC: "
            + ", ".join(f"{score.replace('_', ' ')} {100 * figures['auroc']:.1f}" for score, figures in report["novelty"].items())
            + ("" if "sample_variance" in report["novelty"] else " (no sample variance: deterministic method)")
        )
    for task, figures in report.get("arrivals", {}).items():
        lines.append(
            f"  task {task} on arrival: the champion flagged {100 * figures['flagged_fraction']:.0f}% of its test "
            f"images as unknown (AUROC {100 * figures['auroc']:.1f})"
        )
    return "\n".join(lines)


def summary(cfg: Config) -> str:
    """A short plain-text report of what the pipeline has produced so far."""
    lines = []
    backbone_metrics = _metrics_file(cfg, "backbone")
    if backbone_metrics.exists():
        import json

        m = json.loads(backbone_metrics.read_text())
        if "zeroshot_acc_pretrain_pairs" in m:
            lines.append(
                "demo backbone zero-shot accuracy: "
                f"pretraining pairs {m['zeroshot_acc_pretrain_pairs']:.1%}, "
                f"held-out pairs {m['zeroshot_acc_heldout_pairs']:.1%}, "
                f"chance {m['chance']:.1%}"
            )
        lines.append(f"backbone weights sha256 {m['sha256'][:16]}")
    if Path(cfg.paths.split).exists():
        split = load_split(cfg.paths.split)
        lines.append(f"tasks (seed {split['seed']}):")
        for t, names in enumerate(split["task_class_names"]):
            lines.append(f"  task {t + 1}: {', '.join(names)}")
    for split_name in ("train", "test"):
        folder = Path(cfg.paths.embeddings) / split_name
        try:
            index = embed_lib.read_index(folder)
        except embed_lib.EmbeddingMismatch:
            continue
        lines.append(
            f"embeddings {split_name}: {index['n_samples']} x {index['dim']} "
            f"({len(index['parts'])} file(s), {len(index['skipped'])} skipped, "
            f"{index['images_per_second']:.0f} img/s end to end)"
        )
    details = Path(cfg.paths.metrics) / "report_details.json"
    if details.exists():
        lines.append(format_report(json.loads(details.read_text())))
    return "\n".join(lines) or "nothing produced yet: run `dvc repro`"
