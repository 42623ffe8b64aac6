"""Log a task's classifier as an MLflow pyfunc model version, with only the code serving needs.

The model's code path is a copy of the part of ``pipeline`` that loading and predicting
import (:data:`SERVING_CODE`; tests/test_serving.py holds it equal to the import closure of
``pipeline.serving.model``): training, stages, tracking and dev tooling stay out of every
model version.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.tracking.server import using_tracking_uri

PACKAGE = Path(__file__).resolve().parents[1]
# Files and folders under pipeline/ that a loaded model imports.
SERVING_CODE = (
    "__init__.py", "compat.py", "config", "errors.py", "io.py", "scaleout.py",
    "clip/__init__.py", "clip/backbone.py", "clip/model_configs",
    "method/__init__.py", "method/classifier.py", "method/generators.py", "method/head.py", "method/prompts.py",
    "method/replay.py",
    "serving/__init__.py", "serving/model.py", "serving/pyfunc_model.py",
)


def serving_code(staging: Path) -> Path:
    """A ``pipeline`` folder under ``staging`` holding :data:`SERVING_CODE`."""
    target = staging / "pipeline"
    for name in SERVING_CODE:
        source, destination = PACKAGE / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination)
    return target


def signature_and_example(dim: int):
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "image", required=False),
        ColSpec(Array("double"), "embedding", required=False),
    ])
    outputs = Schema([
        ColSpec("string", "label"), ColSpec("long", "class_id"), ColSpec("double", "max_probability"),
        ColSpec("double", "entropy"), ColSpec("double", "energy"), ColSpec("double", "sample_variance"),
        ColSpec(Array("double"), "probabilities"),
    ])
    example = pd.DataFrame({"embedding": [[0.0] * dim]})
    return ModelSignature(inputs=inputs, outputs=outputs), example


def pinned_requirements() -> list[str]:
    """What the model needs, pinned to this environment's versions. torch's local tag
    (``+cpu``) is dropped: it names a wheel index, not a version pip can resolve."""
    from importlib.metadata import version

    pins = []
    # What `pipeline` (the model's code path) imports: the classifier itself needs torch,
    # safetensors, pydantic and pyyaml; images also need the backbone (open_clip, torchvision).
    for dist in ("torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pandas", "pillow",
                 "pydantic", "pyyaml", "mlflow"):
        try:
            pins.append(f"{dist}=={version(dist).split('+')[0]}")
        except Exception:
            continue
    return pins


def log_pyfunc(tracking_uri: str, run_id: str, classifier_path: Path, dim: int) -> str:
    """Log the pyfunc model under the run; returns its model URI."""
    import mlflow

    signature, example = signature_and_example(dim)
    with tempfile.TemporaryDirectory() as staging, using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=str(Path(__file__).resolve().parent / "pyfunc_model.py"),
            artifacts={"classifier": str(classifier_path)},
            code_paths=[str(serving_code(Path(staging)))],
            pip_requirements=pinned_requirements(),
            signature=signature,
            input_example=example,
        )
    return info.model_uri
