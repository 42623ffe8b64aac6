"""Registered models: one per lineage, and versions found again by what went into them.

A *lineage* is what determines a sequence of models: the dataset (its content fingerprint
and non-location settings), the class order and task split, the backbone weights, the
method, the generators, the embedding precision and the seed. Tracking settings and paths
do not enter. Every pipeline run of one lineage registers into the same models,
``<experiment>-<method>-s<seed>-<hash>-<kind>``, so runs of other lineages (another method,
seed or class order, a DVC experiment with other params) never touch its aliases.
``tracking.lineage`` replaces the derived middle part with a stable name for a production
loop, whose runs then share one model and meet the gate.

Each version carries ``recall.input_digest``: a sha256 over the content of what determined
it. A registration whose digest is already there reuses that version instead of adding one,
so re-running an identical experiment, or retrying a step, registers nothing new.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.tracking.lineage import INPUT_DIGEST_TAG, Lineage, lineage_of


def model_name(cfg: Config, kind: str) -> str:
    """The registered model of ``kind`` for ``cfg``'s lineage. A named lineage
    (``tracking.lineage``) needs no pipeline outputs to resolve."""
    from pipeline.tracking.lineage import experiment_name

    if cfg.tracking.lineage:
        return f"{experiment_name(cfg)}-{cfg.tracking.lineage}-{kind}"
    return lineage_of(cfg).model_name(experiment_name(cfg), kind)


def ensure_registered_model(client, name: str, lineage: Lineage, description: str | None = None) -> None:
    """Create the model with its lineage tags, or bring the tags up to date (a named
    lineage records the latest run's lineage; each version keeps its own)."""
    from mlflow.exceptions import MlflowException

    tags = lineage.tags()
    try:
        client.create_registered_model(name, tags=tags, description=description)
        return
    except MlflowException:
        pass  # already registered
    current = client.get_registered_model(name).tags
    for key, value in tags.items():
        if current.get(key) != value:
            client.set_registered_model_tag(name, key, value)


def champion(client, name: str):
    """The version of ``name`` that holds the ``champion`` alias, or None when no version
    (or no model) holds it. Any other failure (a server that stopped answering) is raised:
    read as "no champion", it would let the gate promote a version unchecked."""
    from mlflow.exceptions import MlflowException

    try:
        # Behind MLflow's basic-auth app an alias lookup on a model that does not exist is
        # refused (403) before the store can say "not found"; the model lookup is not.
        client.get_registered_model(name)
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def find_version(client, name: str, digest: str):
    """The earliest version of ``name`` registered from the inputs ``digest``, or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{INPUT_DIGEST_TAG}` = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None
