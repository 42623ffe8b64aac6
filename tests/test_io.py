from __future__ import annotations

import subprocess
import sys

import torch

from pipeline.io import read_tensor_metadata, read_tensors, write_tensors

WRITE = """
import sys, torch
from pipeline.io import write_tensors
write_tensors(sys.argv[1], {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(3, dtype=torch.long)},
              metadata={f"key{i}": str(i) for i in range(12)})
"""


def test_identical_content_gives_identical_files_across_processes(tmp_path):
    """DVC decides what re-runs by file hashes: a file rewritten with the same tensors and
    metadata must keep its bytes (safetensors orders metadata by a per-process hash map)."""
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    tensors = read_tensors(paths[0])
    assert torch.equal(tensors["b"], torch.arange(6.0).view(2, 3)) and tensors["a"].dtype == torch.long
    assert read_tensor_metadata(paths[0]) == {f"key{i}": str(i) for i in range(12)}


def test_files_without_metadata_or_tensors_still_read(tmp_path):
    write_tensors(tmp_path / "empty.safetensors", {"x": torch.zeros(0, 4)})
    assert read_tensors(tmp_path / "empty.safetensors")["x"].shape == (0, 4)
    assert read_tensor_metadata(tmp_path / "empty.safetensors") == {}
