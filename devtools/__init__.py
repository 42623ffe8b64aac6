"""Development tooling, not part of the product: real servers on loopback, scratch projects,
the container-free team stack and the venv's PATH hook. Tests, benchmarks, `make stack` and
`python -m flows.local` use it; nothing under ``pipeline/`` imports it (an import-linter
contract), so it never enters an installed wheel or a registered model version.
"""
