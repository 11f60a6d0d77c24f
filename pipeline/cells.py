"""Run independent cells of work on Dask: on this machine, or on an existing cluster.

A cell is one call ``fn(cell)`` that depends only on its argument (params and seeds:
training one architecture for several gains x seeds, say) and returns a picklable value
(a dict of tensors and numbers). ``run_cells`` submits every cell to a
``dask.distributed`` scheduler, shows a progress bar of cells done and returns the
results keyed by cell id, plus a run record saying where and how long they ran; the
caller writes its outputs once, at the end (``pipeline.outputs.atomic_path``).

Where the cells run is set by the environment variable CHARLM_SCHEDULER:
- unset or empty: an embedded cluster, started and stopped by ``run_cells``: one worker
  process per usable CPU (``charlm.cpus.available_cpus``), one thread each, scheduler and
  workers on 127.0.0.1 only, no dashboard, throwaway TLS credentials (so other users of
  the machine cannot send it code);
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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

SCHEDULER_ENV = "CHARLM_SCHEDULER"
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler before SchedulerUnreachable
CLOSE_TIMEOUT = 3.0  # seconds the client and the embedded cluster get to shut down
# The embedded workers' environment: Dask's default sets MALLOC_TRIM_THRESHOLD_, which
# turns off glibc's adaptive mmap threshold, so every large torch tensor is a fresh mmap
# and its pages fault in again: training cells ran 2.1x slower here. OMP_NUM_THREADS=1
# and the other defaults stay. No HTTP routes (metrics, JSON state) either.
EMBEDDED_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.scheduler.http.routes": [],
    "distributed.worker.http.routes": [],
}
# Signals after which a stage stops (pipeline.outputs.STOP_SIGNALS: Ctrl-C, kill, hangup).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
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


def call_cell(fn: Callable[[Any], Any], cell: Any) -> tuple[Any, dict[str, Any]]:
    """Call ``fn(cell)`` with torch on one intra-op thread; the task every worker runs.

    Returns ``(result, where)``, ``where`` being {"worker": the Dask worker's address
    (None outside a worker), "seconds": fn's wall time, "cpu_seconds": its CPU time in
    this thread (below "seconds" when other load shares the cores)}. torch's thread count
    is restored afterwards. Exceptions of ``fn`` propagate unchanged.
    """
    import torch
    from distributed import get_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        result = fn(cell)
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
    try:
        worker = get_worker().address
    except ValueError:  # called directly, not in a Dask worker
        worker = None
    seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return result, {"worker": worker, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}


def _restore_environ(saved: dict[str, str]) -> None:
    """Undo the Nanny's ``os.environ.update`` (OMP_NUM_THREADS=1, PYTHONHASHSEED, ...),
    which would otherwise leak into this process and whatever it starts next."""
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


def _close(closable: Any) -> None:
    """Close a client or cluster within CLOSE_TIMEOUT; a slow shutdown is no failure."""
    with contextlib.suppress(TimeoutError):
        closable.close(timeout=CLOSE_TIMEOUT)


def _kill_workers(cluster: Any) -> None:
    """SIGKILL the embedded worker processes (no restart). On the way out with an
    exception: a running cell cannot be stopped politely, and a graceful close would wait
    for it. After a run: every result is back and the workers hold nothing, while a
    graceful close waits for each worker's interpreter teardown (1.2-1.8 s with torch
    loaded, on a loaded machine past CLOSE_TIMEOUT: the close was then abandoned halfway
    and a worker logged heartbeat errors). Their scratch directories are purged by the
    next Dask cluster on the machine."""
    for nanny in cluster.workers.values():
        nanny.close_gracefully(reason="cells done")  # the Nanny restarts no worker
        with contextlib.suppress(OSError, TypeError):  # gone already, or never started
            os.kill(nanny.pid, signal.SIGKILL)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Dask's loggers at ERROR while the embedded cluster is torn down: the scheduler
    runs in this process and logs each killed worker's closed connection at INFO with a
    traceback (``silence_logs`` covers only the cluster's start)."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_restart_on_stop(cluster: Any) -> Iterator[None]:
    """While the embedded cluster runs, a stop signal first tells its Nannies not to
    restart their workers, then runs the Python handler installed before it.

    A stage's handler (``pipeline.outputs``) stops every child process at once; a Nanny
    that saw its worker die would otherwise start a fresh one in the meantime (which the
    closing cluster then cancels, logging errors, leaking its semaphores). Signals whose
    handler is not a Python function (ignored, default) are left alone, and so is
    everything outside the main thread, where no handler can be installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: h for s in STOP_SIGNALS if callable(h := signal.getsignal(s))}

    def handler(signum: int, frame: Any) -> None:
        for nanny in list(cluster.workers.values()):
            nanny.close_gracefully(reason="stop signal")  # a status: restart no worker
        previous[signum](signum, frame)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            if signal.getsignal(s) is handler:  # the stage's handler may have changed it
                signal.signal(s, h)


def _tracker_alive() -> bool:
    """Whether a child of this process runs multiprocessing's resource tracker."""
    import psutil  # comes with dask.distributed

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and any(
                "resource_tracker" in arg for arg in child.cmdline()
            ):
                return True
    return False


@contextlib.contextmanager
def _untracked_if_tracker_gone() -> Iterator[None]:
    """While closing the embedded cluster after a stop signal: if multiprocessing's
    resource tracker is gone (a stage's signal handler, ``pipeline.outputs``, stops every
    child of the stage, the tracker among them), each Nanny semaphore is still unlinked
    but its ``resource_tracker.unregister`` is skipped. Otherwise multiprocessing would
    relaunch a tracker that never saw those semaphores, and that one prints a KeyError
    traceback for each (12 with 2 workers) after the stage's one-line message."""
    from multiprocessing import resource_tracker

    if _tracker_alive():
        yield
        return
    unregister = resource_tracker.unregister
    resource_tracker.unregister = lambda name, rtype: None  # looked up at each call
    try:
        yield
    finally:
        resource_tracker.unregister = unregister


@contextlib.contextmanager
def _client(address: str | None, timeout: float, n_workers: int | None) -> Iterator[Any]:
    """A Client of the scheduler at ``address``, or of an embedded cluster of
    ``n_workers`` workers (default ``available_cpus()``) when None; closed on the way
    out, the embedded cluster too (its workers killed first: ``_kill_workers``)."""
    import dask
    from distributed import Client, LocalCluster, Security

    from charlm.cpus import available_cpus

    if address is not None:
        if address.startswith("tls://") and not Security().tls_client_cert:
            raise SchedulerUnreachable(address, f"no client certificate: set {TLS_HINT}")
        try:
            client = Client(address, timeout=timeout)  # security: Dask's configuration
        except (OSError, TimeoutError) as e:
            raise SchedulerUnreachable(address, f"no answer within {timeout:g} s ({e})") from e
        try:
            yield client
        finally:
            _close(client)
        return
    saved = dict(os.environ)  # the Nanny sets OMP_NUM_THREADS, PYTHONHASHSEED, ... here
    try:
        with dask.config.set(EMBEDDED_CONFIG):
            cluster = LocalCluster(
                n_workers=available_cpus() if n_workers is None else n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # no dashboard, but the scheduler still opens an HTTP server (no routes):
                # on a free loopback port, not 8787 (which another cluster on the machine
                # may hold: Dask then warns "Port 8787 is already in use")
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.ERROR,
                security=True,
            )
        try:
            with _no_restart_on_stop(cluster):
                client = Client(cluster, timeout=timeout)
                try:
                    yield client
                finally:
                    _close(client)
        except BaseException:
            with _quiet():
                _kill_workers(cluster)
                with _untracked_if_tracker_gone():
                    _close(cluster)
            raise
        with _quiet():
            _kill_workers(cluster)
            _close(cluster)
    finally:
        _restore_environ(saved)


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
            $CHARLM_SCHEDULER; unset or empty: an embedded cluster on 127.0.0.1.
        connect_timeout: seconds to reach the scheduler.
        progress: show a tqdm bar of cells done on stderr.
        n_workers: worker processes of the embedded cluster (one thread each); default
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
    losses per cell, then ``distributed.KilledWorker``). An exception raised by ``fn``
    is not retried (a pure cell would fail again): the other cells are cancelled and it
    propagates. So does KeyboardInterrupt, once the cells are cancelled and the client
    and embedded cluster closed (a cell already running on a remote worker runs to its
    end there; its result is dropped). While an embedded cluster runs, SIGINT, SIGTERM
    and SIGHUP first stop its Nannies from restarting workers, then run the Python
    handler installed before (a stage's, which stops every child process at once).

    Raises:
        SchedulerUnreachable: no scheduler answered at the address in time, or a
            tls:// address without a client certificate configured.
        TypeError: a cell id is not a str.
        ValueError: ``n_workers`` < 1.
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
    if scheduler is None:
        scheduler = os.environ.get(SCHEDULER_ENV, "")
    address = scheduler.strip() or None
    start = time.perf_counter()
    with _client(address, connect_timeout, n_workers) as client:
        if not client.scheduler_info()["workers"]:
            print(f"{desc}: no Dask worker yet at {address}; waiting for one", file=sys.stderr)
        futures = {
            client.submit(call_cell, fn, cell, key=f"{desc}-{cid}-{tokenize(fn, cell)}"): cid
            for cid, cell in cells.items()
        }
        done: dict[str, tuple[Any, dict[str, Any]]] = {}
        try:
            with tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress) as bar:
                for future in as_completed(futures):
                    done[futures[future]] = future.result()  # re-gathers a lost result
                    future.release()  # free the worker's copy
                    bar.update()
        except BaseException:
            with contextlib.suppress(Exception):  # closing the client cancels them too
                client.cancel(list(futures), force=True)
            raise
        info = client.scheduler_info()  # the workers at the end (an adaptive cluster's too)
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
