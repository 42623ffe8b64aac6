"""Stage `novelty@NN`. The arrival check: before a new task trains, the current champion scores its classes.

In production this is the novel-class metric that matters: of the images of classes that
just arrived, how many would the model in service have flagged as unknown, at the threshold
that keeps 95% of the images of the classes it knows? And how well does each of its scores
separate known from new (AUROC)?
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.clip import backbone as backbone_lib
from pipeline.config import Config
from pipeline.io import write_json
from pipeline.stages._common import arrivals_folder, seen_task_inputs, task_file
from pipeline.stages.task_inputs import TaskInputs, load_task_embeddings
from pipeline.tracking import registry
from pipeline.tracking.runs import Tracker

log = logging.getLogger(__name__)


def run_novelty(cfg: Config, task: int) -> dict[str, Any]:
    """Before task ``task`` trains: how the current champion sees the arriving classes. The
    champion scores the new classes' test images and the test images of the classes it
    knows; at the threshold that keeps 95% of the known ones, the share of new images it
    would flag as unknown, and the AUROC of known vs new (per score)."""
    tracker = Tracker(cfg)
    with tracker.step("novelty", task=task) as run:
        seen_inputs = seen_task_inputs(cfg, task)
        sha256 = backbone_lib.read_info(cfg.paths.backbone)["sha256"]
        result = check_arrival(tracker, task, seen_inputs, sha256)
        figures = {f"arrival_{k}": v for k, v in result.get("figures", {}).items()}
        if figures:
            run.log_metrics(figures, step=task)
        run.set_tag("recall.arrival_check", result["status"])
        write_json(task_file(arrivals_folder(cfg), task, ".json"), result)
        log.info("task %d arrival check: %s", task, result.get("summary", result["status"]))
    return result


# The score the headline figures use (the others are recorded too).
HEADLINE_SCORE = "max_probability"


def _download_classifier(tracker, name: str, version: str, folder: Path) -> Path:
    import mlflow

    from pipeline.serving.model import CLASSIFIER_FILE

    # One small file is wanted: no progress bar over the model's whole folder in the logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(folder), tracking_uri=tracker.uri
    ))
    found = sorted(local.rglob(CLASSIFIER_FILE))
    if not found:
        raise FileNotFoundError(f"models:/{name}/{version}: no {CLASSIFIER_FILE} among its artifacts")
    return found[0]


def scores_of(classifier, embeddings) -> dict[str, Any]:
    """Per image, higher = more surely a known class (as ``evaluate.evaluate_task``'s)."""
    from pipeline.method.head import predictive_summary

    summary = predictive_summary(classifier.sample_logits(embeddings))
    scores = {"max_probability": summary["probs"].max(dim=-1).values, "energy": summary["energy"]}
    if summary["variance"] is not None:
        scores["sample_variance"] = -summary["variance"]
    return scores


def known_and_new(champion_class_names: list[str], seen_inputs: list[TaskInputs]) -> tuple[list[int], list[int], list[str]]:
    """This lineage's ids of the earlier classes the champion knows and of the arriving
    classes it does not, and the names of arriving classes it already knows.

    Matched by name, as the gate does: ids are this lineage's numbering, and a champion
    registered by another run of the model may number the same classes otherwise. A
    champion from an earlier run of the same lineage may know arriving classes already
    (a stream never repeats a class): those are not new to it."""
    names = set(champion_class_names)
    arriving = seen_inputs[-1]
    known = [c for t in seen_inputs[:-1] for c, n in zip(t.class_ids, t.class_names) if n in names]
    new = [c for c, n in zip(arriving.class_ids, arriving.class_names) if n not in names]
    return known, new, [n for n in arriving.class_names if n in names]


def check_arrival(tracker, task: int, seen_inputs: list[TaskInputs], backbone_sha256: str) -> dict[str, Any]:
    from pipeline.method.metrics import novelty_detection
    from pipeline.serving.model import load_classifier_file

    arriving = seen_inputs[-1]
    result: dict[str, Any] = {"task": task, "classes": arriving.class_names}
    name = tracker.model_name("classifier")
    champion = registry.champion(tracker.client, name)
    if champion is None:
        return {**result, "status": "no-champion", "summary": f"{name} has no champion yet: nothing to score with"}
    result.update({"model": name, "champion_version": champion.version})
    with tempfile.TemporaryDirectory() as tmp:
        classifier, info = load_classifier_file(_download_classifier(tracker, name, champion.version, Path(tmp)))
    if info["backbone"]["sha256"] != backbone_sha256:
        return {**result, "status": "skipped",
                "summary": f"champion v{champion.version} uses another backbone ({info['backbone']['sha256'][:12]})"}
    known, new, already_known = known_and_new(info["class_names"], seen_inputs)
    if already_known:
        result["already_known"] = already_known
    if not known or not new:
        missing = f"none of tasks 1..{task - 1}'s classes" if not known else "every arriving class already"
        return {**result, "status": "skipped", "summary": f"champion v{champion.version} knows {missing}"}
    known_test = load_task_embeddings([t.test for t in seen_inputs[:-1]], backbone_sha256, known)
    new_test = load_task_embeddings([arriving.test], backbone_sha256, new)
    known_scores, new_scores = scores_of(classifier, known_test["embeddings"]), scores_of(classifier, new_test["embeddings"])
    per_score = {}
    for score in known_scores:
        figures = novelty_detection(known_scores[score], new_scores[score])
        # Accepting 95% of known images accepts fpr_at_95_tpr of the new ones; the rest are flagged.
        per_score[score] = {"flagged_at_95_tpr": 1.0 - figures["fpr_at_95_tpr"], "auroc": figures["auroc"]}
    headline = per_score[HEADLINE_SCORE]
    result.update({
        "status": "scored",
        "champion_classes": len(classifier.class_ids),
        "n_known_images": int(len(known_test["labels"])),
        "n_new_images": int(len(new_test["labels"])),
        "scores": per_score,
        "figures": {"flagged_fraction": headline["flagged_at_95_tpr"], "auroc": headline["auroc"]},
        "summary": (f"champion v{champion.version} flags {headline['flagged_at_95_tpr']:.0%} of the "
                    f"{len(new_test['labels'])} new test images as unknown (AUROC {headline['auroc']:.3f})"),
    })
    return result
