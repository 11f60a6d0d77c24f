"""Atomic outputs and clean interruption for the stages.

Every output is first written under a temporary name beside its target and renamed
into place only when complete (``os.replace`` is atomic within one file system), so a
failed or interrupted stage never leaves a half-written result that DVC could take
for current.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    Works for a file or a directory (the caller creates either at the yielded path).
    On any exception the temporary path is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    work = tmp / target.name
    try:
        yield work
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """Strict JSON text: non-finite floats become null; NaN/Infinity never appear."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_json(obj), encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` with SIGTERM treated like Ctrl-C, and clean exits.

    Errors the user can fix (bad input, bad parameters: ``ValueError``, ``OSError``)
    print one message and exit 1 instead of a traceback; an interruption exits 130.
    Temporary outputs are removed by ``atomic_path`` on the way out in every case.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        main()
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'SIGINT'}); no output was written", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        if os.environ.get("CHARLM_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
