"""Evaluation after each task and the experiment's summary metrics (design, section F).

``A[t][k]`` is the accuracy on task ``k``'s test images after training task ``t``, among
all classes seen by then. Tasks are numbered from 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    if targets.numel() == 0:
        return float("nan")
    return (logits.argmax(dim=-1) == targets).float().mean().item()


def evaluate_task(
    task: int,
    tasks: list[list[int]],
    test_labels: torch.Tensor,
    seen_sample_logits: torch.Tensor,
    all_class_logits: torch.Tensor | None,
) -> dict[str, Any]:
    """Everything measured after training task ``task``.

    ``seen_sample_logits [M, N, C_seen]``: the method's logits over the seen classes (in the
    order of ``tasks``) for every test image, one slice per Monte-Carlo sample (``M = 1`` for
    a deterministic method). ``all_class_logits [N, n_classes]``: learned classes plus
    zero-shot ``w_c`` for unseen ones, for transfer to future tasks.

    Gives the accuracy row ``A[task][k]`` for ``k <= task``, the step accuracy over all seen
    test samples, transfer to every future task ``k > task``, calibration over the whole
    seen test set and, while future tasks exist, novel-class detection of seen-class test
    images against future-class test images."""
    from pipeline.method.head import predictive_summary

    seen = [c for t in tasks[:task] for c in t]
    summary = predictive_summary(seen_sample_logits)
    predicted = torch.tensor(seen)[summary["probs"].argmax(dim=-1)]
    row, transfer = {}, {}
    for k, classes in enumerate(tasks, start=1):
        in_task = torch.isin(test_labels, torch.tensor(classes))
        if k <= task:
            row[str(k)] = _mean_correct(predicted[in_task], test_labels[in_task])
        else:
            transfer[str(k)] = accuracy(all_class_logits[in_task], test_labels[in_task])
    in_seen = torch.isin(test_labels, torch.tensor(seen))
    position = {c: i for i, c in enumerate(seen)}
    targets = torch.tensor([position[int(c)] for c in test_labels[in_seen]], dtype=torch.long)
    result = {
        "task": task,
        "n_seen_classes": len(seen),
        "accuracy_row": row,
        "step_accuracy": _mean_correct(predicted[in_seen], test_labels[in_seen]),
        "transfer": transfer,
        "calibration": calibration(summary["probs"][in_seen], targets),
        "mc_samples": int(seen_sample_logits.shape[0]),
    }
    future = [c for t in tasks[task:] for c in t]
    if future:
        novel = torch.isin(test_labels, torch.tensor(future))
        scores = {"max_probability": summary["probs"].max(dim=-1).values, "energy": summary["energy"]}
        if summary["variance"] is not None:
            # Lower variance over samples means more sure, like higher probability.
            scores["sample_variance"] = -summary["variance"]
        result["novelty"] = {
            name: novelty_detection(score[in_seen], score[novel]) for name, score in scores.items()
        }
    return result


def _mean_correct(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    if targets.numel() == 0:
        return float("nan")
    return (predicted == targets).float().mean().item()


def calibration(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error (torchmetrics, ``n_bins`` equal-width confidence bins) over
    all given predictions at once, and the per-bin figures of a reliability diagram."""
    from pipeline.compat import import_torchmetrics_classification

    classification = import_torchmetrics_classification()
    # torchmetrics wants 2+ classes; a zero-probability column leaves the top-label ECE as it
    # is (one seen class: every prediction is certain and right).
    padded = probs if probs.shape[1] > 1 else torch.cat([probs, torch.zeros_like(probs)], dim=1)
    ece = classification.multiclass_calibration_error(
        padded, targets, num_classes=padded.shape[1], n_bins=n_bins, norm="l1"
    ).item()
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (confidence > lo) & (confidence <= hi)
        count = int(inside.sum())
        bins.append({
            "lower": lo, "upper": hi, "count": count,
            "confidence": confidence[inside].mean().item() if count else None,
            "accuracy": correct[inside].mean().item() if count else None,
        })
    return {"ece": ece, "n_bins": n_bins, "n_samples": int(len(targets)), "bins": bins}


def novelty_detection(seen_scores: torch.Tensor, novel_scores: torch.Tensor) -> dict[str, float]:
    """Seen-class images are the positives (higher score = more surely seen): AUROC, AUPR
    and the share of novel images accepted when 95% of seen ones are (FPR at 95% TPR)."""
    from pipeline.compat import import_torchmetrics_classification

    classification = import_torchmetrics_classification()
    scores = torch.cat([seen_scores, novel_scores])
    # torchmetrics squashes scores outside [0, 1] with a sigmoid, which ties large energies;
    # ranks keep the order (and real ties) exactly.
    ranks = torch.unique(scores, return_inverse=True)[1].double()
    scores = ranks / ranks.max().clamp_min(1.0)
    truth = torch.cat([torch.ones(len(seen_scores)), torch.zeros(len(novel_scores))]).long()
    auroc = classification.binary_auroc(scores, truth, thresholds=None).item()
    aupr = classification.binary_average_precision(scores, truth, thresholds=None).item()
    fpr, tpr, _ = classification.binary_roc(scores, truth, thresholds=None)
    fpr95 = fpr[torch.nonzero(tpr >= 0.95)[0, 0]].item()
    return {"auroc": auroc, "aupr": aupr, "fpr_at_95_tpr": fpr95}


def summarise(evaluations: list[dict[str, Any]]) -> dict[str, Any]:
    """Average incremental accuracy, last accuracy, forgetting, backward transfer and
    forward (zero-shot) transfer from the per-task evaluations of one run."""
    evaluations = sorted(evaluations, key=lambda e: e["task"])
    n = len(evaluations)
    matrix = [[e["accuracy_row"].get(str(k), float("nan")) for k in range(1, n + 1)] for e in evaluations]
    steps = [e["step_accuracy"] for e in evaluations]
    if n > 1:
        forgetting = sum(max(matrix[t][k] for t in range(k, n - 1)) - matrix[n - 1][k] for k in range(n - 1)) / (n - 1)
        bwt = sum(matrix[n - 1][k] - matrix[k][k] for k in range(n - 1)) / (n - 1)
        transfers = [v for e in evaluations[:-1] for v in e["transfer"].values()]
        # The stream never knows its next classes: no transfer to measure.
        transfer = sum(transfers) / len(transfers) if transfers else float("nan")
    else:
        forgetting = bwt = transfer = float("nan")
    eces = [e["calibration"]["ece"] for e in evaluations if "calibration" in e]
    novelty: dict[str, dict[str, float]] = {}
    with_novelty = [e["novelty"] for e in evaluations if e.get("novelty")]
    for score in (with_novelty[0] if with_novelty else {}):
        novelty[score] = {
            figure: sum(e[score][figure] for e in with_novelty) / len(with_novelty)
            for figure in ("auroc", "aupr", "fpr_at_95_tpr")
        }
    # The stream's counterpart: how the champion saw each arriving task before it trained.
    arrivals = {
        str(e["task"]): e["arrival"]["figures"] for e in evaluations if e.get("arrival", {}).get("figures")
    }
    return {
        "arrivals": arrivals,
        "ece_last": eces[-1] if eces else float("nan"),
        "ece_mean": sum(eces) / len(eces) if eces else float("nan"),
        "novelty": novelty,
        "average_incremental_accuracy": sum(steps) / n,
        "last_accuracy": steps[-1],
        "forgetting": forgetting,
        "backward_transfer": bwt,
        "transfer": transfer,
        "step_accuracy": steps,
        "accuracy_matrix": matrix,
    }


def plot_accuracy_matrix(matrix: list[list[float]], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n))
    data = [[v if k <= t else float("nan") for k, v in enumerate(row)] for t, row in enumerate(matrix)]
    image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
    for t in range(n):
        for k in range(t + 1):
            ax.text(k, t, f"{100 * matrix[t][k]:.0f}", ha="center", va="center", color="white" if matrix[t][k] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(n), [str(k + 1) for k in range(n)])
    ax.set_yticks(range(n), [str(t + 1) for t in range(n)])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_reliability(bins: list[dict[str, Any]], ece: float, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    width = bins[0]["upper"] - bins[0]["lower"]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar([b["lower"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled], bottom=[b["accuracy"] for b in filled],
           width=width, align="edge", color="tab:red", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {100 * ece:.1f}% ({len(bins)} bins)", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
