"""`recall ingest`: every ready batch the ledger lacks, judged and appended in order.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.data.prepare import DataError
from pipeline.io import atomic_path
from pipeline.stream.ledger import (
    MAX_APPEND_ATTEMPTS,
    EntryTaken,
    Record,
    ledger_text,
    manifest_text,
    open_ledger_store,
    read_ledger,
    task_manifest_path,
    write_once,
)
from pipeline.stream.s3 import LISTINGS_IN_FLIGHT, endpoint_label
from pipeline.stream.scan import BatchScan, scan_batch
from pipeline.stream.sources import READY_MARKER, open_source, ordered_map

log = logging.getLogger(__name__)


def judge(scan: BatchScan, earlier: list[dict[str, Any]], source) -> Record:
    """The ledger entry for a scanned batch, given the entries before it."""
    problems = list(scan.problems)
    owner = {}
    for entry in earlier:
        if entry.get("status") == "accepted":
            for name in entry.get("classes", []):
                owner[name.casefold()] = entry
    for name in scan.classes:
        if name.casefold() in owner:
            held = owner[name.casefold()]
            problems.append(f"class {name!r} is already task {held['task']}'s (batch {held['batch']!r})")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entry: dict[str, Any] = {"batch": scan.batch}
    if problems:
        entry["status"] = "rejected"
    else:
        entry["status"] = "accepted"
        entry["task"] = 1 + sum(e.get("status") == "accepted" for e in earlier)
    if scan.classes:
        entry["classes"] = list(scan.classes)
        entry["counts"] = {name: dict(counts) for name, counts in scan.counts.items()}
    entry["source"] = scan.uri
    if scan.digest:
        entry["digest"] = scan.digest
    entry["ingested_at"] = now
    if problems:
        entry["reason"] = "; ".join(problems)
        return Record(entry)
    first_id = sum(len(e.get("classes", [])) for e in earlier if e.get("status") == "accepted")
    manifest = {
        "task": entry["task"],
        "batch": scan.batch,
        "source": source.uri,
        "endpoint_url": endpoint_label(source.endpoint_url) if source.endpoint_url else None,
        "classes": list(scan.classes),
        # Global class ids: classes are numbered in the order they arrived.
        "class_ids": list(range(first_id, first_id + len(scan.classes))),
        "digest": scan.digest,
        "files": scan.files,
    }
    return Record(entry, manifest)


def ingest(
    source,
    ledger_path: str | Path,
    tasks_dir: str | Path,
    *,
    test_fraction: float = 0.2,
    store=None,
) -> list[dict[str, Any]]:
    """Append every ready batch not yet in the ledger; return the new entries.

    With a ``store`` (the shared ledger) its entries are the truth: they are read first, each
    new entry is created there only if its number is still free (else re-read and the batch
    judged again as the next entry), and the local ledger file becomes their copy. Task
    manifests are written once; the ledger file is written last, atomically, and only when
    its content changes, so an error on the way leaves it as it was.
    """
    ledger_path = Path(ledger_path)
    records = store.read() if store is not None else [Record(entry) for entry in read_ledger(ledger_path)]
    known = {r.entry["batch"] for r in records}
    new: list[dict[str, Any]] = []
    waiting = [batch for batch in source.batches() if batch not in known]
    # Readiness first, then the listing: a batch listed before its _READY could be partial.
    ready = [batch for batch, ok in zip(waiting, source.exists_many(f"{b}/{READY_MARKER}" for b in waiting)) if ok]
    # Batches are listed LISTINGS_IN_FLIGHT at a time, a few ahead of the one being judged;
    # judging and appending stay one batch at a time, in order.
    with ThreadPoolExecutor(LISTINGS_IN_FLIGHT, thread_name_prefix="scan") as pool:
        scans = ordered_map(lambda b: scan_batch(source, b, test_fraction), ready, pool, LISTINGS_IN_FLIGHT)
        for batch, scan in zip(ready, scans):
            if batch not in known:
                records, record = _append(scan, records, source, store)
                if record is not None:
                    new.append(record.entry)
                known = {r.entry["batch"] for r in records}

    for record in records:
        if record.manifest is not None:
            path = task_manifest_path(tasks_dir, record.manifest["task"])
            write_once(path, manifest_text(record.manifest), f"task manifest of task {record.manifest['task']}")
    text = ledger_text([r.entry for r in records])
    if not ledger_path.exists() or ledger_path.read_text() != text:
        with atomic_path(ledger_path) as tmp:
            tmp.write_text(text)
    return new


def _append(scan: BatchScan, records: list[Record], source, store) -> tuple[list[Record], Record | None]:
    """Judge a scanned batch as the next entry and append it (to ``store`` first, if any);
    return the records, re-read if another ingest appended meanwhile, and the new record
    (None when another ingest took this very batch)."""
    batch = scan.batch
    for _ in range(MAX_APPEND_ATTEMPTS):
        record = judge(scan, [r.entry for r in records], source)
        if store is None:
            break
        try:
            store.create(len(records) + 1, record)
            break
        except EntryTaken:
            log.info("ledger entry %d was taken by another ingest; re-reading", len(records) + 1)
            records = store.read()
            if any(r.entry["batch"] == batch for r in records):
                return records, None
    else:
        raise DataError(f"{store.uri}: could not append batch {batch!r} after {MAX_APPEND_ATTEMPTS} tries")
    log.info("%s: %s", batch, record.entry["status"])
    return [*records, record], record


def ingest_from_config(cfg) -> list[dict[str, Any]]:
    """``recall ingest``: the configured stream source into paths.ledger and paths.tasks."""
    from pipeline.config import ConfigError, StreamDataset

    dataset = cfg.dataset
    if not isinstance(dataset, StreamDataset):
        raise ConfigError(f"recall ingest needs dataset=stream (the dataset is {dataset.name!r})")
    store = open_ledger_store(dataset.ledger_uri, dataset.endpoint_url) if dataset.ledger_uri else None
    source = open_source(dataset.source, dataset.endpoint_url)
    return ingest(source, cfg.paths.ledger, cfg.paths.tasks, test_fraction=dataset.test_fraction, store=store)
