"""The DVC stages' code, one module per stage family (``prepare``, ``split``, ``backbone``,
``embed``, ``intake``, ``generators``, ``replay``, ``prompts``, ``finetune``, ``novelty``,
``evaluate``, ``report``): each reads its inputs, calls the method, writes its outputs
atomically and tracks itself as one MLflow run. dvc.yaml lists each stage's module and what
it imports as the stage's code dependencies (tests/test_dvc_code_deps.py derives them).
"""
