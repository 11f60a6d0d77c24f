"""pipeline.cells: the same bytes embedded, on a real cluster and over TLS; faults.

Every cluster here is started by the test (``dask scheduler`` and ``dask worker``
subprocesses of this venv) on 127.0.0.1 and stopped by pid in the fixture's teardown,
along with any process it started; no network is needed.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import psutil
import pytest
import torch
from dask_support import failing_cell, task_states, train_cell
from distributed import Client
from support import ROOT

from pipeline import cells as cells_mod
from pipeline.cells import SchedulerUnreachable, call_cell, run_cells

DASK = Path(sys.executable).with_name("dask")
TESTS = Path(__file__).resolve().parent
# Workers import the repository and tests/dask_support.py; their Nanny keeps glibc's
# adaptive mmap threshold (see pipeline.cells.EMBEDDED_CONFIG).
# (Dask lower-cases the names in DASK_* variables, so only a YAML file can drop the
# upper-case MALLOC_TRIM_THRESHOLD_; docs/cluster.md gives it to worker sites too.)
WORKER_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
WORKER_YAML = "distributed:\n  nanny:\n    pre-spawn-environ:\n      MALLOC_TRIM_THRESHOLD_: null\n"
SMALL = {
    f"g{g}-s{s}": {"seed": s, "gain": g, "size": 48, "steps": 10} for g in (1, 2) for s in (0, 1, 2)
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_bytes(a: dict, b: dict) -> bool:
    """Equal results, tensors compared bit for bit (dtype and shape included)."""
    if a.keys() != b.keys():
        return False
    for cid in a:
        x, y = a[cid], b[cid]
        if x["loss"] != y["loss"] or x.keys() != y.keys():
            return False
        for k in ("w", "losses"):
            if x[k].dtype != y[k].dtype or x[k].numpy().tobytes() != y[k].numpy().tobytes():
                return False
    return True


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


@contextlib.contextmanager
def cluster(workers: int, tls: list[str] | None = None) -> Iterator[str]:
    """A scheduler and ``workers`` single-threaded workers on 127.0.0.1; yields the
    address once every worker has registered; stops them all by pid afterwards."""
    port = free_port()
    proto = "tls" if tls else "tcp"
    address = f"{proto}://127.0.0.1:{port}"
    config = Path(tempfile.mkdtemp(prefix="dask-config-"))
    (config / "cells.yaml").write_text(WORKER_YAML, encoding="utf-8")
    env = {**os.environ, **WORKER_ENV, "DASK_CONFIG": str(config)}
    env.pop(cells_mod.SCHEDULER_ENV, None)
    # --no-dashboard still leaves an HTTP server (health, metrics) on every interface: bind
    # it to loopback too
    common = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0", *(tls or [])]
    procs = [
        subprocess.Popen(
            [
                DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--protocol",
                proto,
                *common,
            ],
            env=env,
        )
    ]
    try:
        procs += [
            subprocess.Popen(
                [DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", *common],
                env=env,
            )
            for _ in range(workers)
        ]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        stop(procs[::-1])
        shutil.rmtree(config, ignore_errors=True)


@pytest.fixture(scope="module")
def tcp_cluster() -> Iterator[str]:
    with cluster(2) as address:
        yield address


@contextlib.contextmanager
def listeners() -> Iterator[set[str]]:
    """Collect, while the block runs, the IPs on which this process and its children
    listen for TCP."""
    ips: set[str] = set()
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.wait(0.2):
            for p in (me, *me.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    conns = p.net_connections(kind="inet")
                    ips.update(c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield ips
    finally:
        done.set()
        sampler.join()


@pytest.mark.slow
def test_embedded_equals_cluster_equals_direct(tcp_cluster, monkeypatch):
    """The same cells give the same bytes embedded, via $CHARLM_SCHEDULER, and directly."""
    monkeypatch.delenv(cells_mod.SCHEDULER_ENV, raising=False)
    environ = dict(os.environ)
    with listeners() as ips:
        embedded, rec = run_cells(train_cell, SMALL, desc="embedded")
    assert ips == {"127.0.0.1"}  # embedded: this process and its workers; tcp_cluster too
    assert dict(os.environ) == environ  # the Nanny's variables did not leak
    assert list(embedded) == list(SMALL)
    assert rec["embedded"] and rec["workers"] == rec["nthreads"] >= 1
    assert rec["scheduler"].startswith("tls://127.0.0.1:")  # throwaway credentials
    assert all(a.startswith("tls://127.0.0.1:") for a in rec["worker_addresses"])
    assert set(rec["cell_workers"].values()) <= set(rec["worker_addresses"])

    monkeypatch.setenv(cells_mod.SCHEDULER_ENV, tcp_cluster)
    remote, rec = run_cells(train_cell, SMALL, desc="remote")
    assert not rec["embedded"] and rec["scheduler"] == tcp_cluster and rec["workers"] == 2
    threads = torch.get_num_threads()
    direct = {cid: call_cell(train_cell, cell)[0] for cid, cell in SMALL.items()}
    assert torch.get_num_threads() == threads  # call_cell restores it
    assert same_bytes(embedded, remote) and same_bytes(embedded, direct)


def test_cell_error_propagates(tcp_cluster):
    cells = {str(s): {"seed": s} for s in range(4)}
    with pytest.raises(ValueError, match="odd seed"):
        run_cells(failing_cell, cells, desc="fail", scheduler=tcp_cluster, progress=False)


@pytest.mark.slow
def test_worker_killed_mid_run(tcp_cluster):
    """SIGKILL a busy worker after the first result: its cells rerun, same results."""
    cells = {f"s{s}": {"seed": s, "gain": 1.0, "size": 256, "steps": 60} for s in range(6)}
    killed: dict[str, object] = {}

    def kill_a_busy_worker() -> None:
        with Client(tcp_cluster, timeout=10) as mon:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                states = mon.run_on_scheduler(task_states)
                busy = {w: keys for w, keys in mon.processing().items() if keys}
                if sum(states.values()) < len(cells) or states.get("memory"):
                    if busy:
                        addr, keys = next(iter(busy.items()))
                        pid = mon.run(os.getpid, workers=[addr])[addr]
                        os.kill(pid, signal.SIGKILL)
                        killed.update(addr=addr, keys=keys)
                        return
                time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    try:
        results, rec = run_cells(train_cell, cells, desc="kill", scheduler=tcp_cluster)
    finally:
        killer.join()
    assert killed, "no worker was killed: the run ended first"
    rerun = [k.split("-")[1] for k in killed["keys"]]  # keys are "<desc>-<cell id>-<token>"
    assert all(rec["cell_workers"][cid] != killed["addr"] for cid in rerun)
    direct = {cid: call_cell(train_cell, cell)[0] for cid, cell in cells.items()}
    assert same_bytes(results, direct)


def test_unreachable_scheduler_fails_fast():
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(SchedulerUnreachable, match=re.escape(address)) as info:
        run_cells(train_cell, SMALL, desc="x", scheduler=address, connect_timeout=2)
    assert time.monotonic() - start < 10
    assert isinstance(info.value, RuntimeError) and info.value.address == address


def test_tls_without_certificate_fails_fast(monkeypatch):
    monkeypatch.delenv("DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT", raising=False)
    with dask.config.set({"distributed.comm.tls.client.cert": None}):
        with pytest.raises(
            SchedulerUnreachable, match=re.escape("tls://127.0.0.1:1: no client cert")
        ):
            run_cells(train_cell, SMALL, desc="x", scheduler="tls://127.0.0.1:1")


def _certificates(tmp: Path) -> tuple[Path, Path, Path]:
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


@pytest.mark.slow
def test_tls_cluster(tmp_path):
    """Cells over tls://, the client's certificates from Dask's configuration."""
    ca, cert, key = _certificates(tmp_path)
    tls = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    config = {
        "distributed.comm.tls.ca-file": str(ca),
        "distributed.comm.tls.client.cert": str(cert),
        "distributed.comm.tls.client.key": str(key),
    }
    with dask.config.set(config), cluster(1, tls) as address:
        results, rec = run_cells(train_cell, SMALL, desc="tls", scheduler=address)
    assert rec["scheduler"] == address and address.startswith("tls://")
    assert all(a.startswith("tls://127.0.0.1:") for a in rec["worker_addresses"])
    direct = {cid: call_cell(train_cell, cell)[0] for cid, cell in SMALL.items()}
    assert same_bytes(results, direct)


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an exited orphan that this machine's init may never reap)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


CHILD = """
import signal, sys
from dask_support import sleepy_cell
from pipeline.cells import run_cells

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
    cells = {str(s): {"seed": s, "seconds": 120, "started": sys.argv[1]} for s in range(4)}
    run_cells(sleepy_cell, cells, desc="long")
"""


@pytest.mark.slow
def test_ctrl_c_stops_promptly(tmp_path):
    """SIGINT to run_cells while cells run: exit within 15 s with KeyboardInterrupt and
    no worker left. Only the parent gets the signal (a terminal's Ctrl-C reaches the
    workers too, which only helps): run_cells itself must stop the workers."""
    script, started = tmp_path / "child.py", tmp_path / "started"
    script.write_text(CHILD, encoding="utf-8")
    started.mkdir()
    env = {**os.environ, **WORKER_ENV}
    env.pop(cells_mod.SCHEDULER_ENV, None)
    child = subprocess.Popen(
        [sys.executable, str(script), str(started)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not any(started.iterdir()) and child.poll() is None:
            assert time.monotonic() < deadline, "no cell started within 60 s"
            time.sleep(0.1)
        family = psutil.Process(child.pid).children(recursive=True)
        assert family, "the embedded cluster started no worker process"
        sent = time.monotonic()
        os.kill(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=15)
        assert time.monotonic() - sent < 15
        assert child.returncode != 0 and "KeyboardInterrupt" in err
        deadline = time.monotonic() + 5
        while (alive := [p for p in family if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"left behind: {alive}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
