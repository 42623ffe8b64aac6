"""Update-loop intake throughput: ingest and embed a stream of shapes batches from an S3 API
(moto's server on loopback) against the same batches in a local folder, in one run.

Ingest lists, checks and hashes (the MD5 comes from the S3 ETag, from the bytes for a
folder); embedding streams every image from the source, checks its MD5 and encodes it with
the demo backbone (run `make demo` first). Prints images/s of each, their ratio against the
goals (S3 at least 0.5x the folder for ingest, 0.7x for embedding), and the CPU each image
cost: this process with its loader workers, and moto's server. On a machine with few cores
the S3 figures are bounded by that CPU (moto is a Python server on the same cores), which
the last lines work out.

    python -m benchmarks.stream_throughput [--batches 5] [--workers 2] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from devtools.servers import moto_server
from pipeline import config
from pipeline.clip.backbone import load_backbone
from pipeline.stream.demo import write_demo_batches
from pipeline.stream.images import embed_task
from pipeline.stream.ledger import load_task_manifest
from pipeline.stream.s3 import S3_MAX_POOL_CONNECTIONS, s3_client
from pipeline.stream.sources import open_source

GOALS = {"ingest": 0.5, "embed": 0.7}


def _upload(folder: Path, endpoint: str, bucket: str) -> int:
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    files = [p for p in folder.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(S3_MAX_POOL_CONNECTIONS) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"src/{p.relative_to(folder)}", Body=p.read_bytes()), files))
    return len(files)


class CpuClock:
    """CPU seconds of this process and its reaped children (the DataLoader workers), and of
    the S3 server process when there is one."""

    def __init__(self, server: psutil.Process | None = None):
        self.server = server

    def read(self) -> tuple[float, float]:
        own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))
        if self.server is None:
            return own, 0.0
        times = self.server.cpu_times()
        return own, times.user + times.system


def _timed(clock: CpuClock, fn):
    wall, (own, server) = time.perf_counter(), clock.read()
    result = fn()
    own_after, server_after = clock.read()
    return result, {"seconds": time.perf_counter() - wall, "client_cpu": own_after - own, "server_cpu": server_after - server}


def _intake(source, root: Path, backbone, args, clock: CpuClock) -> dict[str, dict[str, float]]:
    entries, ingest = _timed(clock, lambda: ingest(source, root / "ledger.yaml", root / "tasks"))
    tasks = [e["task"] for e in entries if e["status"] == "accepted"]

    def embed_all() -> int:
        images = 0
        for task in tasks:
            manifest = load_task_manifest(root / "tasks", task)
            for split in ("train", "test"):
                index = embed_task(source, manifest, split, backbone, root / "embeddings" / f"task-{task:02d}" / split,
                                          batch_size=args.batch_size, num_workers=args.workers, progress=False)
                images += index["n_samples"]
        return images

    images, embed = _timed(clock, embed_all)
    results = {}
    for step, measured in (("ingest", ingest), ("embed", embed)):
        results[step] = {
            "rate": images / measured["seconds"],
            "client_ms": 1000 * measured["client_cpu"] / images,
            "server_ms": 1000 * measured["server_cpu"] / images,
        }
    return {"tasks": len(tasks), "images": images, **results}


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
    with tempfile.TemporaryDirectory() as tmp, moto_server(tmp) as endpoint:
        tmp = Path(tmp)
        server = next(p for p in psutil.Process().children(recursive=True) if "moto_server" in " ".join(p.cmdline()))
        write_demo_batches(cfg, tmp / "folder", n_batches=args.batches, flat=True)
        start = time.perf_counter()
        n_files = _upload(tmp / "folder", endpoint, "bench")
        print(f"uploaded {n_files} objects to the loopback S3 server in {time.perf_counter() - start:.1f} s (not timed below)")
        results = {
            "folder": _intake(open_source(str(tmp / "folder")), tmp / "from-folder", backbone, args, CpuClock()),
            "s3": _intake(open_source("s3://bench/src", endpoint), tmp / "from-s3", backbone, args, CpuClock(server)),
        }
    f, s = results["folder"], results["s3"]
    cores = len(os.sched_getaffinity(0))
    print(f"{f['tasks']} tasks, {f['images']} images; {args.workers} loader workers, batch {args.batch_size}; "
          f"{cores} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print("| step | local folder (images/s) | S3 API on loopback (images/s) | S3 / folder | goal "
          "| CPU ms per image, folder | CPU ms per image, S3 (client + server) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for step in ("ingest", "embed"):
        ratio = s[step]["rate"] / f[step]["rate"]
        verdict = "met" if ratio >= GOALS[step] else "missed"
        print(f"| {step} | {f[step]['rate']:.0f} | {s[step]['rate']:.0f} | {ratio:.2f} | >= {GOALS[step]} ({verdict}) "
              f"| {f[step]['client_ms']:.2f} | {s[step]['client_ms']:.2f} + {s[step]['server_ms']:.2f} |")
    # With every core busy, images/s cannot exceed cores / CPU seconds per image: the S3
    # path's ceiling relative to the folder, whatever the overlap.
    for step in ("ingest", "embed"):
        folder_cpu = f[step]["client_ms"]
        s3_cpu = s[step]["client_ms"] + s[step]["server_ms"]
        print(f"{step}: CPU per image S3 / folder = {s3_cpu / folder_cpu:.2f}, so on a CPU-bound machine "
              f"S3 / folder <= {folder_cpu / s3_cpu:.2f}")


if __name__ == "__main__":
    main()
