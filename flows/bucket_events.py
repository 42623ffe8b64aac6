"""Turn S3/MinIO bucket notifications into Prefect events (self-hosted Prefect has no webhooks).

Point the bucket's notification webhook (MinIO: ``mc event add ... --event put`` on a
webhook target; S3: through SNS/EventBridge to an HTTP endpoint) at this receiver. Each
upload of a batch's ``_READY`` marker under ``<prefix>/<batch>/_READY`` becomes a
``recall.batch.ready`` event on resource ``recall.source.<bucket>/<prefix>``, which
prefect.yaml's trigger turns into a ``recall-update/scheduled`` flow run for that source.
Other objects are ignored: a batch is ready only once its marker is there.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.bucket_events --port 8787

Binds to loopback unless ``--host`` says otherwise. With RECALL_EVENTS_TOKEN set, a POST
must carry ``Authorization: Bearer <token>`` (MinIO's webhook ``auth_token``).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

READY_MARKER = "_READY"
EVENT_NAME = "recall.batch.ready"


def ready_batches(notification: dict[str, Any]) -> list[dict[str, str]]:
    """The batches a notification reports ready: one dict (bucket, prefix, batch, source)
    per created ``<prefix>/<batch>/_READY`` object."""
    batches = []
    for record in notification.get("Records") or []:
        if "ObjectCreated" not in str(record.get("eventName", "")):
            continue
        s3 = record.get("s3") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        # Keys arrive URL-encoded (spaces as '+').
        key = urllib.parse.unquote_plus((s3.get("object") or {}).get("key", ""))
        parts = key.strip("/").split("/")
        if not bucket or len(parts) < 2 or parts[-1] != READY_MARKER:
            continue
        prefix, batch = "/".join(parts[:-2]), parts[-2]
        source = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        batches.append({"bucket": bucket, "prefix": prefix, "batch": batch, "source": source})
    return batches


def emit_ready(batch: dict[str, str]) -> None:
    from prefect.events import emit_event

    emit_event(
        event=EVENT_NAME,
        resource={
            "prefect.resource.id": f"recall.source.{batch['source'].removeprefix('s3://')}",
            "recall.source": batch["source"],
            "recall.batch": batch["batch"],
        },
    )


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        token = os.environ.get("RECALL_EVENTS_TOKEN")
        if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
            self.send_error(401, "missing or wrong bearer token")
            return
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            batches = ready_batches(json.loads(body or b"{}"))
        except (ValueError, TypeError) as exc:
            self.send_error(400, f"not a bucket notification: {exc}")
            return
        for batch in batches:
            emit_ready(batch)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # one line per request, no bodies
        print(f"{self.address_string()} {format % args}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    args = parser.parse_args()
    ThreadingHTTPServer((args.host, args.port), _Handler).serve_forever()


if __name__ == "__main__":
    main()
