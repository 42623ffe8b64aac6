"""Growth over many tasks: a synthetic stream at real width run through the real stages.

A scratch copy of the project (``devtools.scratch.scratch_project``: its own git, DVC
cache and local MLflow store, ``mlflow.db`` + ``mlartifacts/``) in stream mode, with
``backbone=local_file`` on a randomly initialised open_clip ``--arch`` (ViT-B-16: the
512-d embeddings and the 12-layer, 512-wide text tower that clap's prompts run through).
Every task is what `recall update` does, with the images replaced by Gaussian clusters:

1. the producer lands batch NNN in a folder source: ``--classes-per-task`` class folders of
   tiny placeholder files (never decoded), then ``_READY``; the previous batch is deleted
   (nothing later reads it);
2. ``recall ingest`` (real): the ledger entry, the task manifest, split.n_tasks += 1;
3. intake, bypassed: it would decode the images with the CLIP. Instead this script writes
   what ``recall intake`` writes, in its exact format (``pipeline/clip/embedding.py``
   ``embed_images``: ``data/embeddings/task-NN/{train,test}/part-00000.safetensors`` with
   ``embeddings``/``labels``/``sample_ids`` and ``index.json``; ``pipeline/stages/intake.py``
   ``run_intake``: ``text.safetensors`` with ``class_features``, ``template_features``,
   ``class_ids`` and ``metrics/intake-NN.json``), keyed to the task's manifest and the
   backbone's sha256, then ``dvc commit -f intake@NN`` records them as that stage's
   outputs (deps hashed as they are, outputs cached), so DVC treats them as the stage's;
   image embeddings are ``d``-dim Gaussian clusters (raw, norm about 10 like CLIP's), text
   features unit vectors near each class's mean direction, one per template;
4. ``dvc repro`` (real): split, generators, replay, novelty, finetune, evaluate (which
   registers the classifier's pyfunc version and applies the gate), report; the seconds
   of each stage are the times between DVC's "Running stage" lines;
5. ``dvc status`` and a no-op ``dvc repro``, timed; bytes added to .dvc/cache, mlartifacts/
   and mlflow.db; the prompt state file; the longest registered-model and model-version
   tags against MLflow's limits (read from the installed mlflow).

Then log-log fits of each per-task figure against the seen classes, a projection to 100
tasks of 10 classes, and `dvc status` / no-op `dvc repro` on a synthetic DVC graph of the
same shape (this dvc.yaml and params at 100 tasks, every output a placeholder of the
real layout, committed with ``dvc commit -f``), at the measured task count too so the two
can be compared.

    python -m benchmarks.growth [--tasks 20] [--classes-per-task 5] [--dim 512] [--epochs 1]
        [--out growth.json] [--keep DIR]

``--dim`` other than 512 needs an ``--arch`` of that width. The reduced schedule is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from devtools.scratch import project_env, scratch_project

# The resolvers travel with the code: the editable install's may belong to another checkout.
FOLDERS = ("pipeline", "conf", "hydra_plugins")

for _key, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

PER_TASK = ("split", "intake", "generators", "replay", "novelty", "finetune", "evaluate", "report")
TEMPLATES = 5  # conf/dataset/stream.yaml's templates
PROJECTION = (100, 10)  # tasks, classes per task


# --------------------------------------------------------------------------- commands


def _env(root: Path) -> dict[str, str]:
    env = project_env(root)
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite store
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
               DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def sh(root: Path, *command: str) -> tuple[float, str]:
    """Run ``command`` in ``root``; its seconds and output. A failure stops the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {root} ({result.returncode}):\n{result.stdout[-4000:]}")
    return seconds, result.stdout


def repro_stages(root: Path) -> tuple[float, dict[str, float]]:
    """`dvc repro`, and the seconds of each stage it ran (from one "Running stage" line to
    the next, so DVC's hashing and caching of a stage's outputs count in that stage)."""
    start = time.perf_counter()
    process = subprocess.Popen(["dvc", "repro"], cwd=root, env=_env(root), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    marks: list[tuple[str, float]] = []
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter()))
    process.wait()
    end = time.perf_counter()
    if process.returncode != 0:
        raise SystemExit(f"dvc repro failed in {root} ({process.returncode}):\n{''.join(lines)[-4000:]}")
    seconds = {name: (marks[i + 1][1] if i + 1 < len(marks) else end) - at for i, (name, at) in enumerate(marks)}
    return end - start, seconds


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# --------------------------------------------------------------------------- the synthetic stream


def class_name(class_id: int) -> str:
    # 11 characters: tags that list class names grow by about 15 characters per class.
    return f"object {class_id:04d}"


def land_batch(source: Path, task: int, first_id: int, classes: int, train: int, test: int) -> None:
    """Batch ``task`` in the folder source: placeholder files (ingest lists and hashes them;
    only intake, bypassed here, would decode them), ``_READY`` last."""
    batch = source / f"batch-{task:03d}"
    for c in range(first_id, first_id + classes):
        for split, n in (("train", train), ("test", test)):
            folder = batch / split / class_name(c).replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:04d}.png").write_bytes(f"placeholder {c} {split} {i}".encode())
    (batch / "_READY").write_text("")


def _save(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def class_directions(class_ids: list[int], dim: int, seed: int):
    import torch

    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + c)) for c in class_ids]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def write_intake(root: Path, params: dict, task: int, dim: int, seed: int) -> dict[str, int]:
    """What ``recall intake --task <task>`` writes, from Gaussian clusters instead of images."""
    import torch

    manifest = json.loads((root / params["paths"]["tasks"] / f"task-{task:02d}.json").read_text())
    backbone = json.loads((root / params["paths"]["backbone"] / "backbone.json").read_text())
    entry = params["split"]["tasks"][f"{task:02d}"]
    ids, names = manifest["class_ids"], manifest["classes"]
    directions = class_directions(ids, dim, seed)
    generator = torch.Generator().manual_seed(seed * 7919 + task)
    figures: dict[str, int] = {}
    for split in ("train", "test"):
        files = [f for f in manifest["files"] if f["split"] == split]
        label_of = {name: ids[i] for i, name in enumerate(names)}
        labels = torch.tensor([label_of[f["class"]] for f in files], dtype=torch.long)
        rows = {c: i for i, c in enumerate(ids)}
        centres = directions[torch.tensor([rows[int(c)] for c in labels])]
        # CLIP ViT-B/16 image embeddings have norms about 10; clusters overlap a little.
        embeddings = 10.0 * (centres + 0.06 * torch.randn(len(files), dim, generator=generator))
        key = {"task": manifest["task"], "split": split, "task_digest": manifest["digest"], "class_ids": ids}
        wanted = {**key, "backbone_sha256": backbone["sha256"], "chunk_size": params["embed"]["chunk_size"],
                  "on_bad_image": params["embed"]["on_bad_image"], "precision": "fp32"}
        out = root / entry[split]
        if out.exists():
            shutil.rmtree(out)
        metadata = {**{k: str(v) for k, v in key.items()}, "backbone_sha256": backbone["sha256"], "part": "0"}
        _save(out / "part-00000.safetensors",
              {"embeddings": embeddings, "labels": labels, "sample_ids": torch.arange(len(files))}, metadata)
        index = {**wanted, "dim": dim, "n_samples": len(files), "n_classes": max(ids) + 1,
                 "parts": [{"file": "part-00000.safetensors", "n": len(files)}], "skipped": [],
                 "seconds": 0.0, "images_per_second": 0.0, "encode_images_per_second": 0.0}
        (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        figures.update({f"{split}_samples": len(files), f"{split}_skipped": 0, f"{split}_images_per_second": 0.0})
    per_template = torch.nn.functional.normalize(
        directions[:, None, :] + 0.05 * torch.randn(len(ids), TEMPLATES, dim, generator=generator), dim=-1)
    class_features = torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)
    _save(root / entry["text"], {"class_features": class_features, "template_features": per_template,
                                  "class_ids": torch.tensor(ids, dtype=torch.long)},
          {"backbone_sha256": backbone["sha256"], "task": str(task), "task_digest": manifest["digest"],
           "class_names": json.dumps(names)})
    metrics = root / params["paths"]["metrics"] / f"intake-{task:02d}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"batch": manifest["batch"], **figures}, indent=2) + "\n")
    return figures


# --------------------------------------------------------------------------- registry tags


def mlflow_limits() -> dict[str, int]:
    """MLflow's limits on tag values, from the installed mlflow: what its API validates and
    what its SQL stores' columns hold (a registered-model tag is a VARCHAR(5000) there:
    PostgreSQL refuses longer values, sqlite does not check)."""
    from mlflow.store.model_registry.dbmodels.models import (
        SqlModelVersionTag,
        SqlRegisteredModelTag,
    )
    from mlflow.utils import validation

    def column(model) -> int | None:
        return getattr(model.__table__.c.value.type, "length", None)

    api = validation.MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
    return {
        "run_tag": validation.MAX_TAG_VAL_LENGTH,
        "registry_tag_api": api,
        "registered_model_tag": min(api, column(SqlRegisteredModelTag) or api),
        "model_version_tag": min(api, column(SqlModelVersionTag) or api),
    }


def longest_tags(root: Path) -> dict[str, dict]:
    """The longest value among registered-model tags and among model-version tags (over
    every model and version of the project's store), and how many tags each model has."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    best = {"registered_model": {"length": 0}, "model_version": {"length": 0}, "most_model_tags": {"count": 0}}
    for model in client.search_registered_models(max_results=1000):
        if len(model.tags) > best["most_model_tags"]["count"]:
            best["most_model_tags"] = {"count": len(model.tags), "model": model.name}
        for key, value in model.tags.items():
            if len(value or "") > best["registered_model"]["length"]:
                best["registered_model"] = {"length": len(value), "key": key, "model": model.name}
        for version in client.search_model_versions(f"name = '{model.name}'", max_results=10000):
            for key, value in version.tags.items():
                if len(value or "") > best["model_version"]["length"]:
                    best["model_version"] = {"length": len(value), "key": key, "model": model.name,
                                             "version": version.version}
    return best


# --------------------------------------------------------------------------- fits


def fit_power(x: list[float], y: list[float]) -> tuple[float, float] | None:
    """(a, b) of y = a * x**b by least squares on logs; None without two positive points."""
    pairs = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pairs) < 2 or len({a for a, _ in pairs}) < 2:
        return None
    lx, ly = np.log([a for a, _ in pairs]), np.log([b for _, b in pairs])
    slope, intercept = np.polyfit(lx, ly, 1)
    return math.exp(intercept), float(slope)


def fit_offset_power(x: list[float], y: list[float]) -> tuple[float, float, float] | None:
    """(alpha, beta, b) of y = alpha + beta * x**b, alpha and beta >= 0, least squares over a
    grid of b in [0, 3]: a per-task constant (process starts, the head's fixed weights)
    plus a part that grows with the seen classes, whose exponent a plain log-log slope
    understates while the constant dominates."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if len(xs) < 3 or len(set(xs)) < 3:
        return None
    best = None
    for b in np.arange(0.0, 3.0001, 0.05):
        grow = xs**b
        design = np.stack([np.ones_like(xs), grow], axis=1)
        (alpha, beta), *_ = np.linalg.lstsq(design, ys, rcond=None)
        if alpha < 0:
            alpha, beta = 0.0, float(grow @ ys / (grow @ grow))
        if beta < 0:
            alpha, beta = float(ys.mean()), 0.0
        error = float(((alpha + beta * grow - ys) ** 2).sum())
        if best is None or error < best[0] - 1e-12:
            best = (error, float(alpha), float(beta), float(b))
    return best[1:]


def project(model, tasks: int, classes: int) -> tuple[float, float]:
    """(the last task's figure, the sum over every task) at ``tasks`` tasks of ``classes``,
    reading ``model`` (seen classes -> figure) at the classes seen after each task."""
    per_task = [model(classes * k) for k in range(1, tasks + 1)]
    return per_task[-1], sum(per_task)


# --------------------------------------------------------------------------- the synthetic DVC graph


def synthetic_graph(workdir: Path, compose: list[str], tasks: int) -> dict[str, float]:
    """`dvc status` and no-op `dvc repro` seconds on this dvc.yaml at ``tasks`` tasks, with
    every output a placeholder in the real layout, committed (never run)."""
    root = scratch_project(workdir / f"graph-{tasks}", {}, compose=[*compose, f"split.n_tasks={tasks}"], folders=FOLDERS)
    params = yaml.safe_load((root / "params.yaml").read_text())
    paths = params["paths"]
    # Outputs that are folders in the real project; everything else is a file.
    folders = {paths["prepared"], paths["backbone"]} | {
        entry[split] for entry in params["split"]["tasks"].values() for split in ("train", "test")}
    for key, entry in params["split"]["tasks"].items():
        manifest = root / entry["classes"]  # written by `recall ingest`, not a stage
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"task": entry["task"], "placeholder": True}) + "\n")
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        wanted = [(str(Path(o.def_path)), True) for s in repo.index.stages for o in s.outs]
        wanted += [(str(Path(d.def_path)), False) for s in repo.index.stages for d in s.deps]
        stages = len(repo.index.stages)
    for path, _ in wanted:
        target = root / path
        if target.exists() or path.startswith("pipeline"):
            continue
        if path in folders:
            target.mkdir(parents=True)
            (target / "index.json").write_text(f"{path}\n")
            (target / "part-00000.safetensors").write_text(f"{path}\n")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"{path}\n")
    committed, _ = sh(root, "dvc", "commit", "-f", "-q")
    status, output = sh(root, "dvc", "status")
    if "up to date" not in output:
        raise SystemExit(f"synthetic graph at {tasks} tasks is not up to date after dvc commit:\n{output[-2000:]}")
    repro, output = sh(root, "dvc", "repro")
    if "Running stage" in output:
        raise SystemExit(f"no-op dvc repro ran a stage on the synthetic graph at {tasks} tasks:\n{output[-2000:]}")
    shutil.rmtree(root)
    return {"tasks": tasks, "stages": stages, "commit_s": committed, "status_s": status, "noop_repro_s": repro}


# --------------------------------------------------------------------------- main


def schedule(args) -> list[str]:
    """The reduced schedule: design-sized models (the generator's VAE, the head), few epochs."""
    return [
        "experiment=paper", "dataset=stream",
        "backbone=local_file", f"backbone.arch={args.arch}",
        f"generator.epochs={args.generator_epochs}",
        f"schedule.epochs={args.epochs}", f"schedule.per_class_per_epoch={args.per_class_per_epoch}",
        f"method.head.balanced_finetune_epochs={args.balanced_epochs}",
        f"method.head.mc_train={args.mc_train}", f"method.head.mc_test={args.mc_test}",
    ]


def make_checkpoint(root: Path, arch: str, dim: int, path: Path) -> None:
    """A randomly initialised open_clip ``arch`` saved as a local checkpoint (in the scratch
    project's own process, where pipeline.compat makes open_clip importable)."""
    code = (
        "import sys, torch\n"
        "from pipeline.compat import import_open_clip\n"
        "torch.manual_seed(0)\n"
        "model = import_open_clip().create_model(sys.argv[1], pretrained=None)\n"
        "dim = model.text_projection.shape[1]\n"
        "assert dim == int(sys.argv[3]), f'{sys.argv[1]} has {dim}-d features, not {sys.argv[3]}'\n"
        "torch.save(model.state_dict(), sys.argv[2])\n"
    )
    sh(root, sys.executable, "-c", code, arch, str(path), str(dim))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--classes-per-task", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip architecture of the random backbone (its width must be --dim)")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1, help="prompt/head epochs per task (schedule.epochs)")
    parser.add_argument("--per-class-per-epoch", type=int, default=4)
    parser.add_argument("--balanced-epochs", type=int, default=1)
    # The head runs its feed-forward block per (Monte Carlo sample, image, class): 20 samples
    # (the design's) would make task 20 alone take an hour here.
    parser.add_argument("--mc-train", type=int, default=2)
    parser.add_argument("--mc-test", type=int, default=2)
    parser.add_argument("--generator-epochs", type=int, default=20)
    parser.add_argument("--graph-tasks", type=int, nargs="*", default=[100],
                        help="task counts of the synthetic DVC graph (the measured count is added)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the per-task table (.csv) or everything (.json)")
    parser.add_argument("--keep", type=Path, help="build the scratch project here and keep it")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="recall-growth-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source"
    source.mkdir(exist_ok=True)
    checkpoint = work / f"{args.arch}-random.pt"
    compose = [*schedule(args), f"dataset.source={source}", f"backbone.checkpoint={checkpoint}"]
    print(f"scratch project: {work / 'project'}")
    print(f"schedule: {args.tasks} tasks x {args.classes_per_task} classes, d={args.dim} ({args.arch}, random weights), "
          f"{args.train_per_class} train / {args.test_per_class} test embeddings per class; overrides: {' '.join(schedule(args))}")
    root = scratch_project(work / "project", {}, compose=compose, folders=FOLDERS)
    make_checkpoint(root, args.arch, args.dim, checkpoint)
    params = yaml.safe_load((root / "params.yaml").read_text())
    print(f"  generator {params['generator']['name']} hidden {params['generator']['hidden']} latent "
          f"{params['generator']['latent']} epochs {params['generator']['epochs']}; prompt epochs "
          f"{params['method']['prompt']['epochs']}, {params['method']['prompt']['per_class_per_epoch']} draws/class/epoch, "
          f"batch {params['method']['prompt']['batch_size']}; head ff {params['method']['head']['attention_ff_width']}, "
          f"mc_train {params['method']['head']['mc_train']}, mc_test {params['method']['head']['mc_test']}, balanced epochs {params['method']['head']['balanced_finetune_epochs']}")
    limits = mlflow_limits()
    print("MLflow limits on tag values (mlflow/utils/validation.py, store/model_registry/dbmodels/models.py): "
          + ", ".join(f"{k} {v}" for k, v in limits.items()))

    setup_s, _ = sh(root, "dvc", "repro", "backbone")
    print(f"setup: dvc repro backbone (prepare + materialise the checkpoint) {setup_s:.1f} s, "
          f"backbone {tree_bytes(root / 'models/backbone') / 2**20:.0f} MiB")
    cache, artifacts, db = root / ".dvc/cache", root / "mlartifacts", root / "mlflow.db"
    before = {"dvc": tree_bytes(cache), "mlflow": tree_bytes(artifacts) + tree_bytes(db)}

    rows: list[dict] = []
    header = ("task", "seen", "total_s", *[f"{s}_s" for s in PER_TASK], "dvc_MiB", "mlflow_MiB", "prompt_MiB",
              "status_s", "noop_s", "rm_tag", "mv_tag")
    print("\n" + "  ".join(f"{h:>9}" for h in header))
    for task in range(1, args.tasks + 1):
        first_id = (task - 1) * args.classes_per_task
        land_batch(source, task, first_id, args.classes_per_task, args.train_per_class, args.test_per_class)
        shutil.rmtree(source / f"batch-{task - 1:03d}", ignore_errors=True)
        ingest_s, _ = sh(root, "recall", "ingest")
        params = yaml.safe_load((root / "params.yaml").read_text())
        start = time.perf_counter()
        write_intake(root, params, task, args.dim, args.seed)
        sh(root, "dvc", "commit", "-f", "-q", f"intake@{task:02d}")
        intake_s = time.perf_counter() - start
        repro_s, stage_s = repro_stages(root)
        status_s, status = sh(root, "dvc", "status")
        noop_s, noop = sh(root, "dvc", "repro")
        if "up to date" not in status or "Running stage" in noop:
            raise SystemExit(f"task {task}: not up to date after dvc repro:\n{status}\n{noop}")
        now = {"dvc": tree_bytes(cache), "mlflow": tree_bytes(artifacts) + tree_bytes(db)}
        tags = longest_tags(root)
        row = {
            "task": task, "seen": task * args.classes_per_task,
            "ingest_s": ingest_s, "intake_s": intake_s, "repro_s": repro_s,
            **{f"{s}_s": stage_s.get(f"{s}@{task:02d}", stage_s.get(s, 0.0)) for s in PER_TASK if s != "intake"},
            "setup_stages_s": sum(v for k, v in stage_s.items() if "@" not in k and k not in PER_TASK),
            "dvc_bytes": now["dvc"] - before["dvc"], "mlflow_bytes": now["mlflow"] - before["mlflow"],
            "mlartifacts_total": tree_bytes(artifacts), "mlflow_db_total": tree_bytes(db), "dvc_cache_total": now["dvc"],
            "prompt_state_bytes": tree_bytes(root / params["paths"]["prompts"] / f"task-{task:02d}.safetensors"),
            "generator_bytes": tree_bytes(root / params["paths"]["generators"] / f"task-{task:02d}.safetensors"),
            "status_s": status_s, "noop_repro_s": noop_s,
            "registered_model_tag": tags["registered_model"], "model_version_tag": tags["model_version"],
            "most_model_tags": tags["most_model_tags"],
        }
        row["total_s"] = ingest_s + intake_s + repro_s
        before = now
        rows.append(row)
        print("  ".join(f"{v:>9}" for v in (
            task, row["seen"], f"{row['total_s']:.1f}", *[f"{row[f'{s}_s']:.1f}" for s in PER_TASK],
            f"{row['dvc_bytes'] / 2**20:.2f}", f"{row['mlflow_bytes'] / 2**20:.2f}", f"{row['prompt_state_bytes'] / 2**20:.2f}",
            f"{status_s:.2f}", f"{noop_s:.2f}", tags["registered_model"]["length"], tags["model_version"]["length"])), flush=True)

    last = rows[-1]
    print(f"\nlongest registered-model tag after task {last['task']}: {last['registered_model_tag']} "
          f"(limit {limits['registered_model_tag']})")
    print(f"longest model-version tag after task {last['task']}: {last['model_version_tag']} "
          f"(limit {limits['model_version_tag']})")
    print(f"most tags on one registered model: {last['most_model_tags']}")

    # Fits over tasks 2.. (task 1 has no balanced finetuning, no champion to meet).
    fitted = rows[1:] if len(rows) > 2 else rows
    seen = [r["seen"] for r in fitted]
    figures = {"total_s": "s", **{f"{s}_s": "s" for s in PER_TASK}, "dvc_bytes": "B", "mlflow_bytes": "B",
               "prompt_state_bytes": "B", "status_s": "s", "noop_repro_s": "s"}
    tag_fits = {}
    print(f"\ngrowth against the seen classes C over tasks {fitted[0]['task']}..{fitted[-1]['task']}: the log-log slope, and "
          f"y = alpha + beta C^b (a per-task constant plus a growing part), projected to {PROJECTION[0]} tasks of "
          f"{PROJECTION[1]} classes (C = {PROJECTION[1]}, {2 * PROJECTION[1]}, ..., {PROJECTION[0] * PROJECTION[1]}):")
    fits = {}
    for name, unit in figures.items():
        ys = [r[name] for r in fitted]
        slope = fit_power(seen, ys)
        offset = fit_offset_power(seen, ys)
        if slope is None and offset is None:
            continue
        scale, shown = (1.0, "s") if unit == "s" else (2.0**20, "MiB")
        if offset is not None:
            alpha, beta, b = offset
            at_last, total = project(lambda c: alpha + beta * c**b, *PROJECTION)
            model = f"{alpha / scale:,.3g} + {beta / scale:.3g} C^{b:.2f} {shown}"
        else:
            a, b = slope
            at_last, total = project(lambda c: a * c**b, *PROJECTION)
            model = f"{a / scale:.3g} C^{b:.2f} {shown}"
        fits[name] = {"loglog_b": slope[1] if slope else None, "offset_fit": offset, "projected_last": at_last,
                      "projected_total": total}
        summed = name not in ("status_s", "noop_repro_s", "prompt_state_bytes")
        print(f"  {name:>20}: log-log b = {slope[1] if slope else float('nan'):5.2f}; {model}; "
              f"at C={PROJECTION[0] * PROJECTION[1]}: {at_last / scale:,.1f} {shown}"
              + (f" per task, {total / scale:,.0f} {shown} over the {PROJECTION[0]} tasks" if summed else ""))
    for kind in ("registered_model_tag", "model_version_tag"):
        lengths = [r[kind]["length"] for r in fitted]
        offset = fit_offset_power(seen, lengths)
        slope = fit_power(seen, lengths)
        if offset is not None:
            alpha, beta, b = offset
            at_last, _ = project(lambda c: alpha + beta * c**b, *PROJECTION)
            tag_fits[kind] = {"loglog_b": slope[1] if slope else None, "offset_fit": offset, "projected_last": at_last}
            print(f"  {kind:>20}: log-log b = {slope[1] if slope else float('nan'):5.2f}; {alpha:,.0f} + {beta:.3g} C^{b:.2f} "
                  f"chars; longest at C={PROJECTION[0] * PROJECTION[1]}: {at_last:,.0f} "
                  f"(limit {limits[kind]}: {'OVER' if at_last > limits[kind] else 'within'})")

    graphs = []
    for tasks in sorted({args.tasks, *args.graph_tasks}):
        graph = synthetic_graph(work, compose, tasks)
        graphs.append(graph)
        print(f"synthetic DVC graph, {tasks} tasks ({graph['stages']} stages): dvc status {graph['status_s']:.1f} s, "
              f"no-op dvc repro {graph['noop_repro_s']:.1f} s (dvc commit -f of every stage {graph['commit_s']:.1f} s)")
    print(f"measured project after {last['task']} tasks: dvc status {last['status_s']:.1f} s, no-op dvc repro {last['noop_repro_s']:.1f} s")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".csv":
            flat = [{k: (v["length"] if isinstance(v, dict) and "length" in v else v) for k, v in r.items()
                     if not isinstance(v, dict) or "length" in v} for r in rows]
            with open(args.out, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(flat[0]))
                writer.writeheader()
                writer.writerows(flat)
        else:
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "limits": limits,
                                            "rows": rows, "fits": fits, "tag_fits": tag_fits, "graphs": graphs}, indent=2))
        print(f"wrote {args.out}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
