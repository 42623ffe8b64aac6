"""Import-time fixes for this environment, applied only when needed.

The torchvision wheel that pairs with torch 2.13 is a CUDA build; next to a CPU torch its
import fails with ``operator torchvision::nms does not exist`` because the compiled ops
library cannot load. Registering the two operator schemas it looks up at import time lets
the pure-Python parts (datasets, transforms) import. The ops themselves stay unavailable,
and nothing in Recall calls them.
"""

from __future__ import annotations

import os

# Every program Recall starts or runs in gets these (the one telemetry switch; the Makefile and
# infra/ set the same variables for programs started outside Python).
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
}


def disable_telemetry() -> None:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def import_torchvision():
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
        _define_missing_torchvision_ops()
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    return torchvision


def _define_missing_torchvision_ops() -> None:
    import torch

    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define(
        "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor"
    )
    # Keep the library object alive for the life of the process.
    _define_missing_torchvision_ops.library = library  # type: ignore[attr-defined]


def import_open_clip():
    import_torchvision()
    import open_clip

    return open_clip


def import_torchmetrics_classification():
    """``torchmetrics.functional.classification`` (torchmetrics imports torchvision)."""
    import_torchvision()
    from torchmetrics.functional import classification

    return classification
