"""The promotion gate, and the record of every move of the ``champion`` alias.

A task's classifier version takes ``champion`` only if it is no worse than the current
champion on what both can be asked (design section 6):

- **Like with like.** The candidate knows more classes than the champion (the new task's),
  and a new class must not count against it: its accuracy on each earlier task is measured
  with its predictions restricted to the classes the champion knows (by class name, the
  champion's ``classes`` tag), on the same test images (``test_digests``), and compared
  with the champion's own ``accuracy_row``. No task may drop more than ``max_task_drop``,
  their mean no more than ``max_average_drop``. The full figures (among all the candidate's
  classes) are recorded beside the restricted ones.
- **The new classes' pull, against zero-shot's.** Restricting alone would pass a version
  that sends an earlier task's images to the new classes (forgetting as bias towards the
  newest task, what training without replay does). The share of each earlier task's images
  it predicts as a class the champion does not know may exceed the share CLIP's zero-shot
  classifier gives those classes (same images, same classes: what they take untrained) by
  at most ``max_task_drop``.
- **A floor for the new task.** Its accuracy (among all seen classes, as ``accuracy_row``
  measures it) must reach ``new_task_floor``: by default the zero-shot accuracy of the same
  test images among the same classes (what no training at all gives) less ``max_task_drop``,
  the cost training may have on any task. Without that allowance one test image decides:
  the demo's CLIP reaches 99.6% zero-shot on its first task, as does the trained version.
- **Nothing unchecked.** A NaN or missing figure, and a champion without the tags the
  comparison needs, reject the candidate with a reason instead of skipping the check.

Every move of the alias, by the gate or by ``recall rollback``, is one tag on the registered
model, ``recall.champion.move.<n>`` (``n`` counts from 1): from which version to which, when,
why, and by which run or user. One bounded tag per move: none grows with the tasks.

One module, over 400 lines: the gate's checks, the decision they make and the champion's
move history (promotion, `recall champion`, `recall rollback`) are one state machine.
"""

from __future__ import annotations

import getpass
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from pipeline.tracking.lineage import RegistryError

MOVE_TAG_PREFIX = "recall.champion.move."
# Registered-model tag values are a VARCHAR(5000) in MLflow's SQL stores.
MAX_MOVE_REASON = 2000
CHAMPION = "champion"
# Accuracies are float32 means: a drop of exactly the allowed points must not fail on rounding.
TOLERANCE = 1e-6


@dataclass(frozen=True)
class Evidence:
    """What a candidate version is judged on, all after training task ``task``.

    ``logits [N, C]``: its (sample-averaged) logits over ``class_ids`` for the test images
    with ``labels [N]``; ``tasks``: the class ids of tasks 1..``task``; ``names``: class id
    to name; ``accuracy_row``: its accuracy per task among all its classes (``evaluate``'s);
    ``zero_shot_logits [N, C]``: CLIP's zero-shot logits (``s <e, w_c>``) over the same
    classes for the same images (None when not measured)."""

    task: int
    class_ids: list[int]
    names: Mapping[int, str]
    tasks: list[list[int]]
    logits: torch.Tensor
    labels: torch.Tensor
    accuracy_row: dict[str, float]
    test_digests: dict[str, str]
    zero_shot_logits: torch.Tensor | None = None

    @property
    def class_names(self) -> list[str]:
        return [self.names[c] for c in self.class_ids]

    @property
    def zero_shot(self) -> float | None:
        """Zero-shot accuracy on the new task's test images among the same classes: what
        the candidate's own ``accuracy_row[task]`` is with no training at all."""
        if self.zero_shot_logits is None:
            return None
        return _accuracy_on(self.zero_shot_logits, self.labels, self.class_ids, self.tasks[self.task - 1])

    def version_tags(self) -> dict[str, str]:
        """What a later gate needs to know of this version once it is champion."""
        return {
            "accuracy_row": json.dumps(self.accuracy_row),
            "classes": json.dumps(self.class_names),
            "class_count": str(len(self.class_ids)),
            "test_digests": json.dumps(self.test_digests),
        }


@dataclass(frozen=True)
class Champion:
    """The champion as its tags describe it; ``problems`` lists what is missing or unusable."""

    version: str
    accuracy_row: dict[str, float] | None
    classes: list[str] | None
    test_digests: dict[str, str] | None
    problems: list[str]


def read_champion(version) -> Champion:
    """The gate's view of a champion ``ModelVersion``: its three tags, parsed."""
    problems: list[str] = []

    def tag(key: str, kind: type, what: str):
        raw = version.tags.get(key)
        if raw is None:
            problems.append(f"champion v{version.version} has no `{key}` tag ({what}): it cannot be compared")
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, kind) or not value:
            problems.append(f"champion v{version.version}: its `{key}` tag is not a non-empty JSON {kind.__name__} ({raw[:60]!r})")
            return None
        return value

    row = tag("accuracy_row", dict, "its accuracy per task")
    classes = tag("classes", list, "the names of the classes it knows")
    tests = tag("test_digests", dict, "which test images each task was measured on")
    if row is not None:
        try:
            row = {str(k): float(v) for k, v in row.items()}
        except (TypeError, ValueError):
            problems.append(f"champion v{version.version}: its `accuracy_row` tag holds a value that is not a number")
            row = None
    return Champion(str(version.version), row, classes, tests, problems)


# --------------------------------------------------------------------------- figures


def restricted_row(evidence: Evidence, keep: list[str], tasks: list[str]) -> dict[str, float]:
    """The candidate's accuracy on each of ``tasks`` with its predictions restricted to the
    classes named ``keep`` (which it must know): the argmax over those columns only. A task
    with an image of a class outside ``keep``, or with no image, is NaN."""
    from pipeline.method.metrics import accuracy

    position = {name: i for i, name in enumerate(evidence.class_names)}
    columns = [position[name] for name in keep]
    target = {evidence.class_ids[p]: j for j, p in enumerate(columns)}
    logits = evidence.logits[:, columns]
    row = {}
    for task in tasks:
        classes = evidence.tasks[int(task) - 1] if 0 < int(task) <= len(evidence.tasks) else []
        inside = torch.isin(evidence.labels, torch.tensor(classes, dtype=evidence.labels.dtype))
        labels = evidence.labels[inside].tolist()
        if not labels or any(c not in target for c in labels):
            row[task] = math.nan
            continue
        row[task] = accuracy(logits[inside], torch.tensor([target[c] for c in labels], dtype=torch.long))
    return row


def zero_shot_logits(embeddings: torch.Tensor, zero_shot_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``[N, C]``: CLIP's zero-shot logits for ``embeddings`` over the classes whose ``w_c``
    are the rows of ``zero_shot_features``."""
    from pipeline.method.classifier import Classifier

    classes = list(range(len(zero_shot_features)))
    return Classifier(classes, zero_shot_features.float(), logit_scale).sample_logits(embeddings)[0]


def _accuracy_on(logits: torch.Tensor, labels: torch.Tensor, class_ids: list[int], classes: list[int]) -> float:
    """Accuracy (argmax over every column of ``logits``, which are ``class_ids``) on the
    images of ``classes``; NaN without any."""
    from pipeline.method.metrics import accuracy

    inside = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    position = {c: i for i, c in enumerate(class_ids)}
    return accuracy(logits[inside], torch.tensor([position[int(c)] for c in labels[inside]], dtype=torch.long))


def taken_by(logits: torch.Tensor, evidence: Evidence, new_names: set[str], tasks: list[str]) -> dict[str, float]:
    """Per task in ``tasks``: the share of its test images whose prediction (argmax over
    every column of ``logits``) is a class named in ``new_names``; NaN without images."""
    new = torch.tensor([name in new_names for name in evidence.class_names])
    predicted_new = new[logits.argmax(dim=-1)]
    shares = {}
    for task in tasks:
        classes = evidence.tasks[int(task) - 1] if 0 < int(task) <= len(evidence.tasks) else []
        inside = torch.isin(evidence.labels, torch.tensor(classes, dtype=evidence.labels.dtype))
        shares[task] = predicted_new[inside].float().mean().item() if bool(inside.any()) else math.nan
    return shares


def new_task_floor(rule: str | float | None, zero_shot: float | None, allowance: float) -> float | None:
    """The accuracy the new task must reach: ``zero_shot``'s figure less ``allowance``, a
    fixed number, or none."""
    if rule is None:
        return None
    if rule == "zero_shot":
        return math.nan if zero_shot is None else float(zero_shot) - allowance
    return float(rule)


# --------------------------------------------------------------------------- the decision


def _pct(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{100 * value:.1f}%"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def gate_decision(evidence: Evidence, champion: Champion | None, max_task_drop: float, max_average_drop: float,
                  floor_rule: str | float | None = "zero_shot") -> tuple[bool, list[str], dict[str, Any]]:
    """Whether the candidate may become champion, the reasons, and the figures compared.

    Rejected without comparing accuracies when the champion lacks a tag the comparison
    needs, when the candidate does not know every class the champion knows, or when a task
    the champion was measured on was measured on other classes or test images for the
    candidate. Otherwise rejected for each failed rule: a NaN or missing figure, an earlier
    task whose restricted accuracy is more than ``max_task_drop`` below the champion's, or
    whose images the new classes take ``max_task_drop`` more of than zero-shot sends them,
    a restricted mean more than ``max_average_drop`` below the champion's mean, a new task
    below its floor."""
    task = str(evidence.task)
    floor = new_task_floor(floor_rule, evidence.zero_shot, max_task_drop)
    own = evidence.accuracy_row.get(task, math.nan)
    figures: dict[str, Any] = {
        "accuracy_row": dict(evidence.accuracy_row),
        "new_task": {"task": evidence.task, "accuracy": own, "floor": floor,
                     "floor_rule": floor_rule, "zero_shot": evidence.zero_shot},
    }
    failures: list[str] = []
    if not _finite(own):
        failures.append(f"task {task} (the new task): its accuracy is {'missing' if task not in evidence.accuracy_row else 'NaN'}")
    elif floor is not None and not _finite(floor):
        failures.append(f"task {task} (the new task): its floor ({floor_rule}) is NaN, so it cannot be checked")
    elif floor is not None and own < floor - TOLERANCE:
        failures.append(f"task {task} (the new task): accuracy {_pct(own)} is below its floor {_pct(floor)} "
                        + (f"(zero-shot {_pct(evidence.zero_shot)} on it, less {100 * max_task_drop:.1f} points)"
                           if floor_rule == "zero_shot" else "(tracking.gate.new_task_floor)"))
    if champion is None:
        if failures:
            return False, failures, figures
        return True, ["no champion yet" + (f"; task {task} at {_pct(own)} clears its floor {_pct(floor)}" if floor is not None else "")], figures

    figures["champion"] = champion.version
    if champion.problems:
        return False, champion.problems + failures, figures
    known = set(evidence.class_names)
    unknown = [c for c in champion.classes if c not in known]
    if unknown:
        if len(known) < len(champion.classes):
            what = f"knows {len(known)} classes, the champion knows {len(champion.classes)}"
        else:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            what = f"does not know {len(unknown)} class(es) the champion knows ({shown})"
        return False, [f"{what}: a version must cover every class the champion knows"], figures
    differing = sorted((t for t in champion.test_digests if evidence.test_digests.get(t) != champion.test_digests[t]), key=int)
    if differing:
        return False, [
            f"task(s) {', '.join(differing)}: measured on other classes or test images than the champion's "
            "(test digests differ), so their accuracies are not comparable; re-evaluate both on the same "
            "test set, or move the champion alias by hand (`recall rollback --to <version>`)"
        ], figures

    shared = sorted(champion.accuracy_row, key=int)
    restricted = restricted_row(evidence, champion.classes, shared)
    figures.update({"restricted_row": restricted, "champion_row": dict(champion.accuracy_row),
                    "champion_classes": len(champion.classes), "candidate_classes": len(known)})
    among = f"among the champion's {len(champion.classes)} classes"
    for t in shared:
        ours, theirs = restricted[t], champion.accuracy_row[t]
        if not _finite(ours) or not _finite(theirs):
            failures.append(f"task {t}: accuracy {among} {_pct(ours)}, the champion's {_pct(theirs)}: a NaN figure "
                            "cannot be compared")
            continue
        if theirs - ours > max_task_drop + TOLERANCE:
            full = evidence.accuracy_row.get(t, math.nan)
            failures.append(
                f"task {t}: accuracy {among} {_pct(ours)} is {100 * (theirs - ours):.1f} points below the champion's "
                f"{_pct(theirs)} (allowed {100 * max_task_drop:.1f}; among all its {len(known)} classes {_pct(full)})"
            )
    new_names = known - set(champion.classes)
    if new_names:
        taken = taken_by(evidence.logits, evidence, new_names, shared)
        untrained = (taken_by(evidence.zero_shot_logits, evidence, new_names, shared)
                     if evidence.zero_shot_logits is not None else {t: math.nan for t in shared})
        figures.update({"taken_by_new_classes": taken, "taken_by_new_classes_zero_shot": untrained})
        for t in shared:
            if not _finite(taken[t]) or not _finite(untrained[t]):
                failures.append(f"task {t}: the share of its images taken by the {len(new_names)} class(es) the champion "
                                f"does not know is {_pct(taken[t])}, zero-shot's {_pct(untrained[t])}: a NaN figure "
                                "cannot be compared")
            elif taken[t] - untrained[t] > max_task_drop + TOLERANCE:
                failures.append(
                    f"task {t}: {_pct(taken[t])} of its images go to the {len(new_names)} class(es) the champion does "
                    f"not know, {100 * (taken[t] - untrained[t]):.1f} points more than zero-shot sends there "
                    f"({_pct(untrained[t])}; allowed {100 * max_task_drop:.1f})"
                )
    comparable = [t for t in shared if _finite(restricted[t]) and _finite(champion.accuracy_row[t])]
    mean = ""
    if len(comparable) == len(shared):
        ours = sum(restricted[t] for t in shared) / len(shared)
        theirs = sum(champion.accuracy_row[t] for t in shared) / len(shared)
        figures["restricted_mean"], figures["champion_mean"] = ours, theirs
        mean = (f"mean accuracy {among} over tasks {', '.join(shared)}: {_pct(ours)} against the champion's "
                f"{_pct(theirs)} (allowed drop {100 * max_average_drop:.1f})")
        if theirs - ours > max_average_drop + TOLERANCE:
            failures.append(mean)
    if failures:
        return False, failures, figures
    cleared = f"; task {task} at {_pct(own)} clears its floor {_pct(floor)}" if floor is not None else ""
    pull = (f"; the new classes take at most {100 * max_task_drop:.1f} points more of any earlier task's images "
            "than zero-shot" if new_names else "")
    return True, [f"no earlier task drops more than {100 * max_task_drop:.1f} points {among}; {mean}{pull}{cleared}"], figures


def decide(client, name: str, version: str, evidence: Evidence, gate_cfg, run_id: str | None) -> dict[str, Any]:
    """Apply the gate to ``version`` of ``name`` against the current champion: move the
    alias (recording the move) if it passes, tag the version with the decision, and return
    the decision. The ``gate`` tag is set last: a version without it had its decision
    interrupted, and the next attempt decides again."""
    from pipeline.tracking.registry import champion as current_champion

    found = current_champion(client, name)
    before = str(found.version) if found is not None else None
    passed, reasons, figures = gate_decision(
        evidence, read_champion(found) if found is not None else None,
        gate_cfg.max_task_drop, gate_cfg.max_average_drop, gate_cfg.new_task_floor,
    )
    if passed and before != str(version):
        move_champion(client, name, str(version), reason="; ".join(reasons), by="gate", run_id=run_id, task=evidence.task)
    decision = {
        "model": name, "version": str(version), "promoted": passed, "champion": passed or before == str(version),
        "decision": "passed" if passed else "rejected", "reasons": reasons,
        "champion_before": before, "champion_after": str(version) if passed else before,
        "figures": figures, "gate": gate_cfg.model_dump(),
    }
    client.set_model_version_tag(name, version, "gate_reasons", " | ".join(reasons)[:5000])
    client.set_model_version_tag(name, version, "gate_figures", json.dumps(figures, default=str))
    client.set_model_version_tag(name, version, "gate", decision["decision"])
    return decision


# --------------------------------------------------------------------------- moves of the alias


def moves(client, name: str) -> list[dict[str, Any]]:
    """Every recorded move of ``name``'s champion alias, oldest first."""
    tags = _registered_model(client, name).tags
    found = []
    for key, value in tags.items():
        if key.startswith(MOVE_TAG_PREFIX) and key[len(MOVE_TAG_PREFIX):].isdigit():
            try:
                record = json.loads(value)
            except ValueError:
                record = {"reason": f"(unreadable record: {value[:80]!r})"}
            found.append({"n": int(key[len(MOVE_TAG_PREFIX):]), **record})
    return sorted(found, key=lambda m: m["n"])


def move_champion(client, name: str, to: str, *, reason: str, by: str, run_id: str | None = None,
                  task: int | None = None) -> dict[str, Any]:
    """Point ``champion`` at version ``to`` and record the move. The record is written first:
    a move interrupted before the alias moved shows in ``recall champion`` as a record whose
    ``to`` is not the champion, never as a move that left no trace."""
    from pipeline.tracking.registry import champion as current_champion

    found = current_champion(client, name)
    history = moves(client, name)
    record = {
        "from": str(found.version) if found is not None else None, "to": str(to),
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "by": by,
        "run_id": run_id, "user": _user(), "task": task, "reason": reason[:MAX_MOVE_REASON],
    }
    last = history[-1] if history else None
    # A retried step whose record was written but whose alias did not move: one record.
    if not (last and last.get("from") == record["from"] and last.get("to") == record["to"] and last.get("by") == by):
        n = (last["n"] if last else 0) + 1
        client.set_registered_model_tag(name, f"{MOVE_TAG_PREFIX}{n:06d}", json.dumps(record))
    client.set_registered_model_alias(name, CHAMPION, str(to))
    return record


def rollback(client, name: str, to: str, reason: str) -> dict[str, Any] | None:
    """Move ``champion`` to version ``to`` by hand, recorded with ``reason``. None when that
    version holds it already (nothing moves, nothing is recorded)."""
    from pipeline.tracking.registry import champion as current_champion

    if not reason or not reason.strip():
        raise RegistryError("--reason is required and must say why the champion moves (it is recorded with the move)")
    _registered_model(client, name)
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    if str(to) not in versions:
        listed = ", ".join(versions) if versions else "none"
        raise RegistryError(f"{name} has no version {to!r} (its versions: {listed})")
    found = current_champion(client, name)
    if found is not None and str(found.version) == str(to):
        return None
    task = client.get_model_version(name, str(to)).tags.get("task")
    return move_champion(client, name, str(to), reason=reason.strip(), by="rollback",
                         task=int(task) if task and task.isdigit() else None)


def history_text(client, name: str) -> str:
    """The current champion of ``name`` and every recorded move, as a table."""
    from pipeline.tracking.registry import champion as current_champion

    found = current_champion(client, name)
    lines = []
    if found is None:
        lines.append(f"{name}: no version holds {CHAMPION}")
    else:
        tags = found.tags
        what = [f"task {tags['task']}" if "task" in tags else None,
                f"{tags['class_count']} classes" if "class_count" in tags else None,
                f"gate {tags['gate']}" if "gate" in tags else None]
        lines.append(f"{name}: {CHAMPION} is v{found.version} ({', '.join(w for w in what if w)})")
    history = moves(client, name)
    if not history:
        lines.append("no recorded move")
        return "\n".join(lines)
    header = ["#", "when (UTC)", "from", "to", "task", "by", "reason"]
    rows = [[str(m["n"]), str(m.get("at", "?")).replace("T", " ").rstrip("Z"), _v(m.get("from")), _v(m.get("to")),
             str(m.get("task") or "-"),
             f"gate, run {m['run_id']}" if m.get("by") == "gate" and m.get("run_id") else f"{m.get('by', '?')} by {m.get('user') or '?'}",
             str(m.get("reason", ""))] for m in history]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    if found is not None and history[-1].get("to") != str(found.version):
        lines.append(f"note: the last recorded move went to {_v(history[-1].get('to'))}, but {CHAMPION} is on "
                     f"v{found.version} (a move interrupted before the alias moved, or an alias set outside Recall)")
    return "\n".join(lines)


def _v(version: str | None) -> str:
    return f"v{version}" if version else "-"


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return None


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise RegistryError(f"no registered model {name!r} (pass --model with an existing name)") from None
        raise
