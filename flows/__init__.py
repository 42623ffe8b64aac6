"""Prefect flows that run the DVC stages (prefect.yaml deploys them); see docs/prefect.md."""
