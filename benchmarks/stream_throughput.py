"""Update-loop intake throughput: ingest and embed a stream of shapes batches from an S3 API
(moto's server on loopback) against the same batches in a local folder, in one run.

Ingest lists, checks and hashes (the MD5 comes from the S3 ETag, from the bytes for a
folder); embedding streams every image from the source, checks its MD5 and encodes it with
the demo backbone (run `make demo` first). Prints images/s of each and their ratio.

    python -m benchmarks.stream_throughput [--batches 5] [--workers 2] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import config, devstack, stream
from pipeline.backbone import load_backbone


def _upload(folder: Path, endpoint: str, bucket: str) -> int:
    client = stream.s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    files = [p for p in folder.rglob("*") if p.is_file()]
    # As many threads as boto3's connection pool holds (10).
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"src/{p.relative_to(folder)}", Body=p.read_bytes()), files))
    return len(files)


def _intake(source, root: Path, backbone, args) -> dict[str, float]:
    start = time.perf_counter()
    entries = stream.ingest(source, root / "ledger.yaml", root / "tasks")
    ingest_seconds = time.perf_counter() - start
    tasks = [e["task"] for e in entries if e["status"] == "accepted"]
    images = 0
    start = time.perf_counter()
    for task in tasks:
        manifest = stream.load_task_manifest(root / "tasks", task)
        for split in ("train", "test"):
            index = stream.embed_task(source, manifest, split, backbone, root / "embeddings" / f"task-{task:02d}" / split,
                                      batch_size=args.batch_size, num_workers=args.workers, progress=False)
            images += index["n_samples"]
    embed_seconds = time.perf_counter() - start
    return {"tasks": len(tasks), "images": images, "ingest": images / ingest_seconds, "embed": images / embed_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    cfg = config.load(args.params)
    backbone = load_backbone(cfg.paths.backbone)
    # Dummy credentials for the loopback server only; nothing reaches a real account.
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with tempfile.TemporaryDirectory() as tmp, devstack.moto_server(tmp) as endpoint:
        tmp = Path(tmp)
        stream.write_demo_batches(cfg, tmp / "folder", n_batches=args.batches, flat=True)
        start = time.perf_counter()
        n_files = _upload(tmp / "folder", endpoint, "bench")
        print(f"uploaded {n_files} objects to the loopback S3 server in {time.perf_counter() - start:.1f} s (not timed below)")
        results = {
            "folder": _intake(stream.open_source(str(tmp / "folder")), tmp / "from-folder", backbone, args),
            "s3": _intake(stream.open_source("s3://bench/src", endpoint), tmp / "from-s3", backbone, args),
        }
    f, s = results["folder"], results["s3"]
    print(f"{f['tasks']} tasks, {f['images']} images; {args.workers} loader workers, batch {args.batch_size}")
    print("| step | local folder (images/s) | S3 API on loopback (images/s) | S3 / folder |")
    print("| --- | --- | --- | --- |")
    for step in ("ingest", "embed"):
        print(f"| {step} | {f[step]:.0f} | {s[step]:.0f} | {s[step] / f[step]:.2f} |")


if __name__ == "__main__":
    main()
