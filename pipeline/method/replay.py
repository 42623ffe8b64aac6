"""Synthetic replay, drawn fresh from the generators of every seen class (design 2C).

Nothing synthetic is stored. Task ``k``'s *generator index* names the generator file of
every task up to ``k`` with its content hash: task ``k-1``'s index plus task ``k``'s own
entry, so adding a task writes one small file, and a changed earlier generator changes
every later index (DVC re-runs what follows it). Storage per task is that task's own
generators and state, whatever the number of tasks.

Every epoch of prompt learning draws ``per_class`` samples of every seen class from its
generator, seeded by (seed, task, epoch, class): a run is reproducible, and each epoch sees
new samples, as the reference does (mammoth e75a491,
``models/cgil_utils/cgil_utils.py:140-171``: 256 fresh samples per class per epoch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.io import file_digest, read_json, write_json
from pipeline.method.generators import Bank, load_bank

INDEX_FORMAT = 1


class ReplayError(UserError):
    """A generator index or a generator file it names cannot be used; names the file."""


def write_empty_index(path: str | Path) -> None:
    """Task 0's index: no generator yet."""
    write_json(path, {"format": INDEX_FORMAT, "task": 0, "generators": []})


def read_index(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ReplayError(f"{path}: no generator index (run that task's replay step)")
    index = read_json(path)
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ReplayError(f"{path}: not a generator index of format {INDEX_FORMAT} (re-run the replay steps)")
    return index


def extend_index(previous_path: str | Path, task: int, bank_path: str | Path, expected_classes: list[int], out: str | Path) -> dict:
    """Task ``task``'s index: the previous task's entries plus this task's generator file,
    checked to hold a generator of every class of the task."""
    previous = read_index(previous_path)
    if previous["task"] != task - 1:
        raise ReplayError(f"{previous_path}: index of task {previous['task']}, expected task {task - 1}")
    bank_path = Path(bank_path)
    bank = load_bank(bank_path)
    missing = sorted(set(expected_classes) - set(bank.class_ids))
    if missing:
        raise ReplayError(f"task {task}: generator bank {bank_path} has no generator for class(es) {missing}")
    entry = {"task": task, "path": bank_path.as_posix(), "sha256": file_digest(bank_path), "class_ids": bank.class_ids}
    index = {"format": INDEX_FORMAT, "task": task, "generators": [*previous["generators"], entry]}
    write_json(out, index)
    return index


def epoch_seed(seed: int, task: int, epoch: int) -> int:
    """The seed of one epoch's draw; a class's samples then come from its own stream of it."""
    digest = hashlib.sha256(f"replay/{seed}/{task}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


@dataclass
class ReplaySampler:
    """Draws a fresh class-balanced epoch from the generators an index names."""

    banks: list[Bank]
    per_class: int
    seed: int
    task: int

    @classmethod
    def from_index(cls, index_path: str | Path, seen: list[int], per_class: int, seed: int, task: int) -> "ReplaySampler":
        """Every generator file the index names, each checked against its recorded hash,
        together covering exactly the seen classes."""
        index = read_index(index_path)
        banks = []
        for entry in index["generators"]:
            path = Path(entry["path"])
            if not path.exists():
                raise ReplayError(f"{index_path}: task {entry['task']}'s generators {path} are missing (dvc pull or re-run them)")
            if file_digest(path) != entry["sha256"]:
                raise ReplayError(
                    f"{index_path}: task {entry['task']}'s generators {path} changed since the index was written "
                    "(re-run the replay steps from that task on: dvc repro)"
                )
            banks.append(load_bank(path))
        covered = sorted(c for bank in banks for c in bank.class_ids)
        if covered != sorted(seen):
            raise ReplayError(f"{index_path}: the generators cover classes {covered}, not the seen classes {sorted(seen)}")
        return cls(banks, per_class, seed, task)

    def draw(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` fresh samples of every seen class, shuffled."""
        seed = epoch_seed(self.seed, self.task, epoch)
        parts = [bank.sample(self.per_class, seed=seed) for bank in self.banks]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        return x[order], y[order]

    def digest(self) -> str:
        """What the draws are determined by (with the seed, which the lineage holds)."""
        parts = [f"{c}:{bank.kind}" for bank in self.banks for c in bank.class_ids]
        tensors = hashlib.sha256()
        for bank in self.banks:
            for key in sorted(bank.tensors):
                tensors.update(key.encode())
                tensors.update(bank.tensors[key].float().contiguous().numpy().tobytes())
        return hashlib.sha256(("|".join(parts) + f"|{self.per_class}|" + tensors.hexdigest()).encode()).hexdigest()
