"""Atomic outputs and clean interruption for the stages.

Every output is first written under a temporary name beside its target and renamed
into place only when complete (``os.replace`` is atomic within one file system), so a
failed or interrupted stage never leaves a half-written result that DVC could take
for current. ``run`` turns SIGINT, SIGTERM and SIGHUP into a prompt, clean exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Signals that stop a stage cleanly: Ctrl-C, `kill`, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CHILD_GRACE = 0.5  # seconds a child process gets to exit after SIGTERM, then SIGKILL
CLEANUP_LIMIT = 5.0  # seconds the unwinding after a stop signal may take, then exit anyway


def _remove_stale(target: Path) -> None:
    """Remove temporaries of ``target`` left by a killed run (SIGKILL, power loss)."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    Works for a file or a directory (the caller creates either at the yielded path).
    On any exception (an interruption included) the temporary path is removed and
    ``target`` is untouched. The temporary lives in a hidden directory
    ``.<name>.<random>.tmp`` next to ``target``; leftovers of a run that was killed
    outright are removed on the next call.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
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


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; carries its number for the exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _stop_children() -> None:
    """Stop every process this one started (the report's Jupyter kernel): SIGTERM,
    then SIGKILL after CHILD_GRACE, so that the unwinding that follows does not wait
    for a polite shutdown and no orphan is left."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with dvc
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=CHILD_GRACE)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _on_signal(signum: int, frame: Any) -> None:
    for s in STOP_SIGNALS:  # one interruption at a time: let the cleanup finish...
        signal.signal(s, signal.SIG_IGN)
    watchdog = threading.Timer(CLEANUP_LIMIT, os._exit, (128 + signum,))
    watchdog.daemon = True  # ...but never hang on it
    watchdog.start()
    _stop_children()
    raise Interrupted(signum)


# Shells DVC may run a stage's cmd through (its ``SHELL``, else /bin/sh). bash and zsh
# exec a lone command, so dvc is the stage's parent; dash (Debian's /bin/sh) forks and
# waits, so dvc is the grandparent and outlives nothing when killed.
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "busybox"})
PARENT_POLL = 0.2  # seconds between checks that dvc is still alive


def _die_with_parent() -> None:
    """Under DVC (DVC_STAGE is set), stop with SIGTERM when dvc dies.

    DVC ignores SIGINT while a stage runs and forwards no signal, so ``kill <dvc pid>``
    would otherwise leave the stage running, writing its outputs behind dvc's back.
    Linux's PR_SET_PDEATHSIG covers the direct parent. When the parent is a shell
    that forked the stage (dash), that shell survives dvc, so a daemon thread also
    watches the process above the shell (psutil's ``is_running`` compares start
    times, so a reused pid is not mistaken for dvc) and sends SIGTERM to this
    process when it is gone; the stage's handler then unwinds as for any SIGTERM.
    """
    if "DVC_STAGE" not in os.environ:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass
    if os.getppid() == 1:  # dvc died before the request took effect
        raise Interrupted(signal.SIGTERM)
    import psutil  # comes with dvc

    try:
        watched = psutil.Process().parent()
        if watched is not None and Path(watched.name()).name in SHELLS:
            watched = watched.parent()
    except psutil.Error:  # pragma: no cover - the parent vanished meanwhile
        watched = None
    if watched is None or watched.pid == 1:
        raise Interrupted(signal.SIGTERM)

    def watch() -> None:
        with contextlib.suppress(psutil.Error):  # NoSuchProcess: dvc is gone
            while watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE:
                time.sleep(PARENT_POLL)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-dvc", daemon=True).start()


def _exit_now(status: int) -> None:
    """Exit without the interpreter's teardown (over a second once torch is loaded)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_show_default = warnings.showwarning


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Parameter warnings already name file, line and key: print them plainly."""
    if category.__name__ == "ParamsWarning":
        print(f"warning: {message}", file=sys.stderr)
    else:
        _show_default(message, category, *args, **kwargs)


def run(main: Callable[[], None]) -> None:
    """Run a stage's ``main``: clean exits on bad input and on stop signals.

    Errors the user can fix (bad input, bad parameters: ``ValueError``, ``OSError``)
    print one message and exit 1 instead of a traceback (set CHARLM_TRACEBACK=1 for
    the traceback). SIGINT, SIGTERM and SIGHUP stop the stage within a moment: the
    temporary outputs are removed by ``atomic_path`` on the way out, child processes
    are stopped, and the exit status is 128 + the signal number (130 for Ctrl-C, 143
    for SIGTERM). A SIGINT that the parent chose to ignore stays ignored.

    Every failure exits through ``os._exit`` (``_exit_now``), without the interpreter's
    teardown: a Dask cell still running in a daemon thread of the embedded cluster
    (``pipeline.cells``) when another cell failed would otherwise be inside torch's C++
    code as the interpreter finalizes, and the process would abort (SIGABRT, "terminate
    called without an active exception", exit status 134) instead of exiting 1.
    """
    warnings.showwarning = _show_warning
    for s in STOP_SIGNALS:
        if signal.getsignal(s) != signal.SIG_IGN:
            signal.signal(s, _on_signal)
    try:
        _die_with_parent()
        main()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"\ninterrupted by {signal.Signals(signum).name}: the stage did not finish and "
            "left no partial output (temporary files removed); run it again (dvc repro)",
            file=sys.stderr,
        )
        _exit_now(128 + signum)
    except (ValueError, OSError) as e:
        if os.environ.get("CHARLM_TRACEBACK"):
            traceback.print_exc()
        else:
            print(f"error: {e}", file=sys.stderr)
        _exit_now(1)
    except Exception:  # a bug: its traceback, and the exit status Python would give
        traceback.print_exc()
        _exit_now(1)
