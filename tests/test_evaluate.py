from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluate import evaluate_task, summarise


def _evaluations(matrix, transfers):
    return [
        {"task": t + 1, "accuracy_row": {str(k + 1): row[k] for k in range(t + 1)},
         "step_accuracy": sum(row[: t + 1]) / (t + 1), "transfer": transfers[t]}
        for t, row in enumerate(matrix)
    ]


def test_summary_metrics_on_a_hand_made_matrix():
    matrix = [
        [0.9, 0, 0],
        [0.7, 0.8, 0],
        [0.6, 0.5, 0.9],
    ]
    transfers = [{"2": 0.3, "3": 0.2}, {"3": 0.4}, {}]
    s = summarise(_evaluations(matrix, transfers))
    steps = [0.9, 0.75, 2.0 / 3.0]
    assert s["step_accuracy"] == pytest.approx(steps)
    assert s["average_incremental_accuracy"] == pytest.approx(sum(steps) / 3)
    assert s["last_accuracy"] == pytest.approx(2.0 / 3.0)
    # Forgetting: task 1 max(0.9, 0.7) - 0.6 = 0.3; task 2 max(0.8) - 0.5 = 0.3.
    assert s["forgetting"] == pytest.approx(0.3)
    # Backward transfer: (0.6 - 0.9 + 0.5 - 0.8) / 2.
    assert s["backward_transfer"] == pytest.approx(-0.3)
    assert s["transfer"] == pytest.approx((0.3 + 0.2 + 0.4) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    matrix = [[0.5, 0], [0.9, 0.8], [0.4, 0.8]]
    s = summarise(_evaluations([r + [0] * (3 - len(r)) for r in matrix], [{"2": 0.1, "3": 0.1}, {"3": 0.1}, {}]))
    # Task 1 peaked after task 2 (0.9), ends at 0.4; task 2 stays at 0.8.
    assert s["forgetting"] == pytest.approx((0.5 + 0.0) / 2)


def test_single_task_has_no_forgetting():
    s = summarise(_evaluations([[0.7]], [{}]))
    assert s["last_accuracy"] == pytest.approx(0.7) and math.isnan(s["forgetting"])


def test_evaluate_task_restricts_to_seen_classes_and_transfers_to_the_rest():
    # 4 classes on the axes; tasks [[0, 1], [2, 3]].
    features = torch.eye(4)
    embeddings = torch.tensor([
        [1.0, 0, 0, 0],      # class 0
        [0.4, 0.3, 0.9, 0],  # class 1: closest to unseen class 2, then to class 0
        [0, 0, 1.0, 0],      # class 2
        [0, 0, 1.0, 0.2],    # class 3: closer to class 2
    ])
    labels = torch.tensor([0, 1, 2, 3])
    result = evaluate_task(1, [[0, 1], [2, 3]], embeddings, labels, features, None)
    assert result["accuracy_row"] == {"1": pytest.approx(0.5)}  # class 1 taken for class 0
    assert result["transfer"] == {"2": pytest.approx(0.5)}      # class 3 taken for class 2
    # A learned feature for class 1 that points at its samples fixes the seen-class error.
    learned = {1: torch.nn.functional.normalize(torch.tensor([0.0, 0.6, 0.8, 0.0]), dim=0)}
    improved = evaluate_task(1, [[0, 1], [2, 3]], embeddings, labels, features, learned)
    assert improved["accuracy_row"] == {"1": pytest.approx(1.0)}
    assert improved["step_accuracy"] == pytest.approx(1.0)
    # After the last task every class is seen and nothing is left to transfer to.
    final = evaluate_task(2, [[0, 1], [2, 3]], embeddings, labels, features, None)
    assert final["transfer"] == {} and set(final["accuracy_row"]) == {"1", "2"}
