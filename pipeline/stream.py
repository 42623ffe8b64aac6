"""The update loop's input: batches of new classes in a folder or an S3 prefix.

Layout (design section 6)::

    <source>/<batch>/<class name>/<image>                    hash split into train/test
    <source>/<batch>/train/<class name>/<image>  +  <batch>/test/<class name>/<image>
    <source>/<batch>/_READY                                   written last by the producer

A class folder's name is the class name with ``_`` read as a space. ``recall ingest``
takes every ready batch that the ledger does not have yet, in the sort order of the batch
names, validates it and appends one ledger entry: an accepted batch becomes the next task
(and gets a task manifest listing its files with their MD5), a rejected one is recorded
with its reason. With ``dataset.ledger_uri`` the authoritative ledger is one object per
entry in a bucket (or folder), each created only if absent, so two ingests running at once
can never both write entry k; the local ``ledger.yaml`` is its copy.

Region and credentials come only from the standard AWS environment and config chain;
no message here ever carries a credential.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import urllib.parse
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml
from torch.utils.data import Dataset

from pipeline.data.prepare import IMAGE_EXTENSIONS, DataError
from pipeline.errors import Unavailable
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

READY_MARKER = "_READY"
SPLIT_FOLDERS = ("train", "test")
LEDGER_VERSION = 1

# Bounded retries (botocore's "standard" mode: throttling, 5xx, connection resets) and
# short timeouts, so an unreachable endpoint fails in seconds instead of minutes. botocore
# reads max_attempts as the retries after the first attempt: 4 attempts in all.
S3_MAX_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 3
S3_READ_TIMEOUT_S = 20
# An S3 request costs a round trip and little bandwidth, so one source keeps this many
# GETs and HEADs in flight (per process: each DataLoader worker has its own), and ingest
# lists this many batches at once (ListObjectsV2 pages one prefix sequentially).
S3_REQUESTS_IN_FLIGHT = 16
LISTINGS_IN_FLIGHT = 4
# Sized so that no request waits for (or throws away) a connection.
S3_MAX_POOL_CONNECTIONS = S3_REQUESTS_IN_FLIGHT + LISTINGS_IN_FLIGHT
# Each lost race for an entry means another ingest appended one; more than this many in a
# row means something else is wrong with the ledger store.
MAX_APPEND_ATTEMPTS = 50


class SourceError(DataError):
    """A source (or ledger store) that cannot be used at all; names bucket and endpoint."""


class SourceUnreachable(SourceError, Unavailable):
    """The S3 endpoint does not answer: it may be back in a minute (exit 75, retried by the
    flows), unlike a missing bucket or refused credentials."""


class EntryTaken(Exception):
    """The ledger entry we tried to create exists already: another ingest got there first."""


@dataclass(frozen=True)
class SourceObject:
    """One object under a source: ``key`` is relative to the source root, '/'-separated.

    ``md5`` is the hex MD5 of its bytes when the listing gives it for free (an S3 ETag of a
    single-part upload), else None. A key ending in '/' is a folder (S3 folder marker, or an
    empty local folder), listed so that an empty class can be told apart from no class.
    """

    key: str
    size: int
    md5: str | None = None


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], executor: Executor, window: int) -> Iterator[Any]:
    """``fn(item)`` for each item, run on ``executor`` and yielded in the items' order, with
    at most ``window`` results running or waiting (bounded memory on a long list). The first
    failure in that order is raised where its result would have been; the calls not yet
    started are cancelled."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


# --------------------------------------------------------------------------- sources


def open_source(uri: str, endpoint_url: str | None = None):
    """A FolderSource for a path (or file:// URI), an S3Source for ``s3://bucket/prefix``.

    An S3 source is checked at once (one small listing), so a missing bucket, an endpoint
    that does not answer or refused credentials is one SourceError here.
    """
    if uri.startswith("s3://"):
        source = S3Source(uri, endpoint_url)
        source.check()
        return source
    if "://" in uri and not uri.startswith("file://"):
        raise SourceError(f"{uri}: unsupported source; use a folder or s3://bucket/prefix")
    return FolderSource(uri.removeprefix("file://"))


class FolderSource:
    """Batches in a local (or mounted) folder."""

    endpoint_url = None

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: stream source folder does not exist (dataset.source)")

    def batch_uri(self, batch: str) -> str:
        return f"{self.root / batch}/"

    def key_uri(self, key: str) -> str:
        return str(self.root / key)

    def batches(self) -> list[str]:
        # Dot-names are temporary or hidden folders, never a producer's batch.
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list_batch(self, batch: str) -> list[SourceObject]:
        base = self.root / batch
        found = []
        for folder, dirs, files in os.walk(base, onerror=_raise):
            rel = Path(folder).relative_to(self.root).as_posix()
            if not dirs and not files and folder != str(base):
                found.append(SourceObject(f"{rel}/", 0))
            for name in files:
                path = Path(folder) / name
                found.append(SourceObject(f"{rel}/{name}", path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.key_uri(key)}: no longer in the source (deleted since ingest?)") from None

    def md5(self, obj: SourceObject) -> str:
        return hashlib.md5((self.root / obj.key).read_bytes()).hexdigest()

    # A local read has no round trip to hide: the many-key forms are plain loops.
    def read_many(self, keys: Iterable[str]) -> Iterator[bytes]:
        return map(self.read, keys)

    def md5s(self, objects: list[SourceObject]) -> list[str]:
        return [self.md5(obj) for obj in objects]

    def exists_many(self, keys: Iterable[str]) -> list[bool]:
        return [self.exists(key) for key in keys]


def _raise(error: OSError) -> None:
    raise error


class S3Source:
    """Batches under ``s3://bucket/prefix``, through boto3 (any S3-compatible endpoint)."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self.endpoint_url = resolve_endpoint(endpoint_url)
        self._client = None
        self._client_pid = None
        self._pool = None
        self._pool_pid = None

    # A boto3 client and a thread pool must not cross a fork (DataLoader workers), nor be
    # pickled (dask workers). One client serves every thread: boto3 clients are thread-safe.
    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_client_pid": None, "_pool": None, "_pool_pid": None}

    @property
    def client(self):
        if self._client is None or self._client_pid != os.getpid():
            self._client = s3_client(self.endpoint_url)
            self._client_pid = os.getpid()
        return self._client

    def _map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``fn`` over ``items`` with S3_REQUESTS_IN_FLIGHT at a time, results in order.
        ``fn`` must not itself wait on this pool (it would deadlock when the pool is full)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(S3_REQUESTS_IN_FLIGHT, thread_name_prefix="s3-read")
            self._pool_pid = os.getpid()
        self.client  # made once here, not raced for by the pool's threads
        return ordered_map(fn, items, self._pool, S3_REQUESTS_IN_FLIGHT)

    def batch_uri(self, batch: str) -> str:
        return f"{self.uri}{batch}/"

    def key_uri(self, key: str) -> str:
        return f"{self.uri}{key}"

    def check(self) -> None:
        self._call(lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1))

    def batches(self) -> list[str]:
        names = []
        for page in self._pages(Prefix=self.prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.append(common["Prefix"][len(self.prefix) :].rstrip("/"))
        return sorted(names)

    def exists(self, key: str) -> bool:
        try:
            self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=self.prefix + key), missing_ok=True)
        except _Missing:
            return False
        return True

    def list_batch(self, batch: str) -> list[SourceObject]:
        found = []
        for page in self._pages(Prefix=f"{self.prefix}{batch}/"):
            for item in page.get("Contents", []):
                etag = item.get("ETag", "").strip('"')
                # A multipart upload's ETag is not the MD5 of the bytes ("<md5 of md5s>-<parts>").
                md5 = etag if re.fullmatch(r"[0-9a-f]{32}", etag) else None
                found.append(SourceObject(item["Key"][len(self.prefix) :], int(item["Size"]), md5))
        return sorted(found, key=lambda o: o.key)

    def read(self, key: str) -> bytes:
        try:
            response = self._call(
                lambda: self.client.get_object(Bucket=self.bucket, Key=self.prefix + key), missing_ok=True
            )
        except _Missing:
            raise DataError(f"{self.key_uri(key)}: no longer in the source (deleted since ingest?)") from None
        return response["Body"].read()

    def md5(self, obj: SourceObject) -> str:
        return obj.md5 or hashlib.md5(self.read(obj.key)).hexdigest()

    def read_many(self, keys: Iterable[str]) -> Iterator[bytes]:
        """The bytes of each key, in order, fetched concurrently (each read as ``read``)."""
        return self._map(self.read, keys)

    def md5s(self, objects: list[SourceObject]) -> list[str]:
        """``md5`` of each object, in order; only those without an MD5 ETag are read."""
        unread = [obj.key for obj in objects if not obj.md5]
        hashed = dict(zip(unread, (hashlib.md5(data).hexdigest() for data in self.read_many(unread))))
        return [obj.md5 or hashed[obj.key] for obj in objects]

    def exists_many(self, keys: Iterable[str]) -> list[bool]:
        return list(self._map(self.exists, keys))

    def _pages(self, **kwargs):
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, **kwargs))
        while True:
            try:
                page = self._call(lambda: next(pages))
            except StopIteration:
                return
            yield page

    def _call(self, fn: Callable[[], Any], missing_ok: bool = False):
        return call_s3(fn, bucket=self.bucket, endpoint_url=self.endpoint_url, missing_ok=missing_ok)


class _Missing(Exception):
    """A key that does not exist (404 on a key, not on the bucket)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix), the prefix empty or ending in '/'."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SourceError(f"{uri}: not an S3 URI; expected s3://bucket/prefix")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parsed.netloc, prefix


def resolve_endpoint(endpoint_url: str | None) -> str | None:
    """The explicit endpoint, else the AWS environment's (as boto3 itself would read it)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def endpoint_label(endpoint_url: str | None) -> str:
    """An endpoint for messages and manifests: any user:password@ part dropped."""
    if not endpoint_url:
        return "the AWS default S3 endpoint"
    parsed = urllib.parse.urlsplit(endpoint_url)
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def s3_client(endpoint_url: str | None):
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        max_pool_connections=S3_MAX_POOL_CONNECTIONS,
    )
    # Region and credentials: the standard chain only (env, AWS_PROFILE, ~/.aws, roles).
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}


def call_s3(fn: Callable[[], Any], *, bucket: str, endpoint_url: str | None, missing_ok: bool = False):
    """Run one S3 call; whatever makes the bucket unusable becomes one SourceError.

    Messages are built from error codes, never from request data, so no credential can
    reach them.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError as BotoConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = f"bucket {bucket!r} at {endpoint_label(endpoint_url)}"
    try:
        return fn()
    except (BotoConnectionError, HTTPClientError) as exc:
        raise SourceUnreachable(
            f"S3 endpoint {endpoint_label(endpoint_url)} does not answer ({type(exc).__name__}) for bucket "
            f"{bucket!r}; "
            "check dataset.endpoint_url or AWS_ENDPOINT_URL and that the server is running and reachable"
        ) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise SourceError(
            f"no usable AWS credentials for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE in the environment (never in the repo)"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise SourceError(
                f"{where}: the bucket does not exist; create it, or fix the bucket name in the URI "
                "(and the endpoint if it is on another server)"
            ) from None
        if missing_ok and (code in {"NoSuchKey", "404"} or status == 404):
            raise _Missing() from None
        if code in _CREDENTIAL_CODES or status == 403:
            raise SourceError(
                f"{where}: the credentials were refused ({code or status}); check AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment and the bucket policy"
            ) from None
        message = exc.response.get("Error", {}).get("Message", "")
        if code in {"", str(status)}:
            # A bare HTTP status with no S3 error document: not an S3 API answering.
            raise SourceError(
                f"{where}: HTTP {status} without an S3 error; is {endpoint_label(endpoint_url)} an S3 "
                "endpoint (check dataset.endpoint_url / AWS_ENDPOINT_URL, and any proxy in between)?"
            ) from None
        raise SourceError(f"{where}: S3 error {code or status}: {message}") from None
    except BotoCoreError as exc:  # e.g. an invalid bucket name; never carries credentials
        raise SourceError(f"{where}: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- scanning a batch


@dataclass
class BatchScan:
    """What a batch holds, and what is wrong with it regardless of earlier tasks."""

    batch: str
    uri: str
    classes: list[str] = field(default_factory=list)
    folders: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    digest: str | None = None
    problems: list[str] = field(default_factory=list)


def class_name(folder: str) -> str:
    return " ".join(folder.replace("_", " ").split())


def is_image_key(key: str) -> bool:
    return not key.endswith("/") and os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def scan_batch(source, batch: str, test_fraction: float) -> BatchScan:
    """List one batch, read its classes and assign each image to train or test.

    Without a train/test level, the test images of a class are the ``n_test`` with the
    smallest MD5 of their bytes (ties by key), with n_test = floor(fraction * n + 0.5)
    clamped to 1..n-1: content decides, so the split is the same on every machine, on
    re-ingest and under renamed keys, and every class of 2 or more images gets both.
    """
    scan = BatchScan(batch=batch, uri=source.batch_uri(batch))
    try:
        listing = source.list_batch(batch)
    except SourceError:
        raise
    except (OSError, DataError) as exc:
        scan.problems.append(f"listing unreadable: {exc}")
        return scan

    top = {obj.key.split("/")[1] for obj in listing if obj.key.count("/") >= 2 or obj.key.endswith("/")} - {""}
    explicit = bool(top & set(SPLIT_FOLDERS))
    if explicit and top - set(SPLIT_FOLDERS):
        scan.problems.append(
            f"mixes train/test folders with class folders {sorted(top - set(SPLIT_FOLDERS))}; use one layout"
        )
        return scan
    depth = 4 if explicit else 3  # batch / [split /] class / image

    # (split or None, folder) -> [(key, md5, size)]
    images: dict[tuple[str | None, str], list[tuple[str, str, int]]] = {}
    misplaced = []
    digest_lines = []
    placed = []
    for obj in listing:
        parts = obj.key.rstrip("/").split("/")
        # A class folder exists once anything is in it, so one without images is "empty".
        if len(parts) >= depth - 1 and (len(parts) > depth - 1 or obj.key.endswith("/")):
            images.setdefault((parts[1] if explicit else None, parts[depth - 2]), [])
        if not is_image_key(obj.key):
            continue
        if len(parts) != depth:
            misplaced.append(obj.key)
            continue
        placed.append((obj, parts))
    try:
        md5s = source.md5s([obj for obj, _ in placed])
    except SourceError:
        raise
    except (OSError, DataError) as exc:
        scan.problems.append(f"listing unreadable: {exc}")
        return scan
    for (obj, parts), md5 in zip(placed, md5s):
        images.setdefault((parts[1] if explicit else None, parts[-2]), []).append((obj.key, md5, obj.size))
        digest_lines.append(f"{obj.key[len(batch) + 1:]}\t{obj.size}\t{md5}\n")
    scan.digest = "sha256:" + hashlib.sha256("".join(sorted(digest_lines)).encode()).hexdigest()
    if misplaced:
        shown = ", ".join(misplaced[:3]) + (f" and {len(misplaced) - 3} more" if len(misplaced) > 3 else "")
        layout = "<batch>/train|test/<class>/<image>" if explicit else "<batch>/<class>/<image>"
        scan.problems.append(f"images outside the layout {layout}: {shown}")

    folders = sorted({folder for _, folder in images})
    by_name: dict[str, list[str]] = {}
    for folder in folders:
        by_name.setdefault(class_name(folder).casefold(), []).append(folder)
    for same in by_name.values():
        if len(same) > 1:
            scan.problems.append(f"class {class_name(same[0])!r} appears more than once (folders {same})")
    if not folders:
        scan.problems.append("no class folders")

    for folder in folders:
        name = class_name(folder)
        if not name:
            scan.problems.append(f"class folder {folder!r} has no name")
            continue
        scan.classes.append(name)
        scan.folders[name] = [folder]
        if explicit:
            split_images = {split: images.get((split, folder), []) for split in SPLIT_FOLDERS}
        else:
            split_images = _hash_split(images[(None, folder)], test_fraction)
        for split, items in split_images.items():
            for key, md5, size in items:
                scan.files.append({"key": key, "class": name, "split": split, "md5": md5, "size": size})
        scan.counts[name] = {split: len(items) for split, items in split_images.items()}
        n_train, n_test = scan.counts[name]["train"], scan.counts[name]["test"]
        if n_train + n_test == 0:
            scan.problems.append(f"class {name!r} (folder {folder!r}) is empty")
        elif n_train < 2:
            scan.problems.append(f"class {name!r} has {n_train} training image(s); at least 2 are needed")
        elif n_test == 0:
            scan.problems.append(f"class {name!r} has no test images")
    scan.files.sort(key=lambda f: f["key"])
    return scan


def _hash_split(items: list[tuple[str, str, int]], fraction: float) -> dict[str, list[tuple[str, str, int]]]:
    """About ``fraction`` of a class's images to test, chosen by content hash (stable across
    re-ingests and machines). Byte-identical files (one hash) go to the same side, so no
    test image is also a training image; at least one image stays in train."""
    n = len(items)
    if n < 2:
        return {"train": list(items), "test": []}
    n_test = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
    by_hash: dict[str, list[str]] = {}
    for key, md5, _ in items:
        by_hash.setdefault(md5, []).append(key)
    test: set[str] = set()
    for md5 in sorted(by_hash):
        if len(test) >= n_test:
            break
        if len(test) + len(by_hash[md5]) <= n - 1:
            test.update(by_hash[md5])
    return {
        "train": [item for item in items if item[0] not in test],
        "test": [item for item in items if item[0] in test],
    }


# --------------------------------------------------------------------------- the ledger


@dataclass
class Record:
    """One ledger entry and, for an accepted batch, its task manifest."""

    entry: dict[str, Any]
    manifest: dict[str, Any] | None = None


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
    return Path(tasks_dir) / f"task-{task:02d}.json"


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


# --------------------------------------------------------------------------- shared ledger


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


# --------------------------------------------------------------------------- ingest


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


def load_task_manifest(tasks_dir: str | Path, task: int) -> dict[str, Any]:
    path = task_manifest_path(tasks_dir, task)
    if not path.exists():
        raise DataError(f"{path}: no manifest for task {task} (run `recall ingest`)")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- reading a task's images


class StreamImages(Dataset):
    """One split of a task's images, streamed from the source and decoded like ImageDataset.

    Items are ``(tensor | None, index, error | None)`` for ``embed.collate_images``; a bad
    image is reported, not raised, so ``embed.on_bad_image`` applies. An object whose bytes
    no longer match the MD5 recorded at ingest is a DataError: its task would silently
    change.
    """

    def __init__(self, source, manifest: dict[str, Any], split: str, preprocess):
        if split not in SPLIT_FOLDERS:
            raise DataError(f"task {manifest.get('task')}: unknown split {split!r}; use train or test")
        self.source = source
        self.preprocess = preprocess
        self.classes = list(manifest["classes"])
        self.files = [f for f in manifest["files"] if f["split"] == split]
        label = {name: i for i, name in enumerate(self.classes)}
        self.labels = [label[f["class"]] for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def sample_id(self, index: int) -> str:
        return self.files[index]["key"]

    def __getitem__(self, index: int):
        return self._item(index, self.source.read(self.files[index]["key"]))

    def __getitems__(self, indices: list[int]) -> list:
        """A DataLoader batch: its objects fetched concurrently (``source.read_many``), each
        checked and decoded here, in the batch's order, while later ones are still coming."""
        data = self.source.read_many([self.files[index]["key"] for index in indices])
        return [self._item(index, item) for index, item in zip(indices, data)]

    def _item(self, index: int, data: bytes):
        from pipeline.embed import decode_image

        item = self.files[index]
        if hashlib.md5(data).hexdigest() != item["md5"]:
            raise DataError(
                f"{self.source.key_uri(item['key'])}: changed since ingest (MD5 differs from the task "
                "manifest); upload the changed images as a new batch instead"
            )
        tensor, error = decode_image(io.BytesIO(data), self.preprocess, self.source.key_uri(item["key"]))
        return tensor, index, error


def embed_task(
    source, manifest: dict[str, Any], split: str, backbone, out: str | Path, class_ids: list[int] | None = None, **options
) -> dict[str, Any]:
    """Embed one split of a task's images, streamed from the source (nothing is copied into
    the project), into ``out`` as the benchmark's embeddings are stored. Labels are the
    classes' global ids (``class_ids``, in ``manifest["classes"]`` order; default: their
    positions); the index is keyed by the manifest's digest, so the same task is never
    embedded twice with the same backbone. ``options``: those of ``embed.embed_images``."""
    from pipeline.embed import embed_images

    images = StreamImages(source, manifest, split, backbone.preprocess)
    if not len(images):
        raise DataError(f"task {manifest['task']} ({manifest['batch']}): no {split} images")
    ids = list(class_ids) if class_ids is not None else list(range(len(manifest["classes"])))
    if len(ids) != len(manifest["classes"]):
        raise DataError(f"task {manifest['task']}: {len(ids)} class ids for {len(manifest['classes'])} classes")
    return embed_images(
        images, labels=[ids[label] for label in images.labels], sample_id=images.sample_id, backbone=backbone, out=out,
        key={"task": manifest["task"], "split": split, "task_digest": manifest["digest"], "class_ids": ids},
        n_classes=max(ids) + 1, **options,
    )


# --------------------------------------------------------------------------- demo producer


def write_demo_batches(
    cfg, folder: str | Path, n_batches: int | None = None, only_next: bool = False, flat: bool = False
) -> list[str]:
    """Write the shapes demo world into ``folder`` as batches of classes; return the new batches.

    Batch k holds the classes of the benchmark's task k (same seed, same images), under
    ``batch-NNN/train|test/<class>/`` (or ``<class>/`` with ``flat``: the stream's hash
    split then decides). ``_READY`` is written last. With ``only_next``, one batch per call:
    the one after the highest-numbered batch in the folder.
    """
    from pipeline.data import shapes as shapes_world
    from pipeline.split import make_split

    world = cfg.dataset.shapes
    classes = shapes_world.class_names(world.colors, world.shapes)
    split = make_split(classes, n_batches or cfg.split.n_tasks, cfg.seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    # A producer moves on: --next writes the batch after the last one it wrote, even when
    # consumed batches have since been deleted from the folder.
    last = max((int(p.parent.name.removeprefix("batch-")) for p in folder.glob(f"batch-[0-9][0-9][0-9]/{READY_MARKER}")), default=0)
    for number, task in enumerate(split["tasks"], 1):
        batch = f"batch-{number:03d}"
        if (folder / batch / READY_MARKER).exists() or (only_next and number <= last):
            continue
        for label in task:
            name = classes[label]
            color, shape = name.split(" ", 1)
            for part, count in (("train", world.train_per_class), ("test", world.test_per_class)):
                target = folder / batch / (name.replace(" ", "_") if flat else f"{part}/{name.replace(' ', '_')}")
                target.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    rng = shapes_world.sample_rng(world.seed, part, label, i)
                    image = shapes_world.draw(color, shape, world.image_size, rng, world.noise)
                    image.save(target / f"{part}-{i:05d}.png", optimize=False, compress_level=1)
        (folder / batch / READY_MARKER).write_text("")
        written.append(batch)
        if only_next:
            break
    return written
