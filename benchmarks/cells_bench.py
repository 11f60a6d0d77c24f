"""Overhead of pipeline.cells.run_cells against calling the cells directly in a loop.

The cells are tests/dask_support.train_cell (seeded SGD on a tanh layer; ``--size 512
--steps 55`` takes about 2 s on one core here). Three ways, whole-call wall time:
- direct: ``call_cell`` in a loop in this process (torch on one thread, as in a worker);
- embedded, 1 worker: ``run_cells`` on an embedded cluster of one worker process
  (cluster start, worker imports, pickling and shutdown included): the overhead;
- embedded, all CPUs: the default, one worker per ``available_cpus()``: the speed-up.
Repeats are interleaved and the median reported, so that other load on the machine hits
every column alike. The cells' own CPU seconds (``call_cell``'s "cpu_seconds") are
reported too: on a shared machine wall times measure its other load as well. The results
are checked byte for byte against the direct ones.
Run: python -m benchmarks.cells_bench [--cells 8] [--size 512] [--steps 55] [--repeats 2]
The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dask_support import train_cell

from charlm.cpus import available_cpus
from pipeline import cells as cells_mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=55)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.pop(cells_mod.SCHEDULER_ENV, None)
    cells = {
        f"s{s}": {"seed": s, "gain": 1.0, "size": args.size, "steps": args.steps}
        for s in range(args.cells)
    }
    cpus = available_cpus()
    times: dict[str, list[float]] = {"direct": [], "embedded_1": [], f"embedded_{cpus}": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    direct = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        calls = {cid: cells_mod.call_cell(train_cell, c) for cid, c in cells.items()}
        times["direct"].append(time.perf_counter() - start)
        cpu["direct"].append(sum(where["cpu_seconds"] for _, where in calls.values()))
        direct = {cid: result for cid, (result, _) in calls.items()}
        for n in (1, cpus):
            start = time.perf_counter()
            with mock.patch("charlm.cpus.available_cpus", return_value=n):
                results, rec = cells_mod.run_cells(train_cell, cells, desc=f"{n} worker(s)")
            times[f"embedded_{n}"].append(time.perf_counter() - start)
            cpu[f"embedded_{n}"].append(sum(rec["cell_cpu_seconds"].values()))
            same = all(
                results[c]["w"].numpy().tobytes() == direct[c]["w"].numpy().tobytes() for c in cells
            )
            assert same, "embedded results differ from direct calls"
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for k, v in med.items():
        print(
            f"{k:>12}: wall {v:7.2f} s ({v / med['direct']:5.2f} x direct), "
            f"cells' CPU {med_cpu[k]:7.2f} s ({med_cpu[k] / med_cpu['direct']:5.2f} x direct)"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    figures = {"cells": args.cells, "cpus": cpus, "wall_s": med, "cells_cpu_s": med_cpu}
    print(json.dumps({**figures, "load1": load}))


if __name__ == "__main__":
    main()
