"""The S3 client the stream's source, its shared ledger and the DVC remote's check share,
and the one place its failures become messages (naming bucket and endpoint, never a
credential).
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Callable

from pipeline.data.prepare import DataError
from pipeline.errors import Unavailable

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


class SourceError(DataError):
    """A source (or ledger store) that cannot be used at all; names bucket and endpoint."""


class SourceUnreachable(SourceError, Unavailable):
    """The S3 endpoint does not answer: it may be back in a minute (exit 75, retried by the
    flows), unlike a missing bucket or refused credentials."""


class MissingKey(Exception):
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
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
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
            raise MissingKey() from None
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
