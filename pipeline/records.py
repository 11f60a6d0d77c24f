"""Run records: how long each stage took, and where its result came from.

Every stage writes, beside its results, a run record ``data/runs/<stage>.json``: its
wall time, the git revision, the DVC experiment name and the torch, DVC and Python
versions (plus stage-specific figures such as training's microseconds per
model-step). Results (models, metrics) hold none of this, so the same params on the
same machine give byte-identical results and DVC sees them unchanged. The report
shows the records and never reads git or clocks itself: rerunning it on the same
inputs gives the same bytes, and a record restored from DVC's run cache is the
record of the run that computed the restored outputs.

This module is not a dependency of any stage in dvc.yaml: editing it changes no
result, so it reruns nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline import outputs

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
        "torch": _version("torch"),
        "dvc": _version("dvc"),
        "python": platform.python_version(),
    }


def write_record(path: Path | None, **extra: Any) -> None:
    """Write the run record of a stage to ``path`` (atomically; nothing when None).

    Call it once the stage's outputs are written. The record's "seconds" is the wall
    time of the stage's process from its start (interpreter and imports included)
    to now, in seconds.

    Args:
        path: ``data/runs/<stage>.json``; the file's stem names the stage
            (``train@kaiming``), as in ``dvc.yaml``.
        extra: stage-specific figures (JSON-serialisable, finite).

    The record is {"stage", "seconds", **extra, **describe()}.
    """
    if path is None:
        return
    import psutil  # comes with dvc

    seconds = time.time() - psutil.Process().create_time()
    path = Path(path)
    record = {"stage": path.stem, "seconds": round(seconds, 3), **extra, **describe()}
    outputs.write_json(path, record)


def add_record_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--record PATH`` option every stage takes (dvc.yaml: data/runs/<stage>.json)."""
    parser.add_argument(
        "--record",
        type=Path,
        metavar="PATH",
        help="where to write this run's record (wall time, git revision, versions)",
    )
