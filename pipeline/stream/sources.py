"""Where batches land: a folder or an S3 prefix, read the same way (list, stat, read).
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.data.prepare import DataError
from pipeline.stream.s3 import S3_REQUESTS_IN_FLIGHT, MissingKey, SourceError, call_s3, parse_s3_uri, resolve_endpoint, s3_client

READY_MARKER = "_READY"


SPLIT_FOLDERS = ("train", "test")


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
        except MissingKey:
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
        except MissingKey:
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
