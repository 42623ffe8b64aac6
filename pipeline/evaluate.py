"""Evaluation after each task and the experiment's summary metrics (design, section F).

``A[t][k]`` is the accuracy on task ``k``'s test images after training task ``t``, among
all classes seen by then. Tasks are numbered from 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    if targets.numel() == 0:
        return float("nan")
    return (logits.argmax(dim=-1) == targets).float().mean().item()


def evaluate_task(
    task: int,
    tasks: list[list[int]],
    test_embeddings: torch.Tensor,
    test_labels: torch.Tensor,
    class_features: torch.Tensor,
    learned_features: dict[int, torch.Tensor] | None,
) -> dict[str, Any]:
    """Accuracy row ``A[task][k]`` for ``k <= task``, the step accuracy over all seen test
    samples, and zero-shot transfer to every future task ``k > task`` (among all classes,
    learned features for seen classes, ``w_c`` for unseen ones)."""
    n_classes = class_features.shape[0]
    seen = [c for t in tasks[:task] for c in t]
    features = class_features.clone().float()
    if learned_features:
        for cid, f in learned_features.items():
            features[cid] = f
    x = F.normalize(test_embeddings.float(), dim=-1)
    logits = x @ features.T
    seen_mask = torch.zeros(n_classes, dtype=torch.bool)
    seen_mask[seen] = True
    seen_logits = logits.masked_fill(~seen_mask, -math.inf)
    row, transfer = {}, {}
    for k, classes in enumerate(tasks, start=1):
        in_task = torch.isin(test_labels, torch.tensor(classes))
        if k <= task:
            row[str(k)] = accuracy(seen_logits[in_task], test_labels[in_task])
        else:
            transfer[str(k)] = accuracy(logits[in_task], test_labels[in_task])
    in_seen = torch.isin(test_labels, torch.tensor(seen))
    return {
        "task": task,
        "n_seen_classes": len(seen),
        "accuracy_row": row,
        "step_accuracy": accuracy(seen_logits[in_seen], test_labels[in_seen]),
        "transfer": transfer,
    }


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
        transfer = sum(transfers) / len(transfers)
    else:
        forgetting = bwt = transfer = float("nan")
    return {
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
