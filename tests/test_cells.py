"""pipeline.cells: the same bytes embedded, on a real cluster and over TLS; faults.

Every cluster here is started by the test (``dask scheduler`` and ``dask worker``
subprocesses of this venv) on 127.0.0.1 and stopped by pid in the fixture's teardown,
along with any process it started; no network is needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import dask
import psutil
import pytest
import torch
from dask_support import (
    DASK,
    PROCESSES,
    WORKER_ENV,
    cluster,
    failing_cell,
    free_port,
    listening_cell,
    running,
    sleepy_cell,
    stop,
    task_states,
    tls_setup,
    train_cell,
)
from distributed import Client

from pipeline import cells as cells_mod
from pipeline.cells import (
    ClusterCannotLoadCells,
    SchedulerUnreachable,
    call_cell,
    run_cells,
)

SMALL = {
    f"g{g}-s{s}": {"seed": s, "gain": g, "size": 48, "steps": 10} for g in (1, 2) for s in (0, 1, 2)
}


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
    environ, children = dict(os.environ), psutil.Process().children(recursive=True)
    with listeners() as ips:
        embedded, rec = run_cells(train_cell, SMALL, desc="embedded", n_workers=2)
    assert ips <= {"127.0.0.1"}  # tcp_cluster's processes; nothing of this process yet
    # in this process (no process started), over inproc://: while a cell runs, the only
    # listening sockets are the scheduler's and workers' HTTP servers (no routes), on
    # loopback (by default, the workers' listen on every interface)
    inside, _ = run_cells(listening_cell, {"a": None}, desc="listen", n_workers=2)
    assert inside["a"] == ["127.0.0.1"]
    assert psutil.Process().children(recursive=True) == children
    assert dict(os.environ) == environ
    assert list(embedded) == list(SMALL)
    assert rec["embedded"] and rec["workers"] == rec["nthreads"] == 2
    assert rec["scheduler"].startswith("inproc://")
    assert all(a.startswith("inproc://") for a in rec["worker_addresses"])
    assert set(rec["cell_workers"].values()) <= set(rec["worker_addresses"])

    monkeypatch.setenv(cells_mod.SCHEDULER_ENV, tcp_cluster)
    remote, rec = run_cells(train_cell, SMALL, desc="remote")
    assert not rec["embedded"] and rec["scheduler"] == tcp_cluster and rec["workers"] == 2
    threads = torch.get_num_threads()
    direct = {cid: call_cell(train_cell, cell)[0] for cid, cell in SMALL.items()}
    assert torch.get_num_threads() == threads  # call_cell restores it
    assert same_bytes(embedded, remote) and same_bytes(embedded, direct)


def test_cells_side_by_side_keep_one_thread():
    """Two cells in threads of one process (as on the embedded cluster's workers): the
    first to end must not restore torch's thread count under the other, whose own
    threads (a thread pool started inside the cell, say) start from the process-wide
    count; once both ended, it is restored."""
    before = torch.get_num_threads()
    both_in, first_out = threading.Barrier(2, timeout=30), threading.Event()
    seen: dict[str, int] = {}

    def cell(name: str) -> None:
        both_in.wait()
        if name == "first":
            return
        assert first_out.wait(timeout=30)
        seen[name] = torch.get_num_threads()
        inner = threading.Thread(target=lambda: seen.update(inner=torch.get_num_threads()))
        inner.start()
        inner.join()

    def run(name: str) -> None:
        call_cell(cell, name)
        if name == "first":
            first_out.set()

    threads = [threading.Thread(target=run, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == {"second": 1, "inner": 1}
    assert torch.get_num_threads() == before
    later = threading.Thread(target=lambda: seen.update(later=torch.get_num_threads()))
    later.start()
    later.join()
    assert seen["later"] == before


@pytest.mark.parametrize("where", ["embedded", "cluster"])
def test_cell_error_propagates(where, request):
    scheduler = "" if where == "embedded" else request.getfixturevalue("tcp_cluster")
    cells = {str(s): {"seed": s} for s in range(4)}
    with pytest.raises(ValueError, match="odd seed") as info:
        run_cells(failing_cell, cells, desc="fail", scheduler=scheduler, progress=False)
    assert re.fullmatch(r"raised by cell '[13]' of fail", info.value.__notes__[-1])


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


@pytest.mark.slow
def test_a_cluster_left_without_workers_says_so_and_waits(tmp_path, capsys, monkeypatch):
    """Every worker gone mid-run (its Nanny too, as when a batch job ends): the stage says
    so on stderr instead of hanging silently, keeps the cells, and finishes on a worker
    started afterwards, saying so again."""
    monkeypatch.setattr(cells_mod, "WATCH_SECONDS", 0.3)
    started = tmp_path / "started"
    started.mkdir()
    cells = {f"s{s}": {"seed": s, "seconds": 1.0, "started": str(started)} for s in range(3)}
    out: dict[str, object] = {}
    late: list[subprocess.Popen] = []
    with cluster(1) as address:
        nanny = PROCESSES[address][1]  # the `dask worker` process: a Nanny and its worker

        def stage() -> None:
            out["results"] = run_cells(
                sleepy_cell, cells, desc="alone", scheduler=address, progress=False
            )[0]

        thread = threading.Thread(target=stage)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not any(started.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)
            family = psutil.Process(nanny.pid).children(recursive=True)
            nanny.kill()  # first, so that it restarts nothing
            nanny.wait(timeout=10)
            for proc in family:
                proc.kill()
            psutil.wait_procs(family, timeout=10)
            said = ""
            while f"alone: no Dask worker left at {address}" not in said:
                assert time.monotonic() < deadline, said
                time.sleep(0.1)
                said += capsys.readouterr().err
            assert thread.is_alive() and "results" not in out  # the cells wait
            worker = ["worker", address, "--host", "127.0.0.1", "--nthreads", "1"]
            quiet = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
            env = {k: v for k, v in os.environ.items() if k != "CHARLM_SCHEDULER"}
            env.update(WORKER_ENV)
            late.append(subprocess.Popen([*DASK, *worker, *quiet], env=env))
            thread.join(timeout=60)
            assert not thread.is_alive()
            said += capsys.readouterr().err
        finally:
            stop(late)
            thread.join(timeout=60)
    assert out["results"] == {cid: cell["seed"] for cid, cell in cells.items()}
    assert f"alone: 1 Dask worker(s) at {address}; going on" in said, said


@pytest.mark.slow
def test_a_worker_address_or_a_lost_scheduler_is_a_clear_error(tmp_path):
    """A worker's address given as the scheduler's, and the scheduler killed while cells
    run: each a SchedulerUnreachable naming the address (a stage's one 'error:' line),
    not a TypeError traceback or a cell blamed for the lost connection."""
    started = tmp_path / "started"
    started.mkdir()
    cells = {f"s{s}": {"seed": s, "seconds": 30.0, "started": str(started)} for s in range(2)}
    with cluster(1) as address:
        with Client(address, timeout=10) as client:
            (worker,) = client.scheduler_info()["workers"]
        with pytest.raises(SchedulerUnreachable, match=re.escape(worker)) as info:
            run_cells(train_cell, SMALL, desc="x", scheduler=worker, connect_timeout=5)
        assert "did not answer as a Dask scheduler" in str(info.value), info.value

        scheduler = PROCESSES[address][0]

        def kill_when_started() -> None:
            deadline = time.monotonic() + 60
            while not any(started.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)
            scheduler.kill()

        killer = threading.Thread(target=kill_when_started)
        killer.start()
        start = time.monotonic()
        try:
            with pytest.raises(SchedulerUnreachable, match=re.escape(address)) as info:
                run_cells(sleepy_cell, cells, desc="lost", scheduler=address, progress=False)
        finally:
            killer.join()
        assert time.monotonic() - start < 30  # not the cells' 30 s
        assert "lost mid-run" in str(info.value), info.value
        assert not getattr(info.value, "__notes__", None)  # no cell blamed


def test_unreachable_scheduler_fails_fast():
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(SchedulerUnreachable, match=re.escape(address)) as info:
        run_cells(train_cell, SMALL, desc="x", scheduler=address, connect_timeout=2)
    assert time.monotonic() - start < 10
    assert isinstance(info.value, RuntimeError) and info.value.address == address
    assert isinstance(info.value, ConnectionError)  # a stage prints one 'error:' line


@pytest.mark.parametrize(
    "value",
    ["nonsense", "http://127.0.0.1:8786", "tcp://127.0.0.1", "tcp://127.0.0.1:port",
     "tcp://127.0.0.1:8786/", "inproc://127.0.0.1/1/1", "ucx://127.0.0.1:8786", "tcp://:8786",
     "TCP://127.0.0.1:8786", "tcp://127.0.0.1:8786?", "tcp://127.0.0.1:8786#",
     "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://me@127.0.0.1:8786"],
)  # fmt: skip
def test_a_malformed_scheduler_variable_is_named(value, monkeypatch):
    """A CHARLM_SCHEDULER that is not tcp:// or tls:// HOST:PORT: a ValueError (a stage's
    one 'error:' line) naming the variable and its value, before any connection."""
    monkeypatch.setenv("CHARLM_SCHEDULER", value)
    with pytest.raises(ValueError, match=re.escape(f"CHARLM_SCHEDULER={value!r}")):
        run_cells(train_cell, SMALL, desc="x", connect_timeout=1)


@pytest.mark.parametrize(
    "value",
    ["tcp://127.0.0.1:8786", "tls://[::1]:8786", "tcp://node-3.cluster.local:8786",
     "tcp://[fe80::1%ib0]:8786", "10.0.0.5:8786", "ws://10.0.0.5:8786", "wss://h:1"],
)  # fmt: skip
def test_addresses_dask_accepts_pass(value):
    """What Dask connects to passes, a bare HOST:PORT (Dask: tcp://) included; each is
    also what Dask itself parses to a host and a port."""
    from distributed.comm.addressing import parse_address, parse_host_port

    assert cells_mod.check_address(value) == value
    scheme, location = parse_address(value)
    host, port = parse_host_port(location)
    assert scheme in cells_mod.SCHEMES and host and port == int(value.rsplit(":", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("role", ["scheduler", "workers"])
def test_a_cluster_without_the_code_is_named_before_any_cell(role, monkeypatch):
    """A scheduler or workers that cannot import this repository: one clear error naming
    the process and PYTHONPATH, before any cell is submitted. (Without the check, such a
    scheduler failed every cell with 'Error during deserialization of the task graph',
    blamed on the first cell; such workers died on every task and were restarted while
    the stage waited without a word.)"""
    import distributed

    submitted = []
    submit = distributed.Client.submit

    def recording(self, *args, **kwargs):
        submitted.append(kwargs.get("key"))
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", recording)
    with cluster(1, without_code=role) as address:
        start = time.monotonic()
        with pytest.raises(ClusterCannotLoadCells) as info:
            run_cells(train_cell, SMALL, desc="x", scheduler=address, progress=False)
        assert time.monotonic() - start < 30
        who = "scheduler at " if role == "scheduler" else "worker tcp://127.0.0.1:"
        message = str(info.value)
        assert f"the Dask {who}" in message and address in message, message
        assert "No module named" in message and "PYTHONPATH" in message, message
        assert isinstance(info.value, OSError)  # a stage prints one 'error:' line
        assert submitted == []  # no cell was sent


def test_only_unpickling_errors_count_as_missing_code():
    """The probe's errors: an import, attribute or unpickling error (a worker's comes back
    as a bare Exception holding its repr) means the code is missing; a worker that left
    while asked (CommClosedError, an OSError) or a timeout does not."""
    from distributed.comm.core import CommClosedError

    missing = ModuleNotFoundError("No module named 'pipeline'")
    assert cells_mod._load_error(missing) == repr(missing)
    assert cells_mod._load_error(Exception(repr(missing))) == repr(missing)
    old = AttributeError("Can't get attribute 'init_cell' on <module 'pipeline.atlas'>")
    assert cells_mod._load_error(Exception(repr(old))) == repr(old)
    for other in (CommClosedError("in <TCP (closed)>"), TimeoutError(), OSError("gone"),
                  Exception("CommClosedError('in <TCP (closed)>')")):  # fmt: skip
        assert cells_mod._load_error(other) is None, other


def test_n_workers_must_be_positive():
    with pytest.raises(ValueError, match="n_workers must be >= 1, got 0"):
        run_cells(train_cell, SMALL, desc="x", scheduler="", n_workers=0)


def test_tls_without_certificate_fails_fast(monkeypatch):
    monkeypatch.delenv("DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT", raising=False)
    with dask.config.set({"distributed.comm.tls.client.cert": None}):
        with pytest.raises(
            SchedulerUnreachable, match=re.escape("tls://127.0.0.1:1: no client cert")
        ):
            run_cells(train_cell, SMALL, desc="x", scheduler="tls://127.0.0.1:1")


@pytest.mark.slow
def test_tls_cluster(tmp_path):
    """Cells over tls://, the client's certificates from Dask's configuration."""
    tls, config = tls_setup(tmp_path)
    with dask.config.set(config), cluster(1, tls) as address:
        results, rec = run_cells(train_cell, SMALL, desc="tls", scheduler=address)
    assert rec["scheduler"] == address and address.startswith("tls://")
    assert all(a.startswith("tls://127.0.0.1:") for a in rec["worker_addresses"])
    direct = {cid: call_cell(train_cell, cell)[0] for cid, cell in SMALL.items()}
    assert same_bytes(results, direct)


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
    """SIGINT to run_cells while cells of 120 s run on the embedded cluster: exit within
    15 s with KeyboardInterrupt, the cells' worker threads (daemons) not waited for, and
    no process started at any point (the cluster runs in the process)."""
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
        assert not family, f"the embedded cluster started processes: {family}"
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
