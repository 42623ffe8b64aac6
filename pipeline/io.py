"""Atomic file and folder writes, and content hashes.

Every output is written under a temporary name beside its target and renamed into place,
so an interrupted step never leaves a file that a rerun would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline.errors import UserError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed earlier run: nothing reads them, so they only take space.
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class CorruptArtifactError(UserError):
    """A file a step reads exists but cannot be parsed: truncated, overwritten or
    half-copied. The message names the file, the DVC stage that writes it and how to
    rebuild it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.stage = producing_stage(self.path)
        if self.stage:
            fix = f"it is an output of stage {self.stage!r}; rebuild it with `dvc repro -f {self.stage}`"
        else:
            fix = "rebuild it with `dvc repro -f <stage>` for the stage that outputs it (`dvc stage list` names them)"
        super().__init__(f"{path}: corrupt or truncated ({reason}); {fix}")


def _dvc_root(start: Path) -> Path | None:
    if env := os.environ.get("DVC_ROOT"):
        return Path(env).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return None


def producing_stage(path: str | Path) -> str | None:
    """The DVC stage (``name`` or ``name@key``) whose output is ``path`` or a folder above
    it: from dvc.lock (written as each stage runs: cheap and exact), else DVC's own reading
    of dvc.yaml (params interpolated, foreach expanded); None if neither says."""
    path = Path(path).resolve()
    root = _dvc_root(path.parent)
    if root is None:
        return None
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None

    def covers(out: str) -> bool:
        out_path = Path(out)
        return relative == out_path or out_path in relative.parents

    try:
        import yaml

        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
        for stage, entry in (lock.get("stages") or {}).items():
            if any(covers(out.get("path", "")) for out in entry.get("outs") or []):
                return stage
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            for stage in repo.index.stages:
                if any(covers(str(Path(out.def_path))) for out in stage.outs):
                    return stage.addressing
    except Exception:  # noqa: BLE001 - only a hint for an error message already being raised
        pass
    return None


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptArtifactError(path, f"not valid JSON: {exc.msg} at line {exc.lineno}") from None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its content: safetensors keeps
    metadata in a hash map, so its order (and the file's hash, which DVC compares to decide
    what re-runs) would otherwise change from one identical run to the next."""
    from safetensors.torch import save

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = save(contiguous, metadata=metadata)
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data that follows to 8 bytes
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little"))
            handle.write(text)
            handle.write(blob[8 + length :])


def _safetensors_reason(exc: Exception) -> str:
    return f"not a readable safetensors file: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise CorruptArtifactError(path, _safetensors_reason(exc)) from None


def read_tensor_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as exc:
        raise CorruptArtifactError(path, _safetensors_reason(exc)) from None


def file_digest(path: str | Path, algorithm: str = "sha256", block: int = 1 << 20) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")
