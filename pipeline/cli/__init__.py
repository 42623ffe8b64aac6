"""``recall``: one command per pipeline stage (what dvc.yaml runs) and the operator's commands.

Every command reads the composed ``params.yaml`` (``--params``) or, given Hydra overrides
such as ``dataset=imagefolder dataset.root=/data``, composes ``conf/`` itself.
"""

from pipeline.cli import ops_commands, stage_commands  # noqa: F401  (they register the commands)
from pipeline.cli.core import app

__all__ = ["app"]
