"""Recall's OmegaConf resolvers, registered wherever Hydra composes ``conf/``.

Hydra imports every module under the ``hydra_plugins`` namespace when it starts, and DVC's
Hydra integration (``dvc exp run -S ...``) starts Hydra in its own process, so registering
here makes the resolvers available there too, not only in ``recall``.
"""

from omegaconf import OmegaConf


def task_chain(n_tasks: int) -> dict[str, dict[str, object]]:
    """``{"01": {"task": 1, "previous": "00"}, ...}``: one entry per task, for DVC's foreach.

    DVC cannot do arithmetic on ``${item}``; each per-task stage finds the state it builds
    on (task 0 is the initial state) through ``previous``.
    """
    n = int(n_tasks)
    return {f"{t:02d}": {"task": t, "previous": f"{t - 1:02d}"} for t in range(1, n + 1)}


# Returned as a DictConfig: OmegaConf.resolve (what DVC calls) cannot put a plain dict in
# place of the interpolation.
OmegaConf.register_new_resolver("recall_task_chain", lambda n: OmegaConf.create(task_chain(n)), replace=True)
