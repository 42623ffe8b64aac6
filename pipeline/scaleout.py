"""Scale-out through dask.distributed (design, section 7).

A stage opens ``cluster_client(cfg.cluster)``: ``None`` for ``engine: local`` (the
single-process path), else a ``distributed.Client``, on a ``LocalCluster`` of
``n_workers`` processes, or on the scheduler at ``cluster.address``. Work that scales out
(embedding shards of images, fitting chunks of classes' generators) is written as plain
per-shard functions; ``map_shards`` runs them on the cluster, ``run_shards`` picks the
cluster or a plain in-process loop, so both paths call the same code and give the same
numbers. The stage still writes its one output from the driver.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)


def torch_threads_plugin(threads: int):
    """A worker plugin setting torch threads to ``threads`` on every worker, including
    ones that join a real cluster later. (distributed is imported only when a stage
    scales out: it costs half a second.)"""
    from distributed.diagnostics.plugin import WorkerPlugin

    class TorchThreads(WorkerPlugin):
        name = "recall-torch-threads"

        def __init__(self, threads: int):
            self.threads = threads

        def setup(self, worker) -> None:
            import torch

            from pipeline.compat import import_torchvision

            # Up front, through the project's import fix: tasks' arguments (image
            # transforms) unpickle torchvision, whose plain import can fail here.
            import_torchvision()

            torch.set_num_threads(self.threads)

    return TorchThreads(threads)


@contextmanager
def cluster_client(settings) -> Iterator[Any]:
    """``None`` for ``engine: local``; otherwise a ``distributed.Client`` for the stage.

    ``settings``: ``config.ClusterConfig``. With ``address``, connect to that scheduler
    (its workers must run this project's package and read the paths the stage passes);
    without, start a ``LocalCluster`` of ``n_workers`` processes and close it afterwards.
    """
    if settings is None or settings.engine == "local":
        yield None
        return
    from distributed import Client, LocalCluster

    threads = settings.threads_per_worker
    if settings.address:
        log.info("dask: connecting to the scheduler at %s", settings.address)
        with Client(settings.address, timeout=settings.connect_timeout_s) as client:
            client.register_plugin(torch_threads_plugin(threads))
            yield client
        return
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.info("dask: starting a LocalCluster of %d worker(s) x %d thread(s)", settings.n_workers, threads)
    with LocalCluster(
        n_workers=settings.n_workers,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=None,
        env=env,
    ) as cluster, Client(cluster) as client:
        client.register_plugin(torch_threads_plugin(threads))
        yield client


def map_shards(client, fn: Callable, shards: Iterable[tuple], **common) -> Iterator[Any]:
    """``fn(*shard, **common)`` for every shard on the cluster; results in shard order,
    yielded as each becomes available in that order (the driver can write as they come).
    ``common`` is sent to the cluster once, not once per shard."""
    shards = list(shards)
    if not shards:
        return
    # Wrapped in a list so that scatter sends each object whole (it splits dicts and lists).
    scattered = {k: client.scatter([v], broadcast=True, hash=False)[0] for k, v in common.items()}
    futures = [client.submit(fn, *shard, **scattered, pure=False) for shard in shards]
    try:
        for future in futures:
            yield future.result()
            future.release()
    finally:
        client.cancel(futures)


def run_shards(client, fn: Callable, shards: Iterable[tuple], **common) -> Iterator[Any]:
    """``map_shards`` on the cluster, or the same calls in this process when ``client`` is
    None: the one loop both paths share."""
    if client is not None:
        yield from map_shards(client, fn, shards, **common)
        return
    for shard in shards:
        yield fn(*shard, **common)


def n_workers(client) -> int:
    """Workers the scheduler has now (at least 1, for sizing shards)."""
    return max(1, len(client.scheduler_info().get("workers", {})))
