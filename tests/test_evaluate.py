from __future__ import annotations

import math

import pytest
import torch

from pipeline.method.metrics import evaluate_task, summarise


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


def _evaluate(task, tasks, embeddings, labels, features, learned):
    from pipeline.method.classifier import Classifier

    seen = [c for t in tasks[:task] for c in t]
    class_features = features.clone()
    for cid, f in (learned or {}).items():
        class_features[cid] = f
    classifier = Classifier(seen, class_features[seen], logit_scale=10.0)
    all_logits = classifier.all_class_logits(embeddings, features)
    return evaluate_task(task, tasks, labels, classifier.sample_logits(embeddings), all_logits)


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
    result = _evaluate(1, [[0, 1], [2, 3]], embeddings, labels, features, None)
    assert result["accuracy_row"] == {"1": pytest.approx(0.5)}  # class 1 taken for class 0
    assert result["transfer"] == {"2": pytest.approx(0.5)}      # class 3 taken for class 2
    # A learned feature for class 1 that points at its samples fixes the seen-class error.
    learned = {1: torch.nn.functional.normalize(torch.tensor([0.0, 0.6, 0.8, 0.0]), dim=0)}
    improved = _evaluate(1, [[0, 1], [2, 3]], embeddings, labels, features, learned)
    assert improved["accuracy_row"] == {"1": pytest.approx(1.0)}
    assert improved["step_accuracy"] == pytest.approx(1.0)
    # A deterministic classifier has no variance over samples to detect novelty with.
    assert set(improved["novelty"]) == {"max_probability", "energy"}
    # After the last task every class is seen and nothing is left to transfer to or detect.
    final = _evaluate(2, [[0, 1], [2, 3]], embeddings, labels, features, None)
    assert final["transfer"] == {} and set(final["accuracy_row"]) == {"1", "2"}
    assert "novelty" not in final and final["calibration"]["n_samples"] == 4


def test_expected_calibration_error_on_known_cases():
    from pipeline.method.metrics import calibration

    # Four predictions at confidence 0.8, three right: one bin, |0.8 - 0.75|.
    probs = torch.tensor([[0.8, 0.2]] * 4)
    result = calibration(probs, torch.tensor([0, 0, 0, 1]))
    assert result["ece"] == pytest.approx(0.05, abs=1e-6)
    filled = [b for b in result["bins"] if b["count"]]
    assert len(filled) == 1 and filled[0]["accuracy"] == pytest.approx(0.75) and filled[0]["confidence"] == pytest.approx(0.8)
    # Two bins: 0.6 confident and half right (gap 0.1), 0.9 confident and all right (gap 0.1).
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.9, 0.1]])
    assert calibration(probs, torch.tensor([0, 1, 0, 0]))["ece"] == pytest.approx(0.1, abs=1e-6)
    # Right exactly as often as it is confident: calibrated.
    probs = torch.tensor([[0.5, 0.5]] * 2 + [[1.0, 0.0]] * 2)
    assert calibration(probs, torch.tensor([0, 1, 0, 0]))["ece"] == pytest.approx(0.0, abs=1e-6)


def test_novel_class_detection_on_known_cases():
    from pipeline.method.metrics import novelty_detection

    separated = novelty_detection(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.6, 0.5]))
    assert separated == {"auroc": pytest.approx(1.0), "aupr": pytest.approx(1.0), "fpr_at_95_tpr": pytest.approx(0.0)}
    # Pairs (seen, novel): 3>2, 3>0, 1<2, 1>0 -> AUROC 3/4; accepting both seen images
    # (threshold 1) also accepts the novel image scored 2.
    mixed = novelty_detection(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0]))
    assert mixed["auroc"] == pytest.approx(0.75) and mixed["fpr_at_95_tpr"] == pytest.approx(0.5)
    # AP: ranked 3 (seen), 2 (novel), 1 (seen) -> (1/1 + 2/3) / 2.
    assert mixed["aupr"] == pytest.approx((1 + 2 / 3) / 2)
    # Large energies stay ordered (a sigmoid squashing them would tie them at 1.0).
    energies = novelty_detection(torch.tensor([100.0, 101.0]), torch.tensor([99.0, 98.0]))
    assert energies["auroc"] == pytest.approx(1.0)


def test_the_arrival_check_matches_the_champions_classes_by_name_not_id():
    from pathlib import Path

    from pipeline.stages.novelty import known_and_new
    from pipeline.stages.task_inputs import TaskInputs

    def task(t, ids, names):
        return TaskInputs(t, ids, names, Path("train"), Path("test"), Path("text"))

    seen = [task(1, [0, 1], ["red circle", "blue star"]), task(2, [2, 3], ["green cross", "red square"])]
    # The champion numbers the same classes otherwise (another run of the model), and knows
    # one arriving class already.
    champion = ["blue star", "red circle", "red square"]
    known, new, already = known_and_new(champion, seen)
    assert known == [0, 1] and new == [2] and already == ["red square"]
    # An id-based match would have called class 2 known (the champion has a column 2).
    assert known_and_new(["lonely"], seen) == ([], [2, 3], [])
