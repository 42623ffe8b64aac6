from __future__ import annotations

import pytest

from pipeline.data.split import SplitError, make_split, seen_classes, task_classes

CLASSES = [f"class {i}" for i in range(10)]


def test_same_seed_same_split_and_other_seed_other_order():
    a = make_split(CLASSES, 5, seed=3)
    assert a == make_split(CLASSES, 5, seed=3)
    assert a["class_order"] != make_split(CLASSES, 5, seed=4)["class_order"]


def test_tasks_are_disjoint_and_cover_every_class():
    split = make_split(CLASSES, 3, seed=0)
    flat = [c for task in split["tasks"] for c in task]
    assert sorted(flat) == list(range(10))
    assert [len(t) for t in split["tasks"]] == [4, 3, 3]
    assert split["task_class_names"][0] == [CLASSES[c] for c in split["tasks"][0]]


def test_explicit_order_by_name_or_index():
    order = list(reversed(CLASSES))
    split = make_split(CLASSES, 2, seed=0, class_order=order)
    assert split["class_order"] == list(range(9, -1, -1))
    assert make_split(CLASSES, 2, seed=7, class_order=list(range(9, -1, -1)))["tasks"] == split["tasks"]


@pytest.mark.parametrize(
    "order, message",
    [
        (CLASSES[:-1], r"missing: \['class 9'\]"),
        (CLASSES[:-1] + ["class 0"], r"repeated: \['class 0'\]"),
        (CLASSES[:-1] + ["cat"], r"unknown class 'cat'"),
        (list(range(9)) + [10], r"class index 10"),
    ],
)
def test_bad_explicit_order_names_the_class(order, message):
    with pytest.raises(SplitError, match=message):
        make_split(CLASSES, 2, seed=0, class_order=order)


def test_more_tasks_than_classes_is_refused():
    with pytest.raises(SplitError, match="n_tasks=11"):
        make_split(CLASSES, 11, seed=0)


def test_task_index_outside_the_split_is_named():
    split = make_split(CLASSES, 2, seed=0)
    assert task_classes(split, 2) == split["tasks"][1]
    assert seen_classes(split, 2) == split["tasks"][0] + split["tasks"][1]
    with pytest.raises(SplitError, match=r"task 3 is outside the split \(tasks 1\.\.2\)"):
        task_classes(split, 3)
    with pytest.raises(SplitError, match="task 0"):
        seen_classes(split, 0)
