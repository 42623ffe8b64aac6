"""Stage `evaluate@NN`: figures on the real test embeddings, then the task's classifier
version and the gate's decision.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.clip import backbone as backbone_lib
from pipeline.clip import embedding as embed_lib
from pipeline.config import Config
from pipeline.io import write_json
from pipeline.stages import task_inputs as tasks_lib
from pipeline.stages._common import arrivals_folder, seconds_of, seen_task_inputs, task_file
from pipeline.stages.saved_classifier import load_classifier
from pipeline.tracking import registry
from pipeline.tracking.lineage import INPUT_DIGEST_TAG, input_digest, safetensors_digest, task_test_digests, tensors_digest
from pipeline.tracking.registry import ensure_registered_model, find_version
from pipeline.tracking.runs import Tracker

log = logging.getLogger(__name__)


def run_evaluate(cfg: Config, task: int) -> dict[str, Any]:
    """Accuracy, calibration and novel-class detection on the real test embeddings after
    training task ``task``; then the task's classifier version and the gate's decision,
    written into the evaluation file with the figures."""
    from pipeline.io import read_json
    from pipeline.method.metrics import evaluate_task, plot_reliability

    tracker = Tracker(cfg)
    with tracker.step("evaluate", task=task) as run:
        seen_inputs = seen_task_inputs(cfg, task)
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
        arrival_path = task_file(arrivals_folder(cfg), task, ".json")
        if arrival_path.exists():
            result["arrival"] = read_json(arrival_path)
        result["seconds"] = {
            step: float(seconds_of(path))
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
                from pipeline.tracking import gate

                names = tasks_lib.class_names(seen_inputs)
                in_seen = torch.isin(test["labels"], torch.tensor(seen, dtype=test["labels"].dtype))
                # The seen classes' w_c, the rows the untrained prompt state starts from.
                w = torch.cat([tasks_lib.load_class_text(t.text, backbone.sha256, t.class_ids)["class_features"]
                               for t in seen_inputs])
                evidence = gate.Evidence(
                    task=task, class_ids=list(classifier.class_ids), names=names, tasks=task_classes,
                    logits=sample_logits.mean(dim=0)[in_seen], labels=test["labels"][in_seen],
                    accuracy_row={k: float(v) for k, v in result["accuracy_row"].items()},
                    test_digests=task_test_digests(test, task_classes, names),
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
    from pipeline.serving import model as serving
    from pipeline.serving.log import log_pyfunc
    from pipeline.tracking import gate

    name = tracker.model_name("classifier")
    lineage = tracker.lineage
    # The prompt state holds every seen class's zero-shot features: no other text input.
    digest = input_digest(lineage, "classifier", task, {
        "prompt_state": safetensors_digest(task_file(cfg.paths.prompts, task)),
        "test_embeddings": tensors_digest(test),
    })
    ensure_registered_model(tracker.client, name, lineage, description=(
        "Classifier after each task of one lineage (see the recall.lineage.* tags): learned prompts (and "
        "probabilistic head) over the classes seen so far. Alias task-<k> marks each task's version; champion "
        "the best one that passed the gate; recall.champion.move.<n> tags record every move of champion."
    ))
    existing = find_version(tracker.client, name, digest)
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
            "reasons": [f"inputs identical to version {existing.version} ({INPUT_DIGEST_TAG} "
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
        model_uri = log_pyfunc(tracker.uri, run.run_id, path, classifier.class_features.shape[1])
        tags = {
            **tracker.version_tags(task),
            "step_accuracy": f"{result['step_accuracy']:.4f}",
            "ece": f"{result['calibration']['ece']:.4f}",
            **evidence.version_tags(),
            INPUT_DIGEST_TAG: digest,
        }
        import mlflow

        from pipeline.tracking.server import using_tracking_uri

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
