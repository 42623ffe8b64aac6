"""Recall: a CLIP classifier that keeps learning new classes without keeping old images.

Layers, each importing only those below it (``lint-imports`` holds this, see pyproject.toml):

- ``cli``: the ``recall`` commands dvc.yaml and the operator run;
- ``stages``: one module per DVC stage family: read its inputs, call the method, write its
  outputs, track the run;
- ``stream`` (the update loop's batches, ledger and intake) and ``serving`` (the pyfunc
  model a version is);
- ``tracking``: MLflow runs, lineage, the registry and the promotion gate;
- ``method`` (generators, prompts, head, classifier, metrics, replay) and ``clip`` (the
  backbone, the demo CLIP, embedding);
- ``data``: datasets, manifests and the task split;
- ``config``, ``io``, ``errors``, ``compat``, ``scaleout``: what everything shares.
"""
