"""Datasets as prepared manifests: class names, templates and per-split sample lists."""

from pipeline.data.manifest import Prepared, Sample, load_prepared
from pipeline.data.prepare import DataError, DatasetUnavailable, prepare_dataset

__all__ = ["DataError", "DatasetUnavailable", "Prepared", "Sample", "load_prepared", "prepare_dataset"]
