"""The atlas stages on a real Dask cluster (issue 17's acceptance, stage level).

A scheduler and two single-threaded workers (``dask scheduler`` / ``dask worker``
processes of this venv on 127.0.0.1, ``dask_support.cluster``) serve the whole module
and are stopped by pid at its end. The stages run as subprocesses, as DVC runs them
(``python -m pipeline.stages.atlas_train --depth 2 ...``), on a tiny grid (width 8,
2 seeds, 2 gains, 20 training steps: the params file is the repository's params.yaml
with its atlas section overridden) and the split of the real names: with
CHARLM_SCHEDULER unset (an embedded cluster) and set to that scheduler, to a dead port
and to a TLS scheduler; one run loses a worker while its cells run, one gets SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import psutil
import pytest
from dask_support import Gate, cluster, free_port, running, tls_setup
from distributed import Client
from ruamel.yaml import YAML
from support import ROOT

from charlm.cpus import available_cpus
from pipeline import params
from pipeline.cells import SCHEDULER_ENV
from pipeline.stages.split import split

pytestmark = pytest.mark.slow

DEPTH = 2
STAGES = ("atlas_init", "atlas_train")
# The atlas section's overrides: 4 cells per stage (tanh, relu x BatchNorm off, on),
# each 2 gains x 2 seeds of width 8.
GRID = {"nonlinearities": ["tanh", "relu"], "batchnorm": [False, True], "gain_factors": [0.5, 1.0],
        "seeds": [0, 1]}  # fmt: skip
ATLAS = {"depths": [DEPTH], **GRID, "widths": [8],
         "train": {"depths": [DEPTH], **GRID, "width": 8, "steps": 20}}  # fmt: skip
STAGE_TIMEOUT = 300  # s, a stage process on a loaded machine (about 15 s here)


def write_params(path: Path, atlas: dict) -> Path:
    """The repository's params.yaml with ``atlas``'s keys (and train's) overridden."""
    yaml = YAML()
    p = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in atlas.items():
        if isinstance(value, dict):
            p["atlas"][key].update(value)
        else:
            p["atlas"][key] = value
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(p, f)
    return path


@dataclass(frozen=True)
class Work:
    root: Path  # the module's scratch directory
    params: Path  # the tiny grid
    data: Path  # the split stage's output for the real names


def command(work: Work, stage: str, out: Path, params_file: Path | None = None) -> list[str]:
    """The stage's command line, writing ``out/<stage>.json`` and its run record."""
    return [
        sys.executable, "-m", f"pipeline.stages.{stage}", "--depth", str(DEPTH),
        "--params", str(params_file or work.params), "--data", str(work.data),
        "--out", str(out / f"{stage}.json"), "--record", str(out / "runs" / f"{stage}.json"),
    ]  # fmt: skip


def environ(scheduler: str | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop(SCHEDULER_ENV, None)
    if scheduler is not None:
        env[SCHEDULER_ENV] = scheduler
    return env


def run_stage(
    work: Work, stage: str, out: Path, scheduler: str | None, **extra: str
) -> subprocess.CompletedProcess:
    """Run the stage to its end with CHARLM_SCHEDULER = ``scheduler`` (None: unset)."""
    return subprocess.run(command(work, stage, out), cwd=ROOT, env=environ(scheduler, **extra),
                          capture_output=True, text=True, timeout=STAGE_TIMEOUT)  # fmt: skip


def succeeded(proc: subprocess.CompletedProcess) -> bool:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return True


def dask_record(out: Path, stage: str) -> dict:
    return json.loads((out / "runs" / f"{stage}.json").read_text(encoding="utf-8"))["dask"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, names_path: Path) -> Work:
    root = tmp_path_factory.mktemp("atlas_cluster")
    cfg = params.load(ROOT / "params.yaml", ["split"])["split"]
    split(names_path, root / "processed", **cfg.model_dump())
    return Work(root, write_params(root / "tiny.yaml", ATLAS), root / "processed")


@pytest.fixture(scope="module")
def embedded(work: Work) -> dict[str, bytes]:
    """Each stage's output run on an embedded cluster (CHARLM_SCHEDULER unset)."""
    out = work.root / "embedded"
    outputs = {}
    for stage in STAGES:
        assert succeeded(run_stage(work, stage, out, None))
        rec = dask_record(out, stage)
        assert rec["embedded"] and rec["scheduler"].startswith("inproc://")
        assert rec["workers"] == available_cpus() == len(rec["worker_addresses"])
        outputs[stage] = (out / f"{stage}.json").read_bytes()
    return outputs


@pytest.fixture(scope="module")
def tcp_cluster() -> Iterator[str]:
    with cluster(2) as address:
        yield address


def workers_of(address: str) -> list[str]:
    with Client(address, timeout=30) as client:
        return sorted(client.scheduler_info()["workers"])


def test_cluster_gives_the_embedded_bytes_and_records_where(work, embedded, tcp_cluster, tmp_path):
    """atlas_init and atlas_train via $CHARLM_SCHEDULER: the embedded run's bytes; the
    run record's "dask" names the scheduler and the two workers that ran the cells."""
    workers = workers_of(tcp_cluster)
    assert len(workers) == 2
    for stage in STAGES:
        proc = run_stage(work, stage, tmp_path, tcp_cluster)
        assert succeeded(proc) and f"on 2 worker(s) ({tcp_cluster})" in proc.stdout
        assert (tmp_path / f"{stage}.json").read_bytes() == embedded[stage], stage
        rec = dask_record(tmp_path, stage)
        assert rec["scheduler"] == tcp_cluster and rec["embedded"] is False
        assert rec["workers"] == 2 and rec["worker_addresses"] == workers
        assert rec["nthreads"] == 2 and rec["cells"] == 4
        assert set(rec["cell_workers"].values()) <= set(workers)
        assert len(rec["cell_workers"]) == len(rec["cell_seconds"]) == 4


def test_worker_killed_inside_a_cell(work, embedded, tcp_cluster, tmp_path):
    """SIGKILL a worker process while it is inside one of atlas_train's cells: the stage
    still succeeds with the embedded run's bytes, and no cell's result comes from the
    killed worker. ``Gate`` holds every cell until the kill, so the killed worker is
    mid-cell by construction, not by timing."""
    gate = tmp_path / "gate"
    gate.mkdir()
    out = tmp_path / "out"
    with Client(tcp_cluster, timeout=30) as monitor:
        monitor.register_plugin(Gate(gate))
        try:
            stage = subprocess.Popen(command(work, "atlas_train", out), cwd=ROOT,
                                     env=environ(tcp_cluster), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
            try:
                deadline = time.monotonic() + 120
                while not (inside := sorted(gate.glob("*.running"))):
                    assert stage.poll() is None, stage.communicate()
                    assert time.monotonic() < deadline, "no cell started within 120 s"
                    time.sleep(0.05)
                pid = int(inside[0].name.split(".")[0])
                killed = inside[0].read_text(encoding="utf-8")
                os.kill(pid, signal.SIGKILL)  # a process of this test's cluster, by pid
                (gate / "open").touch()
                stdout, stderr = stage.communicate(timeout=STAGE_TIMEOUT)
            finally:
                if stage.poll() is None:
                    stage.kill()
                    stage.wait()
        finally:
            (gate / "open").touch()
            monitor.unregister_worker_plugin("gate")
    assert stage.returncode == 0, f"{stdout}\n{stderr}"
    assert (out / "atlas_train.json").read_bytes() == embedded["atlas_train"]
    rec = dask_record(out, "atlas_train")
    assert killed not in rec["cell_workers"].values(), (killed, rec["cell_workers"])
    assert killed not in rec["worker_addresses"]


def test_unreachable_scheduler_fails_fast_and_writes_nothing(work, tmp_path):
    """CHARLM_SCHEDULER at a port where nothing listens: exit 1 with one line naming
    the address, within the connect timeout (10 s) plus the stage's start, no output."""
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_stage(work, "atlas_train", tmp_path, address)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert f"error: no Dask scheduler reachable at {address}: no answer within 10 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 40, elapsed  # 10 s connect timeout + imports on a loaded machine
    assert not (tmp_path / "atlas_train.json").exists()
    assert not (tmp_path / "runs" / "atlas_train.json").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_tls_cluster(work, embedded, tmp_path):
    """atlas_train via a tls:// scheduler (a throwaway CA; the stage's certificates from
    Dask's DASK_DISTRIBUTED__COMM__TLS__* variables): the embedded run's bytes."""
    tls, config = tls_setup(tmp_path)
    env = {  # the stage's client: Dask's environment variables for the same files
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": config["distributed.comm.tls.ca-file"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": config["distributed.comm.tls.client.cert"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": config["distributed.comm.tls.client.key"],
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
    }
    with dask.config.set(config), cluster(1, tls) as address:
        assert address.startswith("tls://127.0.0.1:")
        proc = run_stage(work, "atlas_train", tmp_path, address, **env)
    assert succeeded(proc)
    assert (tmp_path / "atlas_train.json").read_bytes() == embedded["atlas_train"]
    rec = dask_record(tmp_path, "atlas_train")
    assert rec["scheduler"] == address and not rec["embedded"] and rec["workers"] == 1
    assert rec["worker_addresses"][0].startswith("tls://127.0.0.1:")


# Loaded by every Python process of a stage run with this directory first on PYTHONPATH:
# pipeline.atlas.train_cell first creates <CHARLM_CELLS_AT>/<pid>, then trains as ever;
# with CHARLM_FAIL_FIRST set, the first cell to start instead raises ValueError once the
# second has started (or after 10 s). The stage hands the cell function to Dask by name,
# so its worker threads run this one.
ANNOUNCE_SITECUSTOMIZE = """
import os, threading

_at = os.environ.get("CHARLM_CELLS_AT")
if _at:
    from pipeline import atlas

    _train_cell = atlas.train_cell
    _lock, _started, _second = threading.Lock(), [0], threading.Event()

    def _announced(cell):
        open(os.path.join(_at, str(os.getpid())), "w").close()
        with _lock:
            _started[0] += 1
            first = _started[0] == 1
        if not first:
            _second.set()
        elif os.environ.get("CHARLM_FAIL_FIRST"):
            _second.wait(timeout=10)
            raise ValueError("injected failure of the first cell")
        return _train_cell(cell)

    atlas.train_cell = _announced
"""


def _default_sigint() -> None:
    """In the child before exec: SIGINT's default action even if this run ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment has CHARLM_TEST_MARK=``mark``: a stage started
    with it and every process it started, even one started after a snapshot of its
    children, or orphaned."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("CHARLM_TEST_MARK") == mark and running(p):
                found.append(p)
    return found


def test_ctrl_c_mid_run_stops_promptly(work, tmp_path):
    """SIGINT to an embedded atlas_train once a worker thread is inside a cell (of a
    million steps): exit 130 within 10 s with the stage's one message (no traceback, no
    error logged), no output file, no process of the run left."""
    long = write_params(tmp_path / "long.yaml", {"train": {"steps": 1_000_000}})
    site, cells_at, out = tmp_path / "site", tmp_path / "cells", tmp_path / "out"
    site.mkdir()
    cells_at.mkdir()
    (site / "sitecustomize.py").write_text(ANNOUNCE_SITECUSTOMIZE, encoding="utf-8")
    mark = str(tmp_path)
    env = environ(None, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
                  CHARLM_CELLS_AT=str(cells_at), CHARLM_TEST_MARK=mark)  # fmt: skip
    stage = subprocess.Popen(command(work, "atlas_train", out, long), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
    text = bytearray()
    reader = threading.Thread(target=lambda: text.extend(stage.stdout.read()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(cells_at.iterdir()):
            assert stage.poll() is None, f"ended early ({stage.returncode})"
            assert time.monotonic() < deadline, "no cell started within 120 s"
            time.sleep(0.05)
        assert {int(p.name) for p in cells_at.iterdir()} == {stage.pid}  # in-process
        sent = time.monotonic()
        os.kill(stage.pid, signal.SIGINT)
        rc = stage.wait(timeout=30)
        elapsed = time.monotonic() - sent
        reader.join(timeout=5)
        output = text.decode(errors="replace")
        assert rc == 128 + signal.SIGINT, output
        assert elapsed < 10, elapsed
        assert "interrupted by SIGINT" in output, output
        assert "Traceback" not in output and "ERROR" not in output, output
        assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []
        deadline = time.monotonic() + 5
        while (alive := marked(mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"left behind: {alive}"
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
        for p in marked(mark):  # started by this test (its environment says so)
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_a_failing_cell_ends_the_stage_cleanly(work, tmp_path):
    """One cell raises while the other worker thread is inside a cell of a million steps:
    the stage exits 1 with its one 'error:' line, not SIGABRT (134) from the interpreter's
    teardown under a thread in torch's C++ code, nor a hang; and writes nothing."""
    long = write_params(tmp_path / "long.yaml", {"train": {"steps": 1_000_000}})
    site, cells_at, out = tmp_path / "site", tmp_path / "cells", tmp_path / "out"
    site.mkdir()
    cells_at.mkdir()
    (site / "sitecustomize.py").write_text(ANNOUNCE_SITECUSTOMIZE, encoding="utf-8")
    env = environ(None, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
                  CHARLM_CELLS_AT=str(cells_at), CHARLM_FAIL_FIRST="1")  # fmt: skip
    proc = subprocess.run(command(work, "atlas_train", out, long), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=STAGE_TIMEOUT)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "error: injected failure of the first cell" in output, output
    assert "terminate called" not in output and "Traceback" not in output, output
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []
