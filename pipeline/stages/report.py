"""Stage `report` and `recall summary`: the report's metrics, CSVs and plots, and its text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.clip import embedding as embed_lib
from pipeline.config import Config
from pipeline.data.split import load_split
from pipeline.io import write_json
from pipeline.stages._common import TaskInputError, metrics_file, task_file
from pipeline.tracking.runs import Tracker


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
    from pipeline.io import atomic_path, read_json
    from pipeline.method.metrics import plot_accuracy_matrix, plot_reliability, summarise

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
    backbone_metrics = metrics_file(cfg, "backbone")
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
