"""Put the virtual environment's ``bin`` first on PATH for every program its Python runs.

DVC stages call ``recall``; ``.venv/bin/dvc exp run`` without an activated venv would not
find it. ``python -m devtools.venv_path`` (run by ``make install``) writes a ``.pth`` file
into the venv's site-packages that does at interpreter start-up what activating does to
PATH, once, so nested interpreters do not grow it.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "recall_venv_path.pth"

# One line: a .pth line starting with "import" is executed by site.py at start-up.
PTH_LINE = (
    "import os, sys; b = os.path.dirname(sys.executable); p = os.environ.get('PATH', ''); "
    "os.environ['PATH'] = p if p.split(os.pathsep)[:1] == [b] else b + os.pathsep + p\n"
)


def install() -> Path:
    if sys.prefix == sys.base_prefix:
        raise SystemExit("not inside a virtual environment: nothing to do")
    target = Path(sysconfig.get_path("purelib")) / PTH_NAME
    target.write_text(PTH_LINE)
    return target


if __name__ == "__main__":
    print(f"wrote {install()}")
