"""Where a result came from: git revision, DVC experiment name, versions.

Read by the evaluate stage when it runs and stored with its outputs, so the report
shows the revision that *computed* the numbers and never reads git itself: rerunning
the report on the same inputs then gives the same bytes, whatever was committed since
(the revision changes exactly when evaluate reruns, i.e. when its inputs change).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

# Files a pipeline run itself rewrites; their changes do not make the code "dirty".
RUN_OUTPUTS = (":(exclude)dvc.lock", ":(exclude)reports")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(cwd: Path | None = None) -> dict[str, str | None]:
    """Revision and environment of the current run.

    Returns 'git_revision' (12 hex digits, None outside a git repository),
    'git_dirty' ('yes' when tracked files other than dvc.lock and reports/ differ
    from HEAD, as in a ``dvc exp run -S``), 'dvc_experiment' (``DVC_EXP_NAME``, which
    ``dvc exp run`` sets for every stage command), and the torch, DVC and Python versions.
    """
    cwd = Path.cwd() if cwd is None else cwd
    rev = _git(["rev-parse", "--short=12", "HEAD"], cwd)
    dirty = None
    if rev is not None:
        status = _git(
            ["status", "--porcelain", "--untracked-files=no", "--", ".", *RUN_OUTPUTS], cwd
        )
        dirty = None if status is None else ("yes" if status else "no")
    return {
        "git_revision": rev,
        "git_dirty": dirty,
        "dvc_experiment": os.environ.get("DVC_EXP_NAME") or None,
        "torch": torch.__version__,
        "dvc": _version("dvc"),
        "python": platform.python_version(),
    }
