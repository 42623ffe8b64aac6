"""The ledger (one entry per batch, append-only, local or shared in a bucket) and the task
manifests it points to.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.task_chain import task_stem
from pipeline.data.prepare import DataError
from pipeline.io import atomic_path
from pipeline.stream.sources import S3Source

LEDGER_VERSION = 1


# Each lost race for an entry means another ingest appended one; more than this many in a
# row means something else is wrong with the ledger store.
MAX_APPEND_ATTEMPTS = 50


class EntryTaken(Exception):
    """The ledger entry we tried to create exists already: another ingest got there first."""


@dataclass
class Record:
    """One ledger entry and, for an accepted batch, its task manifest."""

    entry: dict[str, Any]
    manifest: dict[str, Any] | None = None


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a ledger file; none when it does not exist yet."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: ledger is not valid YAML: {exc}") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "batch" in e and "status" in e for e in entries):
        raise DataError(f"{path}: not a Recall ledger (expected 'entries:', a list of batch entries)")
    return entries


LEDGER_HEADER = (
    "# Recall's ingest ledger: one entry per batch, in the order ingested (recall ingest).\n"
    "# Accepted batches are tasks 1, 2, ...; their files are listed in the task manifests.\n"
)


def ledger_text(entries: list[dict[str, Any]]) -> str:
    body = yaml.safe_dump(
        {"version": LEDGER_VERSION, "entries": entries},
        sort_keys=False, allow_unicode=True, default_flow_style=None, width=100,
    )
    return LEDGER_HEADER + body


def task_manifest_path(tasks_dir: str | Path, task: int) -> Path:
    return Path(tasks_dir) / f"{task_stem(task)}.json"


def manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2) + "\n"


def write_once(path: Path, text: str, what: str) -> bool:
    """Write ``text`` to a new file; leave an identical one untouched; refuse a different one."""
    if path.exists():
        if path.read_text() == text:
            return False
        raise DataError(
            f"{path}: {what} exists with different content; it is never rewritten "
            "(another ledger made it?). Move it away only if you know it is stale."
        )
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def open_ledger_store(uri: str, endpoint_url: str | None = None):
    """The authoritative ledger: S3 (``s3://bucket/prefix``) or a folder, one object per entry."""
    if uri.startswith("s3://"):
        store = S3LedgerStore(uri, endpoint_url)
        store.check()
        return store
    return FolderLedgerStore(uri.removeprefix("file://"))


def entry_name(number: int) -> str:
    return f"entry-{number:06d}.json"


def _parse_entries(named: dict[str, bytes], where: str) -> list[Record]:
    records = []
    for number in range(1, len(named) + 1):
        name = entry_name(number)
        if name not in named:
            raise DataError(f"{where}: ledger entries are not numbered 1..{len(named)}: {name} is missing")
        try:
            data = json.loads(named[name])
            records.append(Record(data["entry"], data.get("manifest")))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where}{name}: not a ledger entry ({exc})") from None
    return records


def _entry_bytes(record: Record) -> bytes:
    return (json.dumps({"entry": record.entry, "manifest": record.manifest}, indent=1) + "\n").encode()


class S3LedgerStore:
    """Entries as ``<prefix>/entry-000001.json``..., each created with If-None-Match: *."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.source = S3Source(uri, endpoint_url)
        self.uri = self.source.uri

    def check(self) -> None:
        self.source.check()

    def read(self) -> list[Record]:
        names = []
        for page in self.source._pages(Prefix=self.source.prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(self.source.prefix) :]
                if re.fullmatch(r"entry-\d{6}\.json", name):
                    names.append(name)
        return _parse_entries(dict(zip(names, self.source.read_many(names))), self.uri)

    def create(self, number: int, record: Record) -> None:
        from botocore.exceptions import ClientError

        key = self.source.prefix + entry_name(number)

        def put():
            try:
                return self.source.client.put_object(
                    Bucket=self.source.bucket, Key=key, Body=_entry_bytes(record),
                    ContentType="application/json", IfNoneMatch="*",
                )
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                # 412: the entry exists; 409: another conditional write of it is in flight.
                if code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                    raise EntryTaken(f"{self.uri}{entry_name(number)}") from None
                raise

        self.source._call(put)


class FolderLedgerStore:
    """Entries as files; created with a hard link, which fails if the name exists."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        self.uri = f"{self.folder}/"

    def read(self) -> list[Record]:
        if not self.folder.is_dir():
            return []
        named = {p.name: p.read_bytes() for p in self.folder.glob("entry-*.json") if re.fullmatch(r"entry-\d{6}\.json", p.name)}
        return _parse_entries(named, self.uri)

    def create(self, number: int, record: Record) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / entry_name(number)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(_entry_bytes(record))
            # A complete file appears under the entry's name, or nothing does.
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise EntryTaken(str(target)) from None
        finally:
            os.unlink(tmp)


def load_task_manifest(tasks_dir: str | Path, task: int) -> dict[str, Any]:
    path = task_manifest_path(tasks_dir, task)
    if not path.exists():
        raise DataError(f"{path}: no manifest for task {task} (run `recall ingest`)")
    return json.loads(path.read_text())
