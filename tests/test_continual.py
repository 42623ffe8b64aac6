"""Per-task steps: generators, replay, prompts, evaluation, on the tiny world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.common import run_task

from pipeline.clip import backbone as backbone_lib
from pipeline.clip import embedding as embed_lib
from pipeline.data.split import load_split, seen_classes, task_classes
from pipeline.io import read_json, read_tensors, write_tensors
from pipeline.method.prompts import PromptLearner, load_prompt_state
from pipeline.stages._common import TaskInputError, replay_index_file, task_file
from pipeline.stages.evaluate import run_evaluate
from pipeline.stages.finetune import run_finetune
from pipeline.stages.generators import run_fit_generators
from pipeline.stages.prompts import run_init_prompts
from pipeline.stages.replay import run_init_replay, run_replay
from pipeline.stages.report import run_report
from pipeline.stages.split import run_split


def _run_tasks(cfg, upto: int) -> None:
    run_init_prompts(cfg)
    for task in range(1, upto + 1):
        run_task(cfg, task)


def test_a_whole_run_produces_consistent_outputs(world):
    _run_tasks(world, 3)
    report = run_report(world)
    split = load_split(world.paths.split)
    index = read_json(replay_index_file(world, 3))
    assert [e["task"] for e in index["generators"]] == [1, 2, 3]
    assert sorted(c for e in index["generators"] for c in e["class_ids"]) == sorted(seen_classes(split, 3))
    _, info = load_prompt_state(task_file(world.paths.prompts, 3))
    assert info["seen"] == seen_classes(split, 3) and info["trained"]
    assert len(report["accuracy_matrix"]) == 3 and len(report["step_accuracy"]) == 3
    assert 0 <= report["last_accuracy"] <= 1
    assert Path(world.paths.plots, "accuracy_matrix.png").stat().st_size > 1000
    assert read_json(Path(world.paths.metrics) / "report.json")["method"] == "clap"  # the default
    evaluation = read_json(task_file(world.paths.evaluations, 1, ".json"))
    assert set(evaluation["transfer"]) == {"2", "3"} and set(evaluation["accuracy_row"]) == {"1"}
    assert {"generators", "finetune"} <= set(evaluation["seconds"])
    # Each task registered one version of the generator bank and one of the prompts.
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.registry import model_name
    from pipeline.tracking.server import tracking_uri

    client = MlflowClient(tracking_uri(world))
    for name in (model_name(world, "vae-bank"), model_name(world, "prompts")):
        assert name.startswith("recall-shapes-tiny-clap-s0-")
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.tags["task"]) for v in versions) == [1, 2, 3], name
        assert all(v.tags["dataset"] == "shapes" and v.tags["backbone"] == "tiny" for v in versions)
        assert all("git_commit" in v.tags for v in versions)
    # Lineage: each per-task run names the content of what it read.
    import hashlib

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=500)
    finetune = next(r for r in runs if r.info.run_name == "task-03/finetune")
    index_md5 = hashlib.md5(replay_index_file(world, 3).read_bytes()).hexdigest()
    assert finetune.data.tags["recall.input_md5.generator_index"] == index_md5
    assert finetune.data.tags["recall.input_md5.previous_state"] == hashlib.md5(task_file(world.paths.prompts, 2).read_bytes()).hexdigest()
    evaluate = next(r for r in runs if r.info.run_name == "task-03/evaluate")
    assert evaluate.data.tags["recall.input_md5.test_embeddings"].endswith(".dir")


def test_replay_draws_fresh_samples_each_epoch_reproducibly(world):
    from pipeline.method.replay import ReplaySampler

    run_init_replay(world)
    for task in (1, 2):
        run_fit_generators(world, task)
        run_replay(world, task)
    split = load_split(world.paths.split)
    seen = seen_classes(split, 2)
    sampler = ReplaySampler.from_index(replay_index_file(world, 2), seen, per_class=5, seed=7, task=2)
    x0, y0 = sampler.draw(0)
    # Class-balanced over every seen class, old ones resampled from their own task's file.
    assert sorted(y0.tolist()) == sorted(c for c in seen for _ in range(5))
    again = ReplaySampler.from_index(replay_index_file(world, 2), seen, per_class=5, seed=7, task=2)
    assert torch.equal(again.draw(0)[0], x0)
    x1, _ = sampler.draw(1)
    assert not torch.allclose(x1.sort(dim=0).values, x0.sort(dim=0).values)
    other_task = ReplaySampler.from_index(replay_index_file(world, 2), seen, per_class=5, seed=7, task=3)
    assert not torch.allclose(other_task.draw(0)[0].sort(dim=0).values, x0.sort(dim=0).values)


def _with_method(name: str, *extra: str):
    from support.common import TINY

    from pipeline import config

    base = [o for o in TINY if name != "zeroshot" or not o.startswith("method.prompt.")]
    return config.load(None, base + [f"method={name}", *extra])


def test_zeroshot_method_uses_the_zero_shot_classifier(world):
    cfg = _with_method("zeroshot")
    _run_tasks(cfg, 1)
    result = read_json(task_file(cfg.paths.evaluations, 1, ".json"))
    backbone = backbone_lib.load_backbone(cfg.paths.backbone)
    text = embed_lib.load_text_features(Path(cfg.paths.embeddings) / "text.safetensors", backbone.sha256)
    test = embed_lib.load_embeddings(Path(cfg.paths.embeddings) / "test", backbone.sha256)
    classes = task_classes(load_split(cfg.paths.split), 1)
    mask = torch.isin(test["labels"], torch.tensor(classes))
    logits = torch.nn.functional.normalize(test["embeddings"][mask], dim=-1) @ text["class_features"][classes].T
    expected = (torch.tensor(classes)[logits.argmax(1)] == test["labels"][mask]).float().mean().item()
    assert result["accuracy_row"]["1"] == pytest.approx(expected)


def test_prompt_cut_is_exact(world):
    backbone = backbone_lib.load_backbone(world.paths.backbone)
    text = embed_lib.load_text_features(Path(world.paths.embeddings) / "text.safetensors", backbone.sha256)
    names = ["red circle", "a much longer class name than the others", "blue"]
    learner = PromptLearner(backbone.model, backbone.tokenizer, names, text["class_features"][:3], n_ctx=2)
    learner.reset(0)
    learner.eval()
    ids = torch.arange(3)
    with torch.no_grad():
        cut, full = learner.features(ids, cut=True), learner.features(ids, cut=False)
    assert int(learner.eot.max()) + 1 < learner.tokens.shape[1]
    assert (cut - full).abs().max().item() < 1e-5


def test_prompts_grow_class_by_class_as_if_known_from_the_start(world):
    """The class universe grows task by task: a learner that meets classes in two steps
    holds the same context and gives the same features as one that had them all at once."""
    from pipeline.method.prompts import PromptError

    backbone = backbone_lib.load_backbone(world.paths.backbone)
    text = embed_lib.load_text_features(Path(world.paths.embeddings) / "text.safetensors", backbone.sha256)
    names, ids = ["red circle", "green square", "blue star", "red cross"], [7, 2, 5, 0]
    features = text["class_features"][:4]
    at_once = PromptLearner(backbone.model, backbone.tokenizer, names, features, n_ctx=1, class_ids=ids)
    at_once.reset(3)
    grown = PromptLearner(backbone.model, backbone.tokenizer, n_ctx=1, feature_dim=features.shape[1])
    grown.reset(3)
    grown.add_classes(ids[:2], names[:2], features[:2], seed=3)
    grown.add_classes(ids[2:], names[2:], features[2:], seed=3)
    assert torch.equal(grown.ctx, at_once.ctx) and grown.class_ids == ids
    with torch.no_grad():
        assert torch.allclose(grown.features(torch.tensor([5, 7])), at_once.features(torch.tensor([5, 7])))
    with pytest.raises(PromptError, match=r"class id\(s\) \[2\] already have prompts"):
        grown.add_classes([2], ["green square"], features[:1], seed=3)
    with pytest.raises(PromptError, match=r"no prompts for class id\(s\) \[9\]"):
        grown.features(torch.tensor([9, 7]))


def test_prompts_of_the_zero_context_match_plain_text_encoding(world):
    """With the learned and generated slots holding the placeholder's own token vector,
    the prompt path reproduces CLIP's encode_text of the same tokens."""
    backbone = backbone_lib.load_backbone(world.paths.backbone)
    text = embed_lib.load_text_features(Path(world.paths.embeddings) / "text.safetensors", backbone.sha256)
    learner = PromptLearner(backbone.model, backbone.tokenizer, ["red circle"], text["class_features"][:1], n_ctx=1)
    placeholder = backbone.model.token_embedding(learner.tokens[:, 1])
    from pipeline.method.prompts import encode_token_embeddings

    embeddings = backbone.model.token_embedding(learner.tokens)
    with torch.no_grad():
        ours = encode_token_embeddings(backbone.model, embeddings, learner.eot)
        reference = backbone.model.encode_text(learner.tokens)
    assert placeholder.shape[-1] == embeddings.shape[-1]
    assert torch.allclose(ours, reference, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def _rewrite_train_embeddings(cfg, edit) -> None:
    folder = Path(cfg.paths.embeddings) / "train"
    index = read_json(folder / "index.json")
    for part in index["parts"]:
        path = folder / part["file"]
        meta = embed_lib.read_tensor_metadata(path)
        write_tensors(path, edit(read_tensors(path)), metadata=meta)


def test_a_class_with_one_training_embedding_is_named_with_its_task(world):
    split = load_split(world.paths.split)
    victim = task_classes(split, 2)[1]
    seen_once = {"kept": False}

    def keep_one(t):
        rows = t["labels"] == victim
        keep = ~rows
        if rows.any() and not seen_once["kept"]:
            keep[torch.nonzero(rows)[0]] = True
            seen_once["kept"] = True
        return {k: v[keep] for k, v in t.items()}

    _rewrite_train_embeddings(world, keep_one)
    run_fit_generators(world, 1)
    before = task_file(world.paths.generators, 1).read_bytes()
    with pytest.raises(TaskInputError, match=rf"task 2: class {victim} .* has 1 training embedding"):
        run_fit_generators(world, 2)
    assert not task_file(world.paths.generators, 2).exists()
    assert task_file(world.paths.generators, 1).read_bytes() == before


def test_nan_in_an_embedding_file_is_named(world):
    split = load_split(world.paths.split)
    victim = task_classes(split, 1)[0]

    def poison(t):
        rows = torch.nonzero(t["labels"] == victim).flatten()
        if len(rows):
            t["embeddings"][rows[0], 3] = float("nan")
        return t

    _rewrite_train_embeddings(world, poison)
    with pytest.raises(TaskInputError, match=rf"NaN or inf in the train embeddings of class\(es\) \[{victim}\]"):
        run_fit_generators(world, 1)


def test_the_generator_index_grows_by_the_new_task_only_and_stores_no_samples(world):
    run_init_replay(world)
    for task in (1, 2):
        run_fit_generators(world, task)
        run_replay(world, task)
    first = read_json(replay_index_file(world, 1))
    second = read_json(replay_index_file(world, 2))
    # Task 2's index is task 1's entries, untouched, plus task 2's generator file.
    assert second["generators"][:1] == first["generators"]
    assert second["generators"][1]["path"] == task_file(world.paths.generators, 2).as_posix()
    assert sorted(second["generators"][1]["class_ids"]) == sorted(task_classes(load_split(world.paths.split), 2))
    # Storage per task is a few hundred bytes, whatever the number of classes seen.
    assert replay_index_file(world, 2).stat().st_size < 2000


def test_a_generator_changed_after_indexing_is_named(world):
    run_init_prompts(world)
    run_init_replay(world)
    run_fit_generators(world, 1)
    run_replay(world, 1)
    bank = task_file(world.paths.generators, 1)
    data = read_tensors(bank)
    from pipeline.io import read_tensor_metadata

    write_tensors(bank, {k: v + 1 for k, v in data.items()}, metadata=read_tensor_metadata(bank))
    with pytest.raises(TaskInputError, match=r"task 1: .*task-01\.json: task 1's generators .*task-01\.safetensors changed"):
        run_finetune(world, 1)
    assert not task_file(world.paths.prompts, 1).exists()
    bank.unlink()
    with pytest.raises(TaskInputError, match=r"task-01\.safetensors are missing"):
        run_finetune(world, 1)


def test_a_task_outside_the_split_is_named(world):
    with pytest.raises(TaskInputError, match=r"task 4 is not in split.tasks \(tasks 1\.\.3\)"):
        run_fit_generators(world, 4)


def test_finetune_needs_the_previous_task(world):
    run_init_prompts(world)
    run_init_replay(world)
    for task in (1, 2):
        run_fit_generators(world, task)
        run_replay(world, task)
    with pytest.raises(Exception, match=r"task-01\.safetensors"):
        run_finetune(world, 2)


def _clap(world):
    return _with_method("clap", "method.head.mc_train=3", "method.head.mc_test=4")


def test_clap_run_reports_calibration_and_novel_class_detection(world):
    cfg = _clap(world)
    _run_tasks(cfg, 3)
    report = run_report(cfg)
    first = read_json(task_file(cfg.paths.evaluations, 1, ".json"))
    assert first["mc_samples"] == 4
    assert set(first["novelty"]) == {"max_probability", "energy", "sample_variance"}
    assert all(0 <= first["novelty"][s]["auroc"] <= 1 for s in first["novelty"])
    assert "novelty" not in read_json(task_file(cfg.paths.evaluations, 3, ".json"))
    assert 0 <= report["ece_last"] <= 1
    headline = read_json(Path(cfg.paths.metrics) / "report.json")
    assert headline["method"] == "clap" and "novel_auroc_sample_variance" in headline
    assert Path(cfg.paths.plots, "reliability.png").stat().st_size > 1000
    # One distribution encoder per task, saved with the prompts.
    _, info = load_prompt_state(task_file(cfg.paths.prompts, 3))
    assert info["head_tasks"] == "3"
    # Evaluating again gives the same Monte-Carlo figures.
    run_evaluate(cfg, 1)
    assert read_json(task_file(cfg.paths.evaluations, 1, ".json"))["calibration"] == first["calibration"]


def test_clap_finetune_reads_only_the_generators_and_the_previous_state(world):
    import shutil

    cfg = _clap(world)
    run_init_replay(cfg)
    for task in (1, 2):
        run_fit_generators(cfg, task)
        run_replay(cfg, task)
    # What a GPU worker would receive: the generators the index names, frozen backbone and
    # text features; never the real train embeddings.
    shutil.rmtree(Path(cfg.paths.embeddings) / "train")
    run_init_prompts(cfg)
    run_finetune(cfg, 1)
    run_finetune(cfg, 2)
    first = read_tensors(task_file(cfg.paths.prompts, 2))
    run_finetune(cfg, 2)
    again = read_tensors(task_file(cfg.paths.prompts, 2))
    assert first.keys() == again.keys() and any(k.startswith("head.encoders.1.") for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_prompt_state_without_a_head_is_named(world):
    _run_tasks(_with_method("cgil"), 1)  # no head in the saved state
    cfg = _clap(world)
    with pytest.raises(TaskInputError, match=r"task-01\.safetensors.*no probabilistic head.*'cgil'"):
        run_evaluate(cfg, 1)


def test_a_benchmark_with_one_class_per_task_runs(world):
    from support.common import TINY

    from pipeline import config

    cfg = config.load(None, TINY + ["split.n_tasks=9", "method.head.mc_train=2", "method.head.mc_test=2"])
    run_split(cfg)
    _run_tasks(cfg, 2)
    split = load_split(cfg.paths.split)
    _, info = load_prompt_state(task_file(cfg.paths.prompts, 2))
    assert info["seen"] == seen_classes(split, 2) and len(info["seen"]) == 2 and info["head_tasks"] == "2"
    first = read_json(task_file(cfg.paths.evaluations, 1, ".json"))
    assert first["accuracy_row"] == {"1": 1.0} and set(first["transfer"]) == {str(k) for k in range(2, 10)}


def test_a_class_features_do_not_depend_on_the_other_seen_classes(world):
    """Before any training, a class's tokens (and features) are the same whatever else is
    seen: an arriving class shifts no old class."""
    backbone = backbone_lib.load_backbone(world.paths.backbone)
    text = embed_lib.load_text_features(Path(world.paths.embeddings) / "text.safetensors", backbone.sha256)
    names = ["red circle", "green square", "blue star"]
    learner = PromptLearner(backbone.model, backbone.tokenizer, n_ctx=1, feature_dim=text["class_features"].shape[1])
    learner.reset(0)
    learner.add_classes([0], names[:1], text["class_features"][:1], seed=0)
    learner.eval()
    with torch.no_grad():
        alone = learner.features(torch.tensor([0]))
        learner.add_classes([1, 2], names[1:], text["class_features"][1:3], seed=0)
        together = learner.features(torch.tensor([0, 1, 2]))
    assert torch.allclose(alone[0], together[0], atol=1e-6)
