"""Scale-out through dask.distributed: a LocalCluster of 2 worker processes gives the same
embeddings and generator banks as the single-process path (design section 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import scaleout
from pipeline.config import ClusterConfig, ConfigError

# The module-scoped fixture is built once: these tests stay on one xdist worker.
pytestmark = pytest.mark.xdist_group("dask-cluster")


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, through the stages' own context manager."""
    with scaleout.cluster_client(ClusterConfig(engine="dask", n_workers=2)) as client:
        assert scaleout.n_workers(client) == 2
        yield client


def read_parts(folder):
    from pipeline.io import read_json, read_tensors

    index = read_json(folder / "index.json")
    return index, [read_tensors(folder / p["file"]) for p in index["parts"]]


TIMING = {"seconds", "images_per_second", "encode_images_per_second", "reused"}


def assert_same_embeddings(single, dask):
    index_a, parts_a = read_parts(single)
    index_b, parts_b = read_parts(dask)
    assert {k: v for k, v in index_a.items() if k not in TIMING} == {k: v for k, v in index_b.items() if k not in TIMING}
    assert len(parts_a) == len(parts_b) > 1
    for a, b in zip(parts_a, parts_b):
        assert a.keys() == b.keys() == {"embeddings", "labels", "sample_ids"}
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_local_engine_means_no_cluster():
    with scaleout.cluster_client(ClusterConfig()) as client:
        assert client is None
    with pytest.raises(ConfigError, match="cluster.engine"):
        from pipeline import config

        config.validate({**config.compose(), "cluster": {"engine": "spark"}})


def test_shards_are_whole_batches():
    from pipeline.clip.embedding import shard_ranges

    shards = shard_ranges(50, 8, 10, 2)
    assert shards[0] == (0, 8) and shards[-1] == (48, 50)
    assert all(lo % 8 == 0 for lo, _ in shards)
    assert [hi for _, hi in shards[:-1]] == [lo for lo, _ in shards[1:]]
    assert shard_ranges(100, 8, 64, 1) == [(0, 32), (32, 64), (64, 96), (96, 100)]


def test_embed_step_on_a_cluster_address_matches_single_process(world, tiny_world, cluster, monkeypatch):
    """run_embed with cluster.address: the stage connects to that scheduler, and its
    parts (every tensor) and index equal the single-process embeddings of the world."""
    import distributed

    from pipeline.stages.embed import run_embed

    addresses = []
    real_client = distributed.Client

    class SpyClient(real_client):
        def __init__(self, address=None, *args, **kwargs):
            addresses.append(address)
            super().__init__(address, *args, **kwargs)

    monkeypatch.setattr(distributed, "Client", SpyClient)
    address = cluster.scheduler.address
    cfg = world.model_copy(update={
        "cluster": ClusterConfig(engine="dask", address=address),
        "paths": world.paths.model_copy(update={"embeddings": "data/embeddings-dask"}),
    })
    before = cluster.run_on_scheduler(lambda dask_scheduler: dask_scheduler.task_prefixes.get("embed_shard") is not None)
    index = run_embed(cfg, "train")
    assert addresses == [address]
    assert not index["reused"]
    ran = cluster.run_on_scheduler(lambda dask_scheduler: dask_scheduler.task_prefixes.get("embed_shard") is not None)
    assert ran and not before
    assert_same_embeddings(tiny_world / "data/embeddings/train", Path.cwd() / "data/embeddings-dask/train")




def test_stream_task_on_dask_matches_single_process(tiny_world, cluster, tmp_path):
    from pipeline.clip import backbone as backbone_lib
    from pipeline.stream.images import embed_task
    from pipeline.stream.ledger import load_task_manifest
    from pipeline.stream.sources import open_source
    from tests.test_stream import batch_files, put_folder, run_ingest

    files = batch_files("b1", {"red_circle": 9, "blue_star": 8}, seed=3)
    files["b1/blue_star/broken.png"] = b"not an image"
    put_folder(tmp_path / "src", files)
    source = open_source(str(tmp_path / "src"))
    run_ingest(source, tmp_path)
    manifest = load_task_manifest(tmp_path / "tasks", 1)
    backbone_dir = tiny_world / "models/backbone"
    backbone = backbone_lib.load_backbone(backbone_dir)
    options = {"batch_size": 4, "chunk_size": 6, "on_bad_image": "skip", "progress": False, "class_ids": [5, 2]}
    single = embed_task(source, manifest, "train", backbone, tmp_path / "single", **options)
    dask = embed_task(source, manifest, "train", backbone, tmp_path / "dask", client=cluster,
                             backbone_dir=backbone_dir, **options)
    assert single["skipped"] == dask["skipped"] == ["b1/blue_star/broken.png"]
    assert_same_embeddings(tmp_path / "single", tmp_path / "dask")


def by_class(tiny_world):
    from pipeline.clip import backbone as backbone_lib
    from pipeline.clip.embedding import load_embeddings

    sha = backbone_lib.read_info(tiny_world / "models/backbone")["sha256"]
    data = load_embeddings(tiny_world / "data/embeddings/train", sha)
    return {int(c): data["embeddings"][data["labels"] == c] for c in data["labels"].unique()}


@pytest.mark.parametrize("kind", ["vae", "mog"])
def test_generator_bank_on_dask_matches_single_process(tiny_world, cluster, kind):
    from pipeline.config import MogGenerator, VaeGenerator
    from pipeline.method import generators

    data = by_class(tiny_world)
    if kind == "vae":
        settings = VaeGenerator(name="vae", hidden=16, latent=4, epochs=3, batch_size=4, lr=1e-3,
                                chunk_classes=3)
        assert len(generators.vae_chunks(sorted(data), settings, 1)) > 1
    else:
        settings = MogGenerator(name="mog", components=2)
    single = generators.fit_bank(data, settings, seed=7)
    dask = generators.fit_bank(data, settings, seed=7, client=cluster)
    assert single.class_ids == dask.class_ids == sorted(data)
    assert single.fit_loss == dask.fit_loss
    assert single.tensors.keys() == dask.tensors.keys()
    for key in single.tensors:
        assert torch.equal(single.tensors[key], dask.tensors[key]), key
    # The merged bank is one file, as in one process.
    assert torch.equal(single.sample(3, seed=1)[0], dask.sample(3, seed=1)[0])
