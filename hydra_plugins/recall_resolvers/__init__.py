"""Recall's OmegaConf resolvers, registered wherever Hydra composes ``conf/``.

Hydra imports every module under the ``hydra_plugins`` namespace when it starts, and DVC's
Hydra integration (``dvc exp run -S ...``) starts Hydra in its own process, so registering
here makes the resolvers available there too, not only in ``recall``.

Benchmark mode and the stream (update loop) run the same per-task stages; they differ only
in where a task's classes and embeddings come from, which each task's entry names.
"""

from omegaconf import OmegaConf

from pipeline.config.task_chain import ledger_tasks, stage_switches, task_chain

# Returned as DictConfigs: OmegaConf.resolve (what DVC calls) cannot put a plain dict in
# place of the interpolation.
OmegaConf.register_new_resolver(
    "recall_task_chain", lambda n, *rest: OmegaConf.create(task_chain(n, *rest)), replace=True
)
OmegaConf.register_new_resolver(
    "recall_stages",
    lambda name, chain: OmegaConf.create(stage_switches(name, OmegaConf.to_container(chain) if chain is not None else {})),
    replace=True,
)
OmegaConf.register_new_resolver("recall_ledger_tasks", lambda ledger: ledger_tasks(ledger), replace=True)
