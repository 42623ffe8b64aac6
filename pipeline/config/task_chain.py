"""The per-task entries Hydra's resolvers derive: each task's inputs (``split.tasks``), which
stage families a mode runs, and how many tasks the stream's ledger holds. The resolvers in
hydra_plugins/recall_resolvers register these under ``${recall_*:...}``.
"""

from __future__ import annotations

from pathlib import Path


def task_stem(task: int) -> str:
    """``task-NN``: the stem every per-task file, folder and run name is built from."""
    return f"task-{int(task):02d}"


def mode_of(dataset_name: str) -> str:
    return "stream" if dataset_name == "stream" else "benchmark"


def task_chain(
    n_tasks: int,
    dataset_name: str = "shapes",
    embeddings: str = "data/embeddings",
    split: str = "data/split.json",
    tasks: str = "data/tasks",
    evaluations: str = "metrics/tasks",
    prompts: str = "models/prompts",
) -> dict[str, dict[str, object]]:
    """``{"01": {"task": 1, "previous": "00", ...}, ...}``: one entry per task, for DVC's foreach.

    DVC cannot do arithmetic on ``${item}``; each per-task stage finds the state it builds
    on (task 0 is the initial state) through ``previous``, and its inputs through:

    - ``classes``: the file naming the task's classes (the split, or the stream's task
      manifest, written once by ``recall ingest``);
    - ``train``, ``test``, ``text``: its embeddings (the benchmark's, shared by all tasks;
      or the task's own, from its batch);
    - ``after``: what must exist before the arriving classes are scored by the champion
      (the previous task's evaluation, which registers and gates; task 1: the initial state).
    """
    n = int(n_tasks)
    stream = mode_of(dataset_name) == "stream"
    chain = {}
    for t in range(1, n + 1):
        key = f"{t:02d}"
        own = f"{embeddings}/{task_stem(t)}"
        chain[key] = {
            "task": t,
            "previous": f"{t - 1:02d}",
            "classes": f"{tasks}/{task_stem(t)}.json" if stream else split,
            "train": f"{own}/train" if stream else f"{embeddings}/train",
            "test": f"{own}/test" if stream else f"{embeddings}/test",
            "text": f"{own}/text.safetensors" if stream else f"{embeddings}/text.safetensors",
            "after": f"{evaluations}/{task_stem(t - 1)}.json" if t > 1 else f"{prompts}/{task_stem(0)}.safetensors",
        }
    return chain


def stage_switches(dataset_name: str, chain: dict) -> dict[str, object]:
    """Which mode-specific stage families exist (DVC's foreach over an empty list makes no
    stage): the benchmark embeds whole splits and every class's text once; the stream embeds
    each arriving batch (``intake``: task key -> task number).

    ``intake`` maps each task key to its number, not to a second copy of the chain: DVC
    reads the whole of params.yaml once per stage that tracks a parameter, so at 100 tasks a
    copied chain cost 20 ms per such stage and 6 s per ``dvc status``. Its paths follow
    ``paths`` in dvc.yaml, as ``task_chain``'s stream entries do."""
    stream = mode_of(dataset_name) == "stream"
    return {
        "embed": [] if stream else ["train", "test"],
        "embed_text": [] if stream else ["all"],
        "intake": {key: entry["task"] for key, entry in chain.items()} if stream else {},
    }


def ledger_tasks(ledger: str) -> int:
    """The number of accepted tasks in the stream's ledger (0 before the first ingest)."""
    import yaml

    path = Path(ledger)
    if not path.exists():
        return 0
    data = yaml.safe_load(path.read_text()) or {}
    return sum(1 for e in data.get("entries", []) if isinstance(e, dict) and e.get("status") == "accepted")
