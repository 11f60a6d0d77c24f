"""Run independent cells of work on Dask: on this machine, or on an existing cluster.

A cell is one call ``fn(cell)`` that depends only on its argument (params and seeds:
training one architecture for several gains x seeds, say) and returns a picklable value
(a dict of tensors and numbers). ``run_cells`` submits every cell to a
``dask.distributed`` scheduler, shows a progress bar of cells done and returns the
results keyed by cell id, plus a run record saying where and how long they ran; the
caller writes its outputs once, at the end (``pipeline.outputs.atomic_path``).

Where the cells run is set by the environment variable CHARLM_SCHEDULER:
- unset or empty: an embedded cluster, started and stopped by ``run_cells`` inside this
  process: a scheduler and one worker thread per usable CPU
  (``charlm.cpus.available_cpus``), talking over Dask's in-process transport
  (``inproc://``). It opens no port for Dask's protocol, so nobody else on the machine
  can send it code (the HTTP servers Dask starts anyway, the scheduler's and each
  worker's, have no routes and listen on a free port of 127.0.0.1), and it costs no
  process start: a stage runs as fast as calling its cells directly (docs/cluster.md,
  "Speed");
- ``tcp://host:8786`` or ``tls://host:8786``: the scheduler of a cluster started by hand
  or by a batch system (docs/cluster.md). TLS certificates come from Dask's own
  configuration (``distributed.comm.tls.*``, e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE).

Every cell runs with torch on one intra-op thread (``call_cell``), wherever it runs, so
one worker thread is one core, and a result does not depend on the host's core count:
the same cells give the same bytes embedded, on a cluster, or called directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

SCHEDULER_ENV = "CHARLM_SCHEDULER"
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler before SchedulerUnreachable
CLOSE_TIMEOUT = 3.0  # seconds the client and the embedded cluster get to shut down
WATCH_SECONDS = 5.0  # how often a run on a cluster looks whether any worker is left
# The embedded cluster: no HTTP routes (metrics, JSON state) on the scheduler's HTTP
# server, which it opens even without a dashboard (on a free loopback port: see _client);
# no statistical profiler, which would sample the cells' stacks 100 times a second in
# this process (under the GIL) for a dashboard nobody can open.
EMBEDDED_CONFIG = {
    "distributed.scheduler.http.routes": [],
    "distributed.worker.http.routes": [],
    "distributed.worker.profile.enabled": False,
}
TLS_HINT = (
    "distributed.comm.tls.ca-file, .client.cert and .client.key in Dask's configuration "
    "(DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ..._CLIENT__CERT, ..._CLIENT__KEY)"
)


class SchedulerUnreachable(ConnectionError, RuntimeError):
    """The Dask scheduler at ``address`` cannot be used: it did not answer within the
    connect timeout, or (tls://) this side has no TLS certificate configured.

    A ConnectionError (an OSError), so that a stage (``pipeline.outputs.run``) stops with
    its one-line ``error: no Dask scheduler reachable at <address>: ...`` and exit
    status 1, not a traceback; a RuntimeError too, as it was first."""

    def __init__(self, address: str, reason: str):
        super().__init__(
            f"no Dask scheduler reachable at {address}: {reason}; see docs/cluster.md, or "
            f"unset {SCHEDULER_ENV} to run the cells on this machine"
        )
        self.address = address


class ClusterCannotLoadCells(OSError):
    """The scheduler or a worker of the cluster at ``address`` cannot unpickle the cells'
    function: this repository (at this revision) is not importable there. Dask's
    scheduler unpickles every task too, so it needs the code as much as the workers do.

    An OSError (the cluster's environment, not the cell, is at fault), so that a stage
    stops with one ``error:`` line naming the processes and what to fix, instead of a
    traceback blaming the first cell."""

    def __init__(self, address: str, who: str, error: BaseException | str):
        super().__init__(
            f"the Dask {who} cannot load the cells' code ({error}): start the "
            "scheduler and every worker from this repository's revision with its root on "
            "PYTHONPATH and the packages of requirements.txt (docs/cluster.md, 'What every "
            "worker needs')"
        )
        self.address = address


# what check_address lets through: Dask's network transports (not inproc://, which only
# exists inside one process) and a host: a name, an IPv4 address or [IPv6%zone]
SCHEMES = ("tcp", "tls", "ws", "wss")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_PORT = re.compile(
    rf"(?:\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]|{_LABEL}(?:\.{_LABEL})*):([0-9]{{1,5}})"
)


def check_address(address: str, source: str = SCHEDULER_ENV) -> str:
    """``address`` if it is a scheduler address Dask can connect to: ``tcp://HOST:PORT``
    or ``tls://HOST:PORT`` (also Dask's ``ws://`` and ``wss://``, and a bare
    ``HOST:PORT``, which Dask reads as tcp://); HOST a name, an IPv4 address or an IPv6
    address in brackets, PORT 1-65535. Schemes are case-sensitive, as in Dask.

    Raises:
        ValueError: anything else, naming ``source`` (the variable or argument it came
            from) and the value: without this check Dask's own parse errors ("missing
            port number", "not enough values to unpack") name neither.
    """
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    match = _HOST_PORT.fullmatch(rest)
    if scheme not in SCHEMES or match is None or not 0 < int(match.group(1)) < 65536:
        raise ValueError(
            f"{source}={address!r} is not a Dask scheduler address: expected tcp://HOST:PORT "
            f"or tls://HOST:PORT (e.g. tcp://10.0.0.5:8786), or unset {SCHEDULER_ENV} to run "
            "the cells on this machine"
        )
    return address


def _loadable(fn: Callable[[Any], Any]) -> bool:
    """Runs on the scheduler and on every worker: getting here means ``fn`` (the cells'
    function, pickled by reference) and this module were unpickled there."""
    return True


# errors of unpickling a function pickled by reference: its module or the repository is
# missing (ModuleNotFoundError, ImportError), or an older revision lacks the function
# (AttributeError: Can't get attribute ...). A worker's comes back from client.run as a
# bare Exception holding the original's repr.
_LOAD_ERRORS = (ImportError, AttributeError, pickle.UnpicklingError)
_LOAD_ERROR_TEXT = re.compile(
    r"(?:ModuleNotFoundError|ImportError|AttributeError|UnpicklingError)\("
)


def _load_error(e: BaseException) -> str | None:
    """The text of ``e`` if it says that code could not be unpickled, else None."""
    if isinstance(e, _LOAD_ERRORS):
        return repr(e)
    text = str(e)
    return text if type(e) is Exception and _LOAD_ERROR_TEXT.match(text) else None


def _check_code(client: Any, address: str, fn: Callable[[Any], Any]) -> None:
    """Raise ClusterCannotLoadCells if the scheduler or a connected worker cannot
    unpickle ``fn``. Without this, a scheduler without the code fails every cell with
    "Error during deserialization of the task graph", and a worker without it leaves the
    cluster on its first task while the stage waits without a word. Other errors of the
    probe are not this one: a worker leaving while asked (its connection closed) is left
    to the scheduler, which reruns its cells; the scheduler's own connection error
    propagates. Workers that join later are not checked.
    """
    try:
        client.run_on_scheduler(_loadable, fn)
    except Exception as e:
        text = _load_error(e)
        if text is None:
            raise
        raise ClusterCannotLoadCells(address, f"scheduler at {address}", text) from e
    replies = client.run(_loadable, fn, on_error="return")
    bad = {
        w: t for w, r in replies.items() if isinstance(r, BaseException) and (t := _load_error(r))
    }
    if bad:
        worker, text = sorted(bad.items())[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ClusterCannotLoadCells(address, f"worker {worker}{more} of {address}", text)


def _scheduler_lost(e: BaseException) -> bool:
    """Whether a future's error says the client lost its scheduler (the scheduler died
    or the network went), not that the cell failed."""
    from distributed.client import FutureCancelledError

    return isinstance(e, FutureCancelledError) and "scheduler-connection-lost" in e.reason


def _identity(client: Any, n_workers: int = -1) -> dict[str, Any]:
    """The scheduler's identity: its "address", "n_workers" and (up to ``n_workers``, -1
    for all) its "workers". Asked directly: ``Client.scheduler_info`` returns a copy
    shared with Dask's own refresh every 2 s, which asks for no workers, so a refresh
    landing between the two could empty the workers of a run record."""
    return client.sync(client.scheduler.identity, n_workers=n_workers)


@contextlib.contextmanager
def _watch_workers(
    client: Any, address: str, desc: str, alone: bool, every: float
) -> Iterator[None]:
    """While the block runs, say on stderr when the cluster at ``address`` has no worker
    left and when workers are back. Dask's scheduler keeps the cells of a cluster without
    workers and waits for one (a batch job's walltime ended, say): without a word the
    stage looks hung. ``alone``: no worker at the start (already said by the caller)."""
    from tqdm import tqdm

    stop = threading.Event()

    def watch() -> None:
        nonlocal alone
        while not stop.wait(every):
            try:
                n = _identity(client, n_workers=0)["n_workers"]
            except Exception:  # the client is closing, or the scheduler is away a moment
                continue
            if n == 0 and not alone:
                tqdm.write(
                    f"{desc}: no Dask worker left at {address}; the cells wait for one "
                    "(start workers: docs/cluster.md)",
                    file=sys.stderr,
                )
            elif n and alone:
                tqdm.write(f"{desc}: {n} Dask worker(s) at {address}; going on", file=sys.stderr)
            alone = n == 0

    thread = threading.Thread(target=watch, name="charlm-watch-workers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()  # a daemon thread: not joined (it may be inside a scheduler call)


class _OneThread:
    """torch on one intra-op thread while any cell of this process runs.

    ``torch.set_num_threads`` is partly per thread (OpenMP's setting) and partly
    process-wide (MKL's, and the count that threads started later pick up). Each
    entering cell sets 1 in its own thread; the last one to leave restores the count the
    first one found, so that cells running side by side in one process (the embedded
    cluster's worker threads) never see another's restore. A cell abandoned after an
    interruption (``_abandon_running_cells``) holds the count at 1 until it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._saved = 1

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        import torch

        with self._lock:
            if self._running == 0:
                self._saved = torch.get_num_threads()
            self._running += 1
            torch.set_num_threads(1)
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0 and self._saved != 1:
                    torch.set_num_threads(self._saved)


_one_thread = _OneThread()


def call_cell(fn: Callable[[Any], Any], cell: Any) -> tuple[Any, dict[str, Any]]:
    """Call ``fn(cell)`` with torch on one intra-op thread; the task every worker runs.

    Returns ``(result, where)``, ``where`` being {"worker": the Dask worker's address
    (None outside a worker), "seconds": fn's wall time, "cpu_seconds": its CPU time in
    this thread (below "seconds" when other load shares the cores)}. torch's thread count
    is restored once no cell of this process runs any more. Thread-safe. Exceptions of
    ``fn`` propagate unchanged.
    """
    from distributed import get_worker

    with _one_thread():
        start, cpu = time.perf_counter(), time.thread_time()
        result = fn(cell)
        seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
    try:
        worker = get_worker().address
    except ValueError:  # called directly, not in a Dask worker
        worker = None
    return result, {"worker": worker, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}


def _close(closable: Any) -> None:
    """Close a client or cluster within CLOSE_TIMEOUT; a slow shutdown is no failure."""
    with contextlib.suppress(TimeoutError):
        closable.close(timeout=CLOSE_TIMEOUT)


def _connect(address: str, timeout: float) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address``, TLS from Dask's
    configuration.

    Raises:
        SchedulerUnreachable: no answer within ``timeout``, the TLS files unreadable, or
            an answer that is not a Dask scheduler's (a worker's address gives a
            TypeError deep in Dask); the reason in its message. (Something that accepts
            the connection and never answers, a dashboard's HTTP port, say, is not
            caught: Dask's timeout does not cover its handshake. Ctrl-C stops the wait;
            running the Client in a thread with a deadline deadlocked Dask's shared
            event-loop lock once the abandoned thread's client was closed.)
    """
    from distributed import Client

    try:
        return Client(address, timeout=timeout)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise SchedulerUnreachable(address, f"cannot read a TLS file ({e})") from e
    except (OSError, TimeoutError) as e:
        raise SchedulerUnreachable(address, f"no answer within {timeout:g} s ({e})") from e
    except Exception as e:
        reason = f"it did not answer as a Dask scheduler ({type(e).__name__}: {e})"
        raise SchedulerUnreachable(address, reason) from e


@contextlib.contextmanager
def _client(address: str | None, timeout: float, n_workers: int | None) -> Iterator[Any]:
    """A Client of the scheduler at ``address``, or of an embedded in-process cluster of
    ``n_workers`` worker threads (default ``available_cpus()``) when None; closed on the
    way out, the embedded cluster too."""
    import dask
    from distributed import Client, LocalCluster, Security

    from charlm.cpus import available_cpus

    if address is not None:
        if address.startswith("tls://") and not Security().tls_client_cert:
            raise SchedulerUnreachable(address, f"no client certificate: set {TLS_HINT}")
        client = _connect(address, timeout)
        try:
            yield client
        finally:
            _close(client)
        return
    with dask.config.set(EMBEDDED_CONFIG):
        cluster = LocalCluster(
            n_workers=available_cpus() if n_workers is None else n_workers,
            threads_per_worker=1,
            processes=False,  # scheduler and workers in this process, over inproc://
            dashboard_address=None,
            # no dashboard, but the scheduler and each worker still open an HTTP server
            # (no routes): on a free loopback port (the workers' default is every
            # interface; the scheduler's 8787, which another cluster may hold)
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            worker_dashboard_address="127.0.0.1:0",
            # no memory limit: each worker would compare the whole process's memory
            # with its share of the RAM (RAM / workers) and pause above 80% of it, and
            # the stage would stop making progress without a word
            memory_limit=0,
            # not even a failed cell's "Compute Failed" and traceback: its exception
            # reaches the caller, with the cell's id in a note
            silence_logs=logging.CRITICAL,
        )
    try:
        client = Client(cluster, timeout=timeout)
        try:
            yield client
        finally:
            _close(client)
    except BaseException:
        _abandon_running_cells(cluster)
        raise
    finally:
        _close(cluster)


def _abandon_running_cells(cluster: Any) -> None:
    """Close the embedded workers without waiting for the cells still running in their
    threads (after an exception or Ctrl-C: a thread cannot be stopped). Such a cell runs
    on to its end, its result dropped; the worker threads are daemons, so it does not
    keep the process alive. Dask's own close would wait for it, up to 30 s, and the
    thread doing that wait would hold up the interpreter's exit."""
    for worker in list(cluster.workers.values()):
        with contextlib.suppress(Exception):  # closed already, or the loop is gone
            cluster.sync(worker.close, timeout=CLOSE_TIMEOUT, executor_wait=False)


def run_cells(
    fn: Callable[[Any], Any],
    cells: Mapping[str, Any],
    *,
    desc: str,
    scheduler: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    progress: bool = True,
    n_workers: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compute ``fn(cell)`` for every cell on Dask; return the results and a run record.

    Args:
        fn: a pure function of one cell, importable by the workers (defined at module
            level in the repository, which every worker has on its path).
        cells: cell id -> the cell's argument (picklable; it travels with the task).
        desc: what is being computed: the progress bar's label and the tasks' key prefix.
        scheduler: a scheduler address (``tcp://host:8786``, ``tls://...``); default
            $CHARLM_SCHEDULER; unset or empty: an embedded cluster in this process.
        connect_timeout: seconds to reach the scheduler.
        progress: show a tqdm bar of cells done on stderr.
        n_workers: worker threads of the embedded cluster (one cell at a time each); default
            ``charlm.cpus.available_cpus()``. Ignored with a scheduler address (its
            cluster has the workers it has).

    Returns:
        ``(results, record)``: results as {cell id: fn(cell)} in the order of ``cells``
        (not of completion), the same wherever they ran; the record {"scheduler",
        "embedded", "workers", "worker_addresses", "nthreads", "cells", "seconds",
        "cell_workers", "cell_seconds", "cell_cpu_seconds", "dask"} (JSON) for the run
        record: "workers" as the cells finished, "cell_workers" where each one ran.

    A worker lost mid-run (killed, its machine gone) costs only time: the scheduler
    reruns its cells elsewhere (up to ``distributed.scheduler.allowed-failures`` = 3
    losses per cell, then ``distributed.KilledWorker``); with no worker left the cells
    wait for one, and a line on stderr says so (looked at every WATCH_SECONDS) and
    again when workers are back. An exception raised by ``fn``
    is not retried (a pure cell would fail again): the other cells are cancelled and it
    propagates. So does KeyboardInterrupt, once the cells are cancelled and the client
    and embedded cluster closed. A cell already running runs to its end, its result
    dropped: on a remote worker, or in a daemon thread of the embedded cluster, which
    does not keep this process alive (a stage exits at once: ``pipeline.outputs``).

    Raises:
        SchedulerUnreachable: no scheduler answered at the address in time, what
            answered is not a scheduler (``_connect``), a tls:// address
            without a client certificate configured or with unreadable TLS files, or
            the scheduler was lost mid-run.
        ClusterCannotLoadCells: the scheduler or a worker connected at the start cannot
            import ``fn`` (checked before any cell is submitted).
        TypeError: a cell id is not a str.
        ValueError: ``n_workers`` < 1; the address is not tcp:// or tls:// HOST:PORT.
        Exception: the first exception raised by ``fn`` for any cell.
    """
    import dask
    from dask.base import tokenize
    from distributed import as_completed
    from tqdm import tqdm

    if not all(isinstance(cid, str) for cid in cells):
        raise TypeError("cell ids must be str")
    if n_workers is not None and n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    source = "scheduler"
    if scheduler is None:
        scheduler, source = os.environ.get(SCHEDULER_ENV, ""), SCHEDULER_ENV
    address = check_address(scheduler.strip(), source) if scheduler.strip() else None
    start = time.perf_counter()
    with _client(address, connect_timeout, n_workers) as client:
        if address is not None:
            _check_code(client, address, fn)
        alone = not _identity(client, n_workers=0)["n_workers"]
        if alone:
            print(f"{desc}: no Dask worker yet at {address}; waiting for one", file=sys.stderr)
        watch = (
            _watch_workers(client, address, desc, alone, WATCH_SECONDS)
            if address is not None
            else contextlib.nullcontext()
        )
        futures = {
            client.submit(call_cell, fn, cell, key=f"{desc}-{cid}-{tokenize(fn, cell)}"): cid
            for cid, cell in cells.items()
        }
        done: dict[str, tuple[Any, dict[str, Any]]] = {}
        try:
            with watch, tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress) as bar:
                for future in as_completed(futures):
                    try:
                        done[futures[future]] = future.result()  # re-gathers a lost result
                    except Exception as e:  # the cell's own error (Dask logs none here)
                        if address is not None and _scheduler_lost(e):
                            raise SchedulerUnreachable(
                                address, "the connection was lost mid-run; run the stage again"
                            ) from e
                        e.add_note(f"raised by cell {futures[future]!r} of {desc}")
                        raise
                    future.release()  # free the worker's copy
                    bar.update()
        except BaseException:
            with contextlib.suppress(Exception):  # closing the client cancels them too
                client.cancel(list(futures), force=True)
            raise
        info = _identity(client)  # the workers at the end (an adaptive cluster's too)
        workers = info["workers"]
    results = {cid: done[cid][0] for cid in cells}
    where = {cid: done[cid][1] for cid in cells}
    record = {
        "scheduler": info["address"],
        "embedded": address is None,
        "workers": len(workers),
        "worker_addresses": sorted(workers),
        "nthreads": sum(w["nthreads"] for w in workers.values()),
        "cells": len(cells),
        "seconds": round(time.perf_counter() - start, 3),
        "cell_workers": {cid: w["worker"] for cid, w in where.items()},
        "cell_seconds": {cid: w["seconds"] for cid, w in where.items()},
        "cell_cpu_seconds": {cid: w["cpu_seconds"] for cid, w in where.items()},
        "dask": dask.__version__,
    }
    return results, record
