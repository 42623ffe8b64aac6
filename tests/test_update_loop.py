"""The update loop end to end: batches arrive in a folder source one at a time and
`recall update` (what `make update` runs) turns each into the next task, under DVC."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from support.projects import kill_during, sh, stages_ran
from support.stream import SETUP, classifier_versions, task_stages

pytestmark = pytest.mark.slow









def _next_batch(root: Path, source: Path) -> None:
    sh(root, "recall", "stream-demo", str(source), "--batches", "3", "--next")


def test_each_batch_becomes_one_task_and_only_its_stages_run(stream_repo):
    root, source = stream_repo
    nothing = sh(root, "recall", "update")
    assert "no task yet" in nothing.stdout and not stages_ran(nothing.stdout)

    _next_batch(root, source)
    first = sh(root, "recall", "update")
    assert stages_ran(first.stdout) == SETUP | task_stages(1) | {"report"}, first.stdout
    assert len(classifier_versions(root)) == 1
    ledger = yaml.safe_load((root / "ledger.yaml").read_text())
    assert [e["batch"] for e in ledger["entries"]] == ["batch-001"]
    # The task's embeddings are in the project; its images are not.
    assert (root / "data/embeddings/task-01/train/index.json").exists()
    assert not any(p.suffix == ".png" for p in (root / "data").rglob("*") if "prepared" not in p.parts)

    # Batch 2 lands, and batch 1's images are deleted: nothing later needs them.
    _next_batch(root, source)
    shutil.rmtree(source / "batch-001")
    second = sh(root, "recall", "update")
    assert stages_ran(second.stdout) == {"split"} | task_stages(2) | {"report"}, second.stdout
    assert len(classifier_versions(root)) == 2
    arrival = yaml.safe_load((root / "metrics/arrivals/task-02.json").read_text())
    assert arrival["status"] == "scored" and 0.0 <= arrival["figures"]["flagged_fraction"] <= 1.0
    assert 0.0 <= arrival["figures"]["auroc"] <= 1.0
    evaluation = yaml.safe_load((root / "metrics/tasks/task-02.json").read_text())
    assert evaluation["arrival"]["figures"] == arrival["figures"] and evaluation["n_seen_classes"] == 6
    assert "up to date" in sh(root, "dvc", "status").stdout
    again = sh(root, "recall", "update")
    assert not stages_ran(again.stdout) and len(classifier_versions(root)) == 2

    # Task 3, killed while it finetunes; the next update resumes at that stage.
    _next_batch(root, source)
    seen = kill_during(root, ["recall", "update"], "finetune@03")
    resumed = sh(root, "recall", "update")
    ran = stages_ran(resumed.stdout)
    # It resumes at the killed stage: what finished before it is not run again.
    assert {"finetune@03", "evaluate@03", "report"} <= ran <= {"novelty@03", "finetune@03", "evaluate@03", "report"}, ran
    assert "finetune@03" in seen and not {"intake@03", "generators@03", "replay@03"} & ran
    versions = classifier_versions(root)
    assert sorted(int(v.tags["class_count"]) for v in versions) == [3, 6, 9]
    assert "up to date" in sh(root, "dvc", "status").stdout


def test_a_stream_whose_first_batch_has_one_class_runs(stream_repo):
    """g is a per-class map (its BatchNorm has fixed statistics, as the reference's), so a
    task of one class trains like any other: the stream's first batch may have one class."""
    root, source = stream_repo
    sh(root, "recall", "stream-demo", str(source), "--batches", "9", "--next")
    first = sh(root, "recall", "update")
    assert stages_ran(first.stdout) == SETUP | task_stages(1) | {"report"}, first.stdout
    [version] = classifier_versions(root)
    assert version.tags["class_count"] == "1"
    report = yaml.safe_load((root / "metrics/report.json").read_text())
    # One task: nothing to forget, no future class to transfer to; none is a number.
    assert report["transfer"] is None and report["forgetting"] is None
    assert "transfer n/a" in sh(root, "recall", "summary").stdout
