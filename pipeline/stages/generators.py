"""Stage `generators@NN`: fit one generator per class of task NN, as one batched bank.
"""

from __future__ import annotations

from typing import Any

from pipeline import scaleout
from pipeline.clip import backbone as backbone_lib
from pipeline.config import Config
from pipeline.stages._common import TaskInputError, checked_task_inputs, real_embeddings, set_torch_threads, task_file
from pipeline.tracking.lineage import input_digest, tensors_digest
from pipeline.tracking.runs import Tracker


def run_fit_generators(cfg: Config, task: int) -> dict[str, Any]:
    """Fit the generators of task ``task``'s classes on their real train embeddings."""
    import time

    from pipeline.method import generators

    set_torch_threads()
    tracker = Tracker(cfg)
    with tracker.step("generators", task=task, params={"generator": cfg.generator.model_dump(mode="json")}) as run:
        inputs = checked_task_inputs(cfg, task)
        classes = inputs.class_ids
        sha256 = backbone_lib.read_info(cfg.paths.backbone)["sha256"]
        data = real_embeddings([inputs.train], sha256, classes)
        run.record_inputs(train_embeddings=inputs.train)
        by_class = {c: data["embeddings"][data["labels"] == c] for c in classes}
        names = dict(zip(inputs.class_ids, inputs.class_names))
        for c, x in by_class.items():
            if len(x) < 2:
                raise TaskInputError(
                    f"task {task}: class {c} ({names[c]!r}) has {len(x)} training embedding(s); "
                    "a generator needs at least 2"
                )
        start = time.perf_counter()
        try:
            with scaleout.cluster_client(cfg.cluster) as client:
                bank = generators.fit_bank(by_class, cfg.generator, seed=cfg.seed, client=client)
        except generators.GeneratorError as exc:
            raise TaskInputError(f"task {task}: {exc}") from None
        seconds = time.perf_counter() - start
        out = task_file(cfg.paths.generators, task)
        generators.save_bank(out, bank, {"task": str(task), "backbone_sha256": sha256, "seconds": f"{seconds:.3f}"})
        figures = {"fit_seconds": seconds, "fit_loss_mean": sum(bank.fit_loss) / len(bank.fit_loss)}
        run.log_metrics(figures, step=task)
        # The bank is determined by its classes' train embeddings, given the lineage (which
        # holds the generator settings and seed).
        digest = input_digest(tracker.lineage, f"{bank.kind}-bank", task, {
            "train_embeddings": tensors_digest({str(c): x for c, x in by_class.items()}),
        })
        run.register_model(tracker.model_name(f"{bank.kind}-bank"), [out], tracker.version_tags(task),
                           input_digest=digest, lineage=tracker.lineage)
    return figures
