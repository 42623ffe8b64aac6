"""MLflow: where runs go (``server``), one run per step (``runs``), what identifies a line of
models (``lineage``), registered models and versions (``registry``) and the gate that moves
``champion`` (``gate``).
"""
