"""The stream source and `recall ingest`, against a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from support.stream import write_batch_with_a_one_image_class
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from devtools import servers
from devtools.servers import free_port
from pipeline.clip.embedding import BadImage, collate_images, screen_bad_images
from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.stream.images import StreamImages, embed_task
from pipeline.stream.ingest import ingest
from pipeline.stream.ledger import EntryTaken, Record, ledger_text, load_task_manifest, open_ledger_store
from pipeline.stream.s3 import S3_MAX_ATTEMPTS, S3_REQUESTS_IN_FLIGHT, SourceError, SourceUnreachable, s3_client
from pipeline.stream.scan import _hash_split, class_name, scan_batch
from pipeline.stream.sources import READY_MARKER, open_source

# Dummy credentials, distinctive so a test can tell if one ever reaches a message.
ACCESS_KEY = "TESTSTREAMACCESSKEY0"
SECRET_KEY = "stream-test-secret-never-shown"


def moto_server(log_dir: Path, **env_overrides: str):
    """moto's server with this module's dummy credentials (and any other environment)."""
    return servers.moto_server(log_dir, {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, **env_overrides})


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Credentials and region from the environment only; no user AWS config can leak in."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3(moto_endpoint):
    """A fresh bucket: (client, bucket, endpoint)."""
    client = s3_client(moto_endpoint)
    bucket = f"recall-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket, moto_endpoint


def image_bytes(seed: int, size: int = 8) -> bytes:
    """A tiny PNG whose bytes depend on ``seed`` only."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def batch_files(batch: str, classes: dict[str, int], seed: int = 0, ready: bool = True) -> dict[str, bytes]:
    """Keys (relative to the source) of a flat batch: <batch>/<folder>/<i>.png."""
    files = {}
    for c, (folder, n) in enumerate(classes.items()):
        for i in range(n):
            files[f"{batch}/{folder}/{i:04d}.png"] = image_bytes(seed * 100_000 + c * 1000 + i)
    if ready:
        files[f"{batch}/{READY_MARKER}"] = b""
    return files


def put_s3(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=prefix + kv[0], Body=kv[1]), files.items()))


def put_folder(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def entries(ledger: Path) -> list[dict]:
    return yaml.safe_load(ledger.read_text())["entries"]


def run_ingest(source, root: Path, **kwargs):
    return ingest(source, root / "ledger.yaml", root / "tasks", **kwargs)


# --------------------------------------------------------------------------- tests


def test_batch_without_ready_is_ignored_until_ready(s3, tmp_path):
    client, bucket, endpoint = s3
    put_s3(client, bucket, "in/", batch_files("batch-001", {"red_circle": 5, "blue_star": 5}, ready=False))
    source = open_source(f"s3://{bucket}/in", endpoint)

    assert run_ingest(source, tmp_path) == []
    assert entries(tmp_path / "ledger.yaml") == []
    assert not (tmp_path / "tasks").exists()

    client.put_object(Bucket=bucket, Key="in/batch-001/_READY", Body=b"")
    [entry] = run_ingest(source, tmp_path)
    assert (entry["batch"], entry["status"], entry["task"]) == ("batch-001", "accepted", 1)
    assert entry["classes"] == ["blue star", "red circle"]
    assert entry["source"] == f"s3://{bucket}/in/batch-001/"
    manifest = json.loads((tmp_path / "tasks" / "task-01.json").read_text())
    assert len(manifest["files"]) == 10 and {f["class"] for f in manifest["files"]} == {"blue star", "red circle"}
    assert manifest["endpoint_url"] == endpoint


def test_repeated_class_is_rejected_and_the_next_batch_becomes_the_task(s3, tmp_path):
    client, bucket, endpoint = s3
    files = batch_files("batch-001", {"red_circle": 4, "blue_star": 4}, seed=1)
    files |= batch_files("batch-002", {"red_circle": 4, "green_cross": 4}, seed=2)
    files |= batch_files("batch-003", {"green_cross": 4}, seed=3)
    put_s3(client, bucket, "", files)

    new = run_ingest(open_source(f"s3://{bucket}", endpoint), tmp_path)

    assert [(e["batch"], e["status"], e.get("task")) for e in new] == [
        ("batch-001", "accepted", 1), ("batch-002", "rejected", None), ("batch-003", "accepted", 2)
    ]
    assert "'red circle'" in new[1]["reason"] and "task 1" in new[1]["reason"] and "batch-001" in new[1]["reason"]
    assert entries(tmp_path / "ledger.yaml") == new
    assert json.loads((tmp_path / "tasks" / "task-02.json").read_text())["batch"] == "batch-003"
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["task-01.json", "task-02.json"]


@pytest.mark.parametrize(
    "layout, reason",
    [
        ({"a/0.png": 1, "a/1.png": 2, "a/2.png": 5, "empty/": None}, "class 'empty' (folder 'empty') is empty"),
        ({"a/0.png": 1, "a/1.png": 2, "a/2.png": 5, "b/notes.txt": 3}, "class 'b' (folder 'b') is empty"),
        ({"a/0.png": 1, "a/1.png": 2, "a/2.png": 5, "lonely/0.png": 3}, "class 'lonely' has 1 training image(s)"),
        ({"red_circle/0.png": 1, "red_circle/1.png": 2, "red_circle/2.png": 5, "red circle/0.png": 3},
         "class 'red circle' appears more than once"),
        ({"readme.txt": 1}, "no class folders"),
        ({"train/a/0.png": 1, "train/a/1.png": 2}, "class 'a' has no test images"),
        ({"train/a/0.png": 1, "train/a/1.png": 2, "test/a/0.png": 3, "b/0.png": 4}, "mixes train/test folders"),
    ],
)
def test_unusable_batches_are_rejected_with_their_reason_and_later_ones_proceed(tmp_path, layout, reason):
    root = tmp_path / "source"
    for key, seed in layout.items():
        if seed is None:
            (root / "batch-001" / key).mkdir(parents=True)
        else:
            put_folder(root, {f"batch-001/{key}": image_bytes(seed) if key.endswith(".png") else b"x"})
    put_folder(root, {"batch-001/_READY": b""} | batch_files("batch-002", {"zebra": 3}, seed=9))

    rejected, accepted = run_ingest(open_source(str(root)), tmp_path)

    assert rejected["status"] == "rejected" and reason in rejected["reason"], rejected
    assert "task" not in rejected
    assert (accepted["batch"], accepted["task"]) == ("batch-002", 1)


def test_corrupt_image_follows_on_bad_image_and_a_changed_object_is_refused(s3, tmp_path):
    client, bucket, endpoint = s3
    files = {
        "b1/train/cat/0.png": image_bytes(1),
        "b1/train/cat/1.png": image_bytes(2),
        "b1/train/cat/broken.png": b"\x89PNG not really an image",
        "b1/test/cat/0.png": image_bytes(3),
        "b1/_READY": b"",
    }
    put_s3(client, bucket, "src/", files)
    source = open_source(f"s3://{bucket}/src", endpoint)
    run_ingest(source, tmp_path)
    manifest = load_task_manifest(tmp_path / "tasks", 1)

    def preprocess(image):
        return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)

    images = StreamImages(source, manifest, "train", preprocess)
    assert len(images) == 3

    def screened(on_bad_image, skipped):
        loader = DataLoader(images, batch_size=2, collate_fn=collate_images)
        return [idx for _, idx in screen_bad_images(loader, on_bad_image, "in task 1", images.sample_id, skipped)]

    with pytest.raises(BadImage) as error:
        screened("error", [])
    assert f"s3://{bucket}/src/b1/train/cat/broken.png" in str(error.value)

    skipped: list[str] = []
    kept = torch.cat(screened("skip", skipped))
    assert skipped == ["b1/train/cat/broken.png"]
    assert [images.sample_id(i) for i in kept.tolist()] == ["b1/train/cat/0.png", "b1/train/cat/1.png"]

    client.put_object(Bucket=bucket, Key="src/b1/train/cat/1.png", Body=image_bytes(99))
    with pytest.raises(DataError, match=r"b1/train/cat/1\.png: changed since ingest"):
        images[[images.sample_id(i) for i in range(3)].index("b1/train/cat/1.png")]


# --------------------------------------------------------------------------- concurrent reads


def tensor_of(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def ingested_task(s3, tmp_path, n: int):
    """A one-class task of ``n`` distinct train images (and one test image) ingested from S3:
    (source, manifest, {key: bytes})."""
    client, bucket, endpoint = s3
    files = {f"b1/train/cat/{i:03d}.png": image_bytes(500 + i) for i in range(n)}
    files |= {"b1/test/cat/0.png": image_bytes(499), "b1/_READY": b""}
    put_s3(client, bucket, "src/", files)
    source = open_source(f"s3://{bucket}/src", endpoint)
    run_ingest(source, tmp_path)
    return source, load_task_manifest(tmp_path / "tasks", 1), files


def load_all(images) -> tuple[torch.Tensor, torch.Tensor]:
    """One DataLoader batch of every item: what embed_task's loader hands the encoder."""
    loader = DataLoader(images, batch_size=len(images), collate_fn=collate_images)
    (tensors, indices, bad), = list(loader)
    assert bad == []
    return tensors, indices


def test_concurrent_reads_keep_the_order_the_embeddings_need(s3, tmp_path):
    source, manifest, files = ingested_task(s3, tmp_path, 40)
    images = StreamImages(source, manifest, "train", tensor_of)
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def late_first(request, **_):
        # The earlier the key, the later its answer: any reordering would show.
        number = int(request.url.rsplit("/", 1)[1].split(".")[0])
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.002 * (40 - number))
        with lock:
            state["now"] -= 1

    source.client.meta.events.register("before-send.s3.GetObject", late_first)
    tensors, indices = load_all(images)
    expected = [tensor_of(Image.open(io.BytesIO(files[images.sample_id(i)])).convert("RGB")) for i in indices.tolist()]
    assert indices.tolist() == list(range(40))
    assert all(torch.equal(got, want) for got, want in zip(tensors, expected))
    # The GETs overlapped, and never more of them than the source's bound.
    assert 1 < state["most"] <= S3_REQUESTS_IN_FLIGHT, state


def test_an_object_changed_since_ingest_is_named_among_concurrent_reads(s3, tmp_path):
    source, manifest, _ = ingested_task(s3, tmp_path, 30)
    client, bucket, _ = s3
    client.put_object(Bucket=bucket, Key="src/b1/train/cat/017.png", Body=image_bytes(999))
    images = StreamImages(source, manifest, "train", tensor_of)
    with pytest.raises(DataError, match=rf"^s3://{bucket}/src/b1/train/cat/017\.png: changed since ingest"):
        load_all(images)


def test_a_transient_error_is_retried_and_a_lasting_one_named_after_bounded_attempts(s3, tmp_path):
    from botocore.exceptions import ConnectionClosedError

    source, manifest, files = ingested_task(s3, tmp_path, 20)
    images = StreamImages(source, manifest, "train", tensor_of)
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def drop(request, lasting: str | None = None, **_):
        key = request.url.rsplit("/", 1)[1]
        with lock:
            attempts[key] = attempts.get(key, 0) + 1
            first = attempts[key] == 1
        # Every key's first answer is lost on the way; so is every answer for ``lasting``.
        if first or key == lasting:
            raise ConnectionClosedError(endpoint_url=request.url)

    source.client.meta.events.register("before-send.s3.GetObject", drop, unique_id="drop")
    tensors, indices = load_all(images)
    assert indices.tolist() == list(range(20)) and len(tensors) == 20
    assert set(attempts.values()) == {2}, attempts

    attempts.clear()
    source.client.meta.events.unregister("before-send.s3.GetObject", unique_id="drop")
    source.client.meta.events.register("before-send.s3.GetObject", lambda request, **kw: drop(request, "011.png"))
    _, bucket, endpoint = s3
    with pytest.raises(SourceUnreachable, match=rf"S3 endpoint {endpoint} does not answer .*bucket '{bucket}'"):
        load_all(images)
    # botocore's max_attempts counts the retries after the first attempt.
    assert attempts["011.png"] == 1 + S3_MAX_ATTEMPTS, attempts


def test_a_task_embeds_straight_from_s3_as_from_a_folder(s3, tmp_path, tiny_world):
    from pipeline.clip import backbone as backbone_lib
    from pipeline.clip import embedding as embed_lib

    client, bucket, endpoint = s3
    files = batch_files("b1", {"red_circle": 5, "blue_star": 4}, seed=7)
    files["b1/blue_star/broken.png"] = b"not an image"
    put_s3(client, bucket, "src/", files)
    put_folder(tmp_path / "folder", files)
    backbone = backbone_lib.load_backbone(tiny_world / "models/backbone")
    embedded = {}
    for name, uri in (("s3", f"s3://{bucket}/src"), ("folder", str(tmp_path / "folder"))):
        source = open_source(uri, endpoint if name == "s3" else None)
        run_ingest(source, tmp_path / name)
        manifest = load_task_manifest(tmp_path / name / "tasks", 1)
        out = tmp_path / name / "embeddings"
        with pytest.raises(BadImage, match=r"b1/blue_star/broken\.png"):
            embed_task(source, manifest, "train", backbone, out / "train", batch_size=4, progress=False)
        assert not (out / "train").exists()  # nothing half-written
        index = embed_task(source, manifest, "train", backbone, out / "train", batch_size=4,
                                  on_bad_image="skip", progress=False)
        assert index["skipped"] == ["b1/blue_star/broken.png"] and not index["reused"]
        # The same task again is not embedded twice.
        again = embed_task(source, manifest, "train", backbone, out / "train", batch_size=4,
                                  on_bad_image="skip", progress=False)
        assert again["reused"]
        embedded[name] = embed_lib.load_embeddings(out / "train", backbone.sha256)
    assert torch.equal(embedded["s3"]["embeddings"], embedded["folder"]["embeddings"])
    assert torch.equal(embedded["s3"]["labels"], embedded["folder"]["labels"])
    # Labels are positions in the task's class list; every train image but the broken one is there.
    assert sorted(embedded["s3"]["labels"].unique().tolist()) == [0, 1]
    assert len(embedded["s3"]["labels"]) == sum(1 for f in manifest["files"] if f["split"] == "train") - 1


def test_ingest_twice_adds_nothing(s3, tmp_path):
    client, bucket, endpoint = s3
    put_s3(client, bucket, "", batch_files("b1", {"a": 3, "b": 3}) | batch_files("b2", {"a": 3}, seed=5))
    source = open_source(f"s3://{bucket}/", endpoint)
    first = run_ingest(source, tmp_path)
    assert [e["status"] for e in first] == ["accepted", "rejected"]
    written = sorted([tmp_path / "ledger.yaml", *(tmp_path / "tasks").iterdir()])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in written}

    assert run_ingest(source, tmp_path) == []
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in written} == before
    assert sorted([tmp_path / "ledger.yaml", *(tmp_path / "tasks").iterdir()]) == written


def test_a_batch_of_more_than_1000_objects_is_listed_whole(s3, tmp_path):
    client, bucket, endpoint = s3
    # Listing does not read images, so tiny distinct bytes stand in for them.
    files = {f"big/class_{c}/{i:04d}.png": f"{c}-{i}".encode() for c in "ab" for i in range(550)}
    put_s3(client, bucket, "", files | {"big/_READY": b""})

    [entry] = run_ingest(open_source(f"s3://{bucket}", endpoint), tmp_path)

    assert entry["status"] == "accepted"
    assert {c: n["train"] + n["test"] for c, n in entry["counts"].items()} == {"class a": 550, "class b": 550}
    manifest = load_task_manifest(tmp_path / "tasks", 1)
    assert {f["key"] for f in manifest["files"]} == set(files)
    assert all(f["md5"] == hashlib.md5(files[f["key"]]).hexdigest() for f in manifest["files"])


@pytest.mark.parametrize("failure", ["unreachable endpoint", "missing bucket"])
def test_unusable_source_is_one_clear_error_in_bounded_time(project, moto_endpoint, failure):
    endpoint = f"http://127.0.0.1:{free_port()}" if failure == "unreachable endpoint" else moto_endpoint
    bucket = f"absent-{uuid.uuid4().hex[:8]}"
    ledger = project / "ledger.yaml"
    ledger.write_text(ledger_text([]))
    before = ledger.read_bytes()

    start = time.monotonic()
    from pipeline.cli import app

    result = CliRunner().invoke(
        app, ["ingest", "dataset=stream", f"dataset.source=s3://{bucket}/in", f"dataset.endpoint_url={endpoint}"]
    )
    elapsed = time.monotonic() - start

    # 75 (try again later) when the server may come back: the scheduled flow retries it.
    assert result.exit_code == (75 if failure == "unreachable endpoint" else 2), result.output
    message = result.output.strip()
    assert message.startswith("error:") and message.count("error:") == 1
    assert bucket in message and endpoint in message
    assert ("does not answer" if failure == "unreachable endpoint" else "does not exist") in message
    assert ACCESS_KEY not in message and SECRET_KEY not in message
    assert elapsed < 20
    assert ledger.read_bytes() == before
    assert not (project / "data").exists()


def test_refused_credentials_are_one_clear_error_without_the_secret(tmp_path):
    # This server checks signatures against its IAM users, of which it has none.
    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0") as endpoint:
        with pytest.raises(SourceError) as error:
            open_source("s3://guarded/in", endpoint)
    message = str(error.value)
    assert "'guarded'" in message and endpoint in message and "credentials were refused" in message
    assert ACCESS_KEY not in message and SECRET_KEY not in message


def test_hash_split_is_stable_and_folder_and_s3_sources_agree(s3, tmp_path):
    client, bucket, endpoint = s3
    sizes = {"red_circle": 10, "blue_star": 3, "green_cross": 7}
    files = batch_files("batch-001", sizes, seed=4)
    renamed = {k.replace("/0", "/renamed-0"): v for k, v in files.items()}
    assert renamed.keys() != files.keys()
    put_s3(client, bucket, "one/", files)
    put_s3(client, bucket, "two/", renamed)
    put_folder(tmp_path / "folder", files)
    sources = {
        "s3": open_source(f"s3://{bucket}/one", endpoint),
        "renamed": open_source(f"s3://{bucket}/two", endpoint),
        "local": open_source(str(tmp_path / "folder")),
    }
    for name, source in sources.items():
        run_ingest(source, tmp_path / name)

    def manifest(name):
        return load_task_manifest(tmp_path / name / "tasks", 1)

    def split_by_md5(name):
        return {f["md5"]: f["split"] for f in manifest(name)["files"]}

    by_md5 = split_by_md5("s3")
    assert len(by_md5) == sum(sizes.values())
    assert by_md5 == split_by_md5("renamed") == split_by_md5("local")
    [entry] = entries(tmp_path / "s3" / "ledger.yaml")
    n_test = {n: max(1, min(n - 1, int(0.2 * n + 0.5))) for n in sizes.values()}
    assert entry["counts"] == {
        class_name(folder): {"train": n - n_test[n], "test": n_test[n]} for folder, n in sizes.items()
    }
    # Within a class, the test images are those with the smallest MD5s, whatever the keys.
    for name in entry["classes"]:
        ranked = sorted(f["md5"] for f in manifest("s3")["files"] if f["class"] == name)
        assert {m for m in ranked if by_md5[m] == "test"} == set(ranked[: n_test[len(ranked)]])

    def comparable(name):
        return [{k: v for k, v in e.items() if k not in ("source", "ingested_at")} for e in entries(tmp_path / name / "ledger.yaml")]

    assert comparable("s3") == comparable("local")
    s3_manifest, local_manifest = manifest("s3"), manifest("local")
    for key in ("source", "endpoint_url"):
        s3_manifest.pop(key), local_manifest.pop(key)
    assert s3_manifest == local_manifest

    # Re-ingest from scratch: the same task manifest, byte for byte.
    manifest_bytes = (tmp_path / "s3" / "tasks" / "task-01.json").read_bytes()
    (tmp_path / "s3" / "ledger.yaml").unlink()
    (tmp_path / "s3" / "tasks" / "task-01.json").unlink()
    run_ingest(sources["s3"], tmp_path / "s3")
    assert (tmp_path / "s3" / "tasks" / "task-01.json").read_bytes() == manifest_bytes


def test_a_class_of_two_images_gets_one_train_and_one_test(tmp_path):
    put_folder(tmp_path, batch_files("b", {"pair": 2}))
    scan = scan_batch(open_source(str(tmp_path)), "b", test_fraction=0.01)
    assert scan.counts == {"pair": {"train": 1, "test": 1}}
    assert "1 training image(s)" in " ".join(scan.problems)


def test_conditional_put_refuses_an_existing_entry(s3):
    client, bucket, endpoint = s3
    store = open_ledger_store(f"s3://{bucket}/state/ledger", endpoint)
    store.create(1, Record({"batch": "x", "status": "rejected", "reason": "r"}))
    with pytest.raises(EntryTaken):
        store.create(1, Record({"batch": "y", "status": "rejected", "reason": "r"}))
    assert [r.entry["batch"] for r in store.read()] == ["x"]


@pytest.mark.parametrize("shared_class", [False, True])
def test_racing_ingests_never_share_a_task_number(s3, tmp_path, monkeypatch, shared_class):
    """B reads the shared ledger, then A appends entry 1 before B writes it: B's put of
    entry 1 is refused, and B judges its batch again as entry 2."""
    client, bucket, endpoint = s3
    ledger_uri = f"s3://{bucket}/state/ledger"
    put_s3(client, bucket, "src/", batch_files("batch-b", {"green_cross": 4} | ({"red_circle": 4} if shared_class else {}), seed=7))
    folder_a = tmp_path / "source-a"
    put_folder(folder_a, batch_files("batch-a", {"red_circle": 4}, seed=8))

    store_b = open_ledger_store(ledger_uri, endpoint)
    real_create = store_b.create
    raced = []

    def create_after_a_won(number, record):
        if not raced:
            raced.append(number)
            run_ingest(open_source(str(folder_a)), tmp_path / "a", store=open_ledger_store(ledger_uri, endpoint))
        return real_create(number, record)

    monkeypatch.setattr(store_b, "create", create_after_a_won)
    # B's local ledger is stale on purpose: it has never seen A's entry.
    [entry_b] = run_ingest(open_source(f"s3://{bucket}/src", endpoint), tmp_path / "b", store=store_b)

    assert raced == [1]
    shared = [r.entry for r in open_ledger_store(ledger_uri, endpoint).read()]
    assert [e["batch"] for e in shared] == ["batch-a", "batch-b"]
    tasks = [e["task"] for e in shared if e["status"] == "accepted"]
    assert len(tasks) == len(set(tasks))
    if shared_class:
        assert entry_b["status"] == "rejected" and "already task 1's" in entry_b["reason"]
    else:
        assert (entry_b["status"], entry_b["task"]) == ("accepted", 2)
        assert json.loads((tmp_path / "b" / "tasks" / "task-02.json").read_text())["batch"] == "batch-b"
    # B's local copy holds A's entry and A's task manifest too, as A's does once it syncs.
    assert entries(tmp_path / "b" / "ledger.yaml") == shared
    run_ingest(open_source(str(folder_a)), tmp_path / "a", store=open_ledger_store(ledger_uri, endpoint))
    assert (tmp_path / "a" / "ledger.yaml").read_bytes() == (tmp_path / "b" / "ledger.yaml").read_bytes()
    assert (tmp_path / "a" / "tasks" / "task-01.json").read_bytes() == (tmp_path / "b" / "tasks" / "task-01.json").read_bytes()


def test_folder_stream_end_to_end_with_the_demo_producer(project):
    from pipeline import config
    from pipeline.cli import app

    runner = CliRunner()
    small = ["dataset.shapes.train_per_class=3", "dataset.shapes.test_per_class=1", "dataset.shapes.image_size=16"]
    # The shared ledger in a folder: entries created exclusively, as with S3's conditional put.
    stream_cfg = ["dataset=stream", "dataset.source=incoming", "dataset.ledger_uri=state/ledger"]

    def invoke(*args):
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    invoke("stream-demo", "incoming", "--batches", "10", "--next", *small)
    assert "batch-001: task 1, 3 classes" in invoke("ingest", *stream_cfg)
    assert "no new ready batches" in invoke("ingest", *stream_cfg)
    invoke("stream-demo", "incoming", "--batches", "10", "--next", *small)
    (project / "incoming" / "batch-zzz" / "a_class").mkdir(parents=True)  # no _READY: not taken
    assert "batch-002: task 2, 3 classes" in invoke("ingest", *stream_cfg)

    cfg = config.load(None, stream_cfg)
    ledger = entries(project / cfg.paths.ledger)
    assert [(e["batch"], e["task"]) for e in ledger] == [("batch-001", 1), ("batch-002", 2)]
    assert not set(ledger[0]["classes"]) & set(ledger[1]["classes"])
    assert sorted(p.name for p in (project / "state" / "ledger").iterdir()) == ["entry-000001.json", "entry-000002.json"]
    manifest = load_task_manifest(project / cfg.paths.tasks, 2)
    images = StreamImages(open_source("incoming"), manifest, "test", lambda im: torch.zeros(1))
    assert len(images) == 3 and all(images[i][2] is None for i in range(3))







def test_ingest_of_a_bad_batch_fails_naming_batch_and_class_and_records_it_once(project):
    """Cron and the scheduled flow see a failure, not a quiet success that ran nothing."""
    from pipeline.cli import app

    runner = CliRunner()
    stream_cfg = ["dataset=stream", "dataset.source=incoming"]
    write_batch_with_a_one_image_class(project / "incoming")
    result = runner.invoke(app, ["ingest", *stream_cfg])
    assert result.exit_code == 2, result.output
    assert "batch 'batch-001' rejected: class 'lonely circle' has 1 training image(s)" in result.output
    assert "new batch name" in result.output
    ledger = entries(project / "ledger.yaml")
    assert [(e["batch"], e["status"]) for e in ledger] == [("batch-001", "rejected")]
    # Recorded once: the next poll is not a failure again.
    again = runner.invoke(app, ["ingest", *stream_cfg])
    assert again.exit_code == 0 and "no new ready batches" in again.output, again.output
    assert entries(project / "ledger.yaml") == ledger

def test_stream_config_needs_a_source(project):
    with pytest.raises(ConfigError, match="source"):
        from pipeline import config

        config.load(None, ["dataset=stream"])
    cfg = config.load(None, ["dataset=stream", "dataset.source=s3://bucket/in"])
    assert (cfg.dataset.test_fraction, cfg.dataset.ledger_uri, cfg.paths.ledger) == (0.2, None, "ledger.yaml")


def test_hash_split_keeps_byte_identical_duplicates_on_one_side():
    # Six distinct images and three copies of one: whichever side the copies land on, all
    # three land there, and train keeps at least one image.
    items = [(f"b/c/{i}.png", f"{i:032x}", 10) for i in range(6)] + [(f"b/c/dup-{i}.png", "0" * 31 + "f", 10) for i in range(3)]
    for fraction in (0.1, 0.2, 0.5, 0.9):
        split = _hash_split(items, fraction)
        sides = {key for key, md5, _ in split["test"] if md5 == "0" * 31 + "f"}
        assert len(sides) in (0, 3), (fraction, split)
        assert split["train"] and len(split["train"]) + len(split["test"]) == len(items)
    # Only copies of one image: nothing can be a test image without also being a train one.
    copies = [(f"b/c/{i}.png", "a" * 32, 10) for i in range(4)]
    assert _hash_split(copies, 0.2) == {"train": copies, "test": []}
