"""Dask test helpers: deterministic toy cells, a cluster on 127.0.0.1, certificates, a gate.

The cells (and ``Gate``) are module-level, so that Dask pickles them by reference and a
worker imports this module: workers started by ``cluster`` get the repository root and
tests/ on PYTHONPATH. ``cluster`` starts real ``dask scheduler`` and ``dask worker``
processes of this venv, bound to 127.0.0.1, and stops them by pid (tests/test_cells.py,
tests/test_atlas_cluster.py).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from distributed import Client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

# `python -m dask`, not the venv's `dask` script: a copied venv's scripts keep the first
# venv's interpreter in their #! line (this worktree's .venv/bin/dask ran /work/main's)
DASK = [sys.executable, "-m", "dask"]
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCHEDULER_ENV = "CHARLM_SCHEDULER"  # pipeline.cells.SCHEDULER_ENV (not imported: workers)
# Workers import the repository and tests/dask_support.py; their Nanny keeps glibc's
# adaptive mmap threshold (docs/cluster.md, "What every worker needs").
# (Dask lower-cases the names in DASK_* variables, so only a YAML file can drop the
# upper-case MALLOC_TRIM_THRESHOLD_; docs/cluster.md gives it to worker sites too.)
WORKER_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
WORKER_YAML = "distributed:\n  nanny:\n    pre-spawn-environ:\n      MALLOC_TRIM_THRESHOLD_: null\n"


def train_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """A few SGD steps of a tanh layer on seeded random data: a pure function of ``cell``.

    ``cell``: "seed" (int), "gain" (float), optional "size" (default 64), "steps"
    (default 20). Returns the final weights, the loss after every step and the last
    loss as a Python float.
    """
    size, steps = cell.get("size", 64), cell.get("steps", 20)
    g = torch.Generator().manual_seed(cell["seed"])
    x = torch.randn(4 * size, size, generator=g)
    y = torch.randn(4 * size, size, generator=g)
    w = torch.randn(size, size, generator=g) * cell["gain"] / size**0.5
    losses = torch.empty(steps)
    for step in range(steps):
        h = torch.tanh(x @ w)
        err = h - y
        losses[step] = (err * err).mean()
        grad = x.T @ (err * (1 - h * h)) * (2 / err.numel())
        w = w - 0.1 * grad
    return {"w": w, "losses": losses, "loss": float(losses[-1])}


def sleepy_cell(cell: dict[str, Any]) -> int:
    """Sleep ``cell["seconds"]`` then return ``cell["seed"]`` (interruption tests).

    With "started" (a directory), first create ``<started>/<seed>`` there, so that a
    test knows the cell is running.
    """
    if "started" in cell:
        Path(cell["started"], str(cell["seed"])).touch()
    time.sleep(cell["seconds"])
    return cell["seed"]


def task_states(dask_scheduler: Any) -> dict[str, int]:
    """How many tasks the scheduler holds in each state (for ``run_on_scheduler``)."""
    states: dict[str, int] = {}
    for ts in dask_scheduler.tasks.values():
        states[ts.state] = states.get(ts.state, 0) + 1
    return states


def failing_cell(cell: dict[str, Any]) -> int:
    """Raise ValueError for an odd seed (error propagation tests)."""
    if cell["seed"] % 2:
        raise ValueError(f"odd seed {cell['seed']}")
    return cell["seed"]


# ---- a gate that holds the atlas's cells on every worker until the test opens it

GATED = ("init_cell", "train_cell")  # the cell functions of pipeline.atlas


def _gated(directory: str, timeout: float, fn: Callable[[Any], Any], cell: Any) -> Any:
    """Announce ``<directory>/<pid>.running`` (its text: this worker's address), wait
    until ``<directory>/open`` exists (at most ``timeout`` s), then return ``fn(cell)``."""
    gate = Path(directory)
    tmp = gate / f".{os.getpid()}.tmp"
    tmp.write_text(get_worker().address, encoding="utf-8")
    tmp.replace(gate / f"{os.getpid()}.running")  # whole, or not there
    deadline = time.monotonic() + timeout
    while not (gate / "open").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return fn(cell)


class Gate(WorkerPlugin):
    """Hold every cell of ``pipeline.atlas`` on each worker until the test opens the gate.

    Registered with ``Client.register_plugin`` (on every worker, and on any worker that
    joins later, such as a Nanny's restart of a killed one), it replaces
    ``pipeline.atlas.init_cell`` and ``train_cell`` in the worker's process with
    ``_gated`` around them: a task unpickles its cell function by name, so it gets the
    gated one. A cell then writes ``<directory>/<worker pid>.running`` and waits for
    ``<directory>/open``: a test knows which worker process is inside a cell, and that
    the cell cannot finish before the gate opens. Results are unchanged (the same
    function runs after the wait). ``Client.unregister_worker_plugin("gate")`` puts the
    functions back.
    """

    name = "gate"

    def __init__(self, directory: Path, timeout: float = 120.0):
        self.directory, self.timeout = str(directory), timeout
        self.saved: dict[str, Callable[[Any], Any]] = {}

    def setup(self, worker: Any) -> None:
        from pipeline import atlas

        self.saved = {name: getattr(atlas, name) for name in GATED}
        for name, fn in self.saved.items():
            setattr(atlas, name, functools.partial(_gated, self.directory, self.timeout, fn))

    def teardown(self, worker: Any) -> None:
        from pipeline import atlas

        for name, fn in self.saved.items():
            setattr(atlas, name, fn)


# ---- a cluster of real processes on 127.0.0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process, SIGKILL it after 3 s, then SIGKILL its descendants."""
    family = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            family += psutil.Process(p.pid).children(recursive=True)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()


# address -> the processes cluster() started there (scheduler first), while it runs
PROCESSES: dict[str, list[subprocess.Popen]] = {}


@contextlib.contextmanager
def cluster(
    workers: int, tls: list[str] | None = None, without_code: str | None = None
) -> Iterator[str]:
    """A scheduler and ``workers`` single-threaded workers on 127.0.0.1; yields the
    address once every worker has registered; stops them all by pid afterwards.

    ``without_code`` ("scheduler" or "workers"): start those processes in an empty
    directory without PYTHONPATH, so that they cannot import this repository."""
    if without_code not in (None, "scheduler", "workers"):
        raise ValueError(f"without_code: 'scheduler', 'workers' or None, got {without_code!r}")
    port = free_port()
    proto = "tls" if tls else "tcp"
    address = f"{proto}://127.0.0.1:{port}"
    config = Path(tempfile.mkdtemp(prefix="dask-config-"))
    (config / "cells.yaml").write_text(WORKER_YAML, encoding="utf-8")
    env = {**os.environ, **WORKER_ENV, "DASK_CONFIG": str(config)}
    env.pop(SCHEDULER_ENV, None)
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    setting = {  # role -> (environment, working directory)
        role: (bare, str(config)) if role == without_code else (env, None)
        for role in ("scheduler", "workers")
    }
    # --no-dashboard still leaves an HTTP server (health, metrics) on every interface: bind
    # it to loopback too
    common = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0", *(tls or [])]
    procs = [
        subprocess.Popen(
            [
                *DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--protocol",
                proto,
                *common,
            ],
            env=setting["scheduler"][0],
            cwd=setting["scheduler"][1],
        )
    ]
    try:
        procs += [
            subprocess.Popen(
                [*DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", *common],
                env=setting["workers"][0],
                cwd=setting["workers"][1],
            )
            for _ in range(workers)
        ]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)
        PROCESSES[address] = procs
        yield address
    finally:
        PROCESSES.pop(address, None)
        stop(procs[::-1])
        shutil.rmtree(config, ignore_errors=True)


def certificates(tmp: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, key, signer, ca: bool):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("test CA", "test CA", ca_key, ca_key, ca=True)
    cert = build("127.0.0.1", "test CA", key, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def tls_setup(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """Throwaway certificates (``certificates``) as the ``dask scheduler`` / ``dask
    worker`` TLS options, and the client side's Dask configuration for them."""
    ca, cert, key = certificates(tmp)
    options = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    config = {
        "distributed.comm.tls.ca-file": str(ca),
        "distributed.comm.tls.client.cert": str(cert),
        "distributed.comm.tls.client.key": str(key),
    }
    return options, config


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an exited orphan that this machine's init may never reap)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listening_cell(cell: Any) -> list[str]:
    """The IPs on which the process running this cell listens for TCP, while it runs
    (on the embedded cluster: the stage's own process, the cluster's servers included)."""
    conns = psutil.Process().net_connections(kind="inet")
    return sorted({c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN})
