"""The test suite's own layout: test modules share helpers through support.py only.

A test module that imports another (``from test_params import ...``) runs that module's
collection-time code twice and couples the two; importing conftest.py (pytest loads it
itself) makes a second copy of it; benchmarks/ is not a library: the lecture's oracle is
reference/lecture.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_no_test_module_imports_another_or_benchmarks(path: Path) -> None:
    bad = sorted(
        m
        for m in imported_modules(path)
        if m.split(".")[0] in ("conftest", "tests", "benchmarks") or m.startswith("test_")
    )
    assert bad == [], f"{path.name} imports {bad}: use support.py (or a conftest fixture)"
