"""The house rules a newcomer relies on: where code lives and who may import whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support.common import REPO


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
    return found


def test_no_test_module_imports_another():
    """Shared helpers live in tests/support (fixtures in conftest.py): a test module can be
    moved, renamed or run alone."""
    tests = REPO / "tests"
    modules = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    offenders = {p.name: sorted(_imported_modules(p) & modules) for p in [*tests.glob("*.py"), *tests.glob("support/*.py")]}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_module_says_what_it_is_for():
    missing = [p.relative_to(REPO).as_posix() for folder in ("pipeline", "flows", "devtools") for p in (REPO / folder).rglob("*.py")
               if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"


def test_the_import_contracts_hold():
    """pyproject.toml's [tool.importlinter]: pipeline's layers import downwards only, and no
    product module imports devtools (`make test` runs the same check first)."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout
