"""The Dask overhead and speed-up on the default depth atlas: its cells called directly
against pipeline.cells.run_cells on the embedded cluster (1 and 2 worker threads) and on
a local cluster of worker processes.

The cells are exactly the atlas stages' (``cells()`` of pipeline/stages/atlas_init.py at
every atlas.depths, atlas_width.py, atlas_train.py at every atlas.train.depths,
atlas_he.py) for params.yaml as it is, built from the split in ``--data`` (default
data/processed, else a split made here from $NAMES_MIRROR or data/raw/names.txt). Per
stage, four ways, whole-call wall time:
- direct: ``call_cell`` on each cell in turn in this process (torch on one thread, as in
  a worker);
- embedded_1: ``run_cells(..., n_workers=1)``, one embedded (in-process) cluster per
  stage as the stage runs it, its start and shutdown included: Dask's overhead, which
  issue 17 wants within 10%;
- embedded_N (N = ``available_cpus()``, the stages' default): the same with N worker
  threads: the speed-up a stage gets;
- processes_N: ``run_cells`` pointed (as CHARLM_SCHEDULER would) at a cluster of N
  worker processes on 127.0.0.1 started once for all stages, as ``dask scheduler`` and
  ``dask worker`` started by hand on this machine would be: the speed-up of local
  worker processes (cells and results pickled between processes).
A stage also imports dask.distributed once, which the benchmark's process has done
already: that import is timed in a fresh interpreter (torch loaded first, as in a stage)
and added per stage to the embedded figures in the summary's last line.
The runs of a stage follow one another (their order rotating from stage to stage),
so that the machine's other load falls on all three alike; with ``--repeats`` > 1 the
whole set runs again and each figure is the median. The cells' own CPU seconds
(``call_cell``'s "cpu_seconds") are given too, as is the load average. Every stage's
results are checked byte for byte (its output JSON) against the direct ones.
Run: python -m benchmarks.cells_bench [--params params.yaml] [--data DIR] [--repeats 1]
The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from charlm.cpus import available_cpus
from pipeline import atlas, outputs, params
from pipeline.cells import call_cell, run_cells
from pipeline.stages import atlas_he, atlas_init, atlas_train, atlas_width

Job = tuple[str, Callable[[Any], Any], dict[str, Any]]  # stage name, cell function, cells
# The worker processes keep glibc's adaptive mmap threshold: Dask's Nanny sets
# MALLOC_TRIM_THRESHOLD_, with which training cells ran 2.1x slower (docs/cluster.md).
PROCESS_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def jobs(params_path: Path, data: Path) -> list[Job]:
    """Every atlas stage's cells for ``params_path``, in dvc.yaml's order.

    Raises:
        pipeline.params.ParamsError: ``params_path`` is missing or invalid.
        OSError: the split directory lacks counts.json, train.pt or val.pt.
    """

    def load(stage: str) -> dict[str, Any]:
        return params.load(params_path, params.stage_keys(stage))

    cfg = params.load(params_path, ["atlas"])["atlas"]
    split, V, T = atlas.load_split(data)
    p_init, p_train = load("atlas_init"), load("atlas_train")
    return [
        *[(f"atlas_init@{d}", atlas.init_cell, atlas_init.cells(p_init, split, V, T, d))
          for d in cfg.depths],
        ("atlas_width", atlas.init_cell, atlas_width.cells(load("atlas_width"), split, V, T)),
        *[(f"atlas_train@{d}", atlas.train_cell, atlas_train.cells(p_train, split, V, T, d))
          for d in cfg.train.depths],
        ("atlas_he", atlas.train_cell, atlas_he.cells(load("atlas_he"), split, V, T)),
    ]  # fmt: skip


def split_dir(data: Path | None, params_path: Path) -> Path:
    """``data``, else data/processed, else a split of the names file made in a temp dir.

    Raises:
        OSError, ValueError: the names file is missing or unreadable (the split stage's).
    """
    if data is not None:
        return data
    if Path("data/processed/counts.json").is_file():
        return Path("data/processed")
    from pipeline.stages.split import split

    names = Path(os.environ.get("NAMES_MIRROR", "").removeprefix("file://") or "data/raw/names.txt")
    out = Path(tempfile.mkdtemp(prefix="cells-bench-")) / "processed"
    split(names, out, **params.load(params_path, ["split"])["split"].model_dump())
    return out


@contextlib.contextmanager
def kept_cluster(n_workers: int) -> Iterator[str]:
    """A cluster of ``n_workers`` worker processes (127.0.0.1, one thread each,
    throwaway TLS credentials, which this process's clients get through Dask's config)
    kept for the block; yields its address."""
    import dask
    from distributed import LocalCluster, Security

    sec = Security.temporary()
    tls = {
        "distributed.comm.tls.ca-file": sec.tls_ca_file,
        "distributed.comm.tls.client.cert": sec.tls_client_cert,
        "distributed.comm.tls.client.key": sec.tls_client_key,
    }
    saved = dict(os.environ)  # the Nanny sets OMP_NUM_THREADS and others here
    with dask.config.set({**PROCESS_CONFIG, **tls}):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, silence_logs=logging.ERROR,
            security=sec,
        )  # fmt: skip
        try:
            yield cluster.scheduler_address
        finally:
            cluster.close(timeout=10)
            os.environ.clear()
            os.environ.update(saved)


def import_seconds(repeats: int = 3) -> float:
    """Median wall seconds of ``import distributed`` in a fresh interpreter that has
    imported torch, as a stage has when it first calls run_cells."""
    code = ("import time, torch, tqdm; t = time.perf_counter(); import distributed; "
            "print(time.perf_counter() - t)")  # fmt: skip
    args = [sys.executable, "-c", code]
    out = [subprocess.run(args, capture_output=True, text=True, check=True) for _ in range(repeats)]
    times = [float(o.stdout) for o in out]
    return statistics.median(times)


def run(
    mode: str, fn: Callable[[Any], Any], cells: dict[str, Any], kept: str
) -> tuple[float, float, str]:
    """One way of computing ``cells``: (wall s, the cells' CPU s, the results as JSON).

    Raises:
        Exception: whatever a cell raises (``run_cells``).
    """
    start = time.perf_counter()
    if mode == "direct":
        calls = {cid: call_cell(fn, cell) for cid, cell in cells.items()}
        results = {cid: r for cid, (r, _) in calls.items()}
        cpu = sum(where["cpu_seconds"] for _, where in calls.values())
    else:
        embedded = mode.startswith("embedded_")
        n = int(mode.removeprefix("embedded_")) if embedded else None
        results, rec = run_cells(fn, cells, desc=mode, scheduler="" if embedded else kept,
                                 progress=False, n_workers=n)  # fmt: skip
        cpu = sum(rec["cell_cpu_seconds"].values())
    return time.perf_counter() - start, cpu, outputs.dumps_json(list(results.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, help="a split directory (the split stage's)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cpus = available_cpus()
    modes = list(dict.fromkeys(["direct", "embedded_1", f"embedded_{cpus}", f"processes_{cpus}"]))
    todo = jobs(args.params, split_dir(args.data, args.params))
    n_cells = sum(len(c) for _, _, c in todo)
    load_before = os.getloadavg()
    print(f"{len(todo)} stages, {n_cells} cells; {cpus} CPUs; load average {load_before}")
    print("per stage: wall seconds (the cells' CPU seconds)")
    wall: dict[str, dict[str, list[float]]] = {name: {m: [] for m in modes} for name, _, _ in todo}
    cpu: dict[str, dict[str, list[float]]] = {name: {m: [] for m in modes} for name, _, _ in todo}
    start = time.perf_counter()
    with kept_cluster(cpus) as kept:
        kept_start = time.perf_counter() - start
        for rep in range(args.repeats):
            for i, (name, fn, cells) in enumerate(todo):
                turn = rep * len(todo) + i
                order = modes[turn % len(modes) :] + modes[: turn % len(modes)]
                texts = {}
                for mode in order:
                    w, c, texts[mode] = run(mode, fn, cells, kept)
                    wall[name][mode].append(w)
                    cpu[name][mode].append(c)
                same = all(texts[m] == texts["direct"] for m in modes)
                assert same, f"{name}: results differ between {modes}"
                row = "  ".join(f"{m} {wall[name][m][-1]:5.1f} s ({cpu[name][m][-1]:5.1f})"
                                for m in modes)  # fmt: skip
                print(f"{name:>15} ({len(cells):2d} cells): {row}", flush=True)
    med = {n: {m: statistics.median(v) for m, v in w.items()} for n, w in wall.items()}
    med_cpu = {n: {m: statistics.median(v) for m, v in c.items()} for n, c in cpu.items()}
    total = {m: sum(med[n][m] for n in med) for m in modes}
    total_cpu = {m: sum(med_cpu[n][m] for n in med) for m in modes}
    load_after = os.getloadavg()
    print(f"\n{'':>15}  {'wall':>9}  {'x direct':>8}  {'cells CPU':>9}")
    for m in modes:
        print(f"{m:>15}  {total[m]:7.1f} s  {total[m] / total['direct']:8.3f}  "
              f"{total_cpu[m]:7.1f} s")  # fmt: skip
    overhead = total["embedded_1"] / total["direct"] - 1
    default = total[f"embedded_{cpus}"] / total["direct"] - 1
    speedup = total["direct"] / total[f"embedded_{cpus}"]
    speedup_processes = total["direct"] / total[f"processes_{cpus}"]
    print(f"Dask overhead, embedded 1 worker thread vs direct: {overhead:+.1%} "
          "(issue 17: within 10%)")  # fmt: skip
    print(f"embedded, {cpus} worker threads (the stages' default) vs direct: {default:+.1%} "
          f"(a speed-up of {speedup:.2f}x)")  # fmt: skip
    print(f"{cpus} local worker processes vs direct: a speed-up of {speedup_processes:.2f}x "
          f"(their cluster's start, {kept_start:.1f} s, not counted)")  # fmt: skip
    imports = import_seconds()
    with_import = {m: total[m] + len(todo) * imports for m in modes if m.startswith("embedded_")}
    print(f"with a stage's import of dask.distributed ({imports:.2f} s x {len(todo)} stages): "
          + ", ".join(f"{m} {w / total['direct'] - 1:+.1%}" for m, w in with_import.items())
          + " vs direct")  # fmt: skip
    print(f"load average before {load_before}, after {load_after}; "
          f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip
    figures = {
        "stages": len(todo), "cells": n_cells, "cpus": cpus, "repeats": args.repeats,
        "wall_s": total, "cells_cpu_s": total_cpu, "overhead_1_worker": round(overhead, 4),
        "overhead_default": round(default, 4), "speedup": round(speedup, 3),
        "speedup_processes": round(speedup_processes, 3),
        "process_cluster_start_s": round(kept_start, 2),
        "import_distributed_s": round(imports, 3), "per_stage_wall_s": med,
        "per_stage_cells_cpu_s": med_cpu,
        "load_before": load_before, "load_after": load_after,
    }  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
