"""The depth atlas's cells and the glue its stages share (docs/atlas.md).

A cell is one architecture (depth, nonlinearity, BatchNorm, width): all its gains x
seeds are one batched model (``charlm.atlas.batched_model``). A stage builds its cells
as plain dicts that carry everything the cell needs, the data included (a few real
minibatches for an init cell; the training and validation windows, about 5 MB, for a
training cell), hands them to ``pipeline.cells.run_cells`` (an embedded Dask cluster,
or the one at $CHARLM_SCHEDULER: docs/cluster.md), and writes one JSON output and its
run record once every cell is back. The functions a worker runs (``init_cell``,
``train_cell``) are pure: the same cell gives the same bytes wherever it runs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm.atlas import batched_model, derived, measure_init, summarise
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from pipeline import outputs, params, records
from pipeline.cells import run_cells


def gains_of(nonlinearity: str, factors: list[float], extra: list[float]) -> list[float]:
    """Sorted distinct gains of a nonlinearity: each of ``factors`` x its
    ``calculate_gain`` (``charlm.theory.default_gain``: tanh 5/3, relu sqrt 2, linear
    and sigmoid 1, gelu 1.5335), plus ``extra``; rounded to 12 digits so that, e.g.,
    0.6 x 5/3 and 1.0 are one gain."""
    from charlm.theory import default_gain

    g0 = default_gain(nonlinearity)
    return sorted({round(f * g0, 12) for f in factors} | {round(float(g), 12) for g in extra})


def load_split(data: Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """The split stage's training windows and ``charlm.trainability.val_subset`` of its
    validation windows as {'X', 'Y', 'Xval', 'Yval'} (int64 (N, T) and (N,)), and
    (V, T): vocabulary size and context length."""
    from charlm.trainability import val_subset

    counts = json.loads((data / "counts.json").read_text(encoding="utf-8"))
    tr, va = torch.load(data / "train.pt"), torch.load(data / "val.pt")
    xval, yval = val_subset(va["X"], va["Y"])
    split = {"X": tr["X"], "Y": tr["Y"], "Xval": xval, "Yval": yval}
    return split, counts["vocab_size"], counts["block_size"]


def draw_minibatches(
    X: torch.Tensor, Y: torch.Tensor, batches: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` minibatches ``randint(0, N, (batch_size,))`` of (X, Y) drawn from
    ``torch.Generator().manual_seed(seed)``: the same contexts for every cell."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
        out.append((X[ix].clone(), Y[ix].clone()))
    return out


def _num(x: float) -> float | str | None:
    """6 significant digits; None for NaN; 'inf' / '-inf' for infinities (float64
    overflowed: the page shows them as such, JSON has no inf)."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.6g}")


def _table(a: np.ndarray) -> list:
    return [_num(float(v)) for v in a] if a.ndim == 1 else [_table(r) for r in a]


def summarise_cell(stats: dict[str, np.ndarray], n_gains: int, n_seeds: int) -> dict:
    """Per quantity {'median', 'q10', 'q90'} over seeds: (G, L) nested lists for the
    layer statistics (``charlm.atlas.LAYER_STATS``), (G,) for the per-model ones
    (``derived``, 'input_ms', 'loss'); models are gain-major (``batched_model``)."""
    out = {}
    per_model = {**derived(stats), "input_ms": stats["input_ms"], "loss": stats["loss"]}
    layer = {k: v for k, v in stats.items() if v.ndim == 2}
    for name, v in {**layer, **per_model}.items():
        grid = v.reshape(*v.shape[:-1], n_gains, n_seeds)  # (L, G, n) or (G, n)
        s = summarise(grid, axis=-1)
        out[name] = {k: _table(np.moveaxis(a, -1, 0) if a.ndim == 2 else a) for k, a in s.items()}
    return out


def _variant(cell: dict[str, Any]) -> VariantConfig:
    return VariantConfig(
        init="second_half",
        layers=cell["depth"],
        n_hidden=cell["width"],
        nonlinearity=cell["nonlinearity"],
        batchnorm=cell["batchnorm"],
        gain=1.0,  # replaced per model by batched_model
    )


def init_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Signal propagation at init of one architecture, all gains x seeds (a worker's
    task). ``cell``: depth, nonlinearity, batchnorm, width, n_embd, V, T, gains, seeds,
    threshold, minibatches (list of (xb int64 (B, T), yb int64 (B,))). Returns the
    cell's description and 'stats' (``summarise_cell``), JSON-ready."""
    model_cfg = ModelConfig(n_embd=cell["n_embd"], n_hidden=cell["width"])
    model, _ = batched_model(
        model_cfg, _variant(cell), cell["gains"], cell["seeds"], cell["V"], cell["T"]
    )
    stats = measure_init(model, cell["minibatches"], threshold=cell["threshold"])
    keys = ("depth", "nonlinearity", "batchnorm", "width", "gains", "seeds", "threshold")
    return {
        **{k: cell[k] for k in keys},
        "batches": len(cell["minibatches"]),
        "batch_size": int(cell["minibatches"][0][0].shape[0]),
        "stats": summarise_cell(stats, len(cell["gains"]), len(cell["seeds"])),
    }


def train_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Short training runs of one architecture, all gains x seeds in one engine call,
    classified trained / stalled / diverged (``charlm.trainability.train_cell``; a
    worker's task). ``cell``: depth, nonlinearity, batchnorm, width, n_embd, V, T,
    gains, seeds, steps, batch_size, lr, split ({'X', 'Y', 'Xval', 'Yval'}). Constant
    lr, fast kernels, on the CPU with one thread. Returns the description and the
    results (no wall time: outputs depend on params only)."""
    from charlm import trainability

    cfg = TrainConfig(
        seeds=cell["seeds"],
        max_steps=cell["steps"],
        batch_size=cell["batch_size"],
        lr=cell["lr"],
        lr_decay_step=cell["steps"],
        record_every=cell["steps"],
        kernels="fast",
        device="cpu",
    )
    model_cfg = ModelConfig(n_embd=cell["n_embd"], n_hidden=cell["width"])
    result = trainability.train_cell(
        model_cfg, _variant(cell), cell["gains"], cell["seeds"], cell["split"], cfg,
        cell["V"], cell["T"], workers=1,
    )  # fmt: skip
    result.pop("seconds")
    keys = ("depth", "nonlinearity", "batchnorm", "width", "steps", "lr", "batch_size")
    return {**{k: cell[k] for k in keys}, **result}


def run_stage(
    fn: Any,
    cells: dict[str, dict[str, Any]],
    *,
    desc: str,
    out: Path,
    record: Path | None,
    header: dict[str, Any],
) -> dict[str, Any]:
    """Run ``fn`` over ``cells`` on Dask (``run_cells``), then write ``out`` (JSON:
    ``header`` plus 'cells', the results in the order of ``cells``) atomically and the
    run record (where the cells ran, the per-cell wall and CPU seconds).

    Nothing is written if a cell fails or the run is interrupted."""
    results, where = run_cells(fn, cells, desc=desc)
    doc = {**header, "cells": list(results.values())}
    outputs.write_json(out, doc)
    records.write_record(record, dask=where)
    cpu = sum(where["cell_cpu_seconds"].values())
    print(
        f"wrote {out}: {len(cells)} cells on {where['workers']} worker(s) "
        f"({'embedded' if where['embedded'] else where['scheduler']}), "
        f"{where['seconds']:.1f} s wall, {cpu:.1f} CPU-s in cells"
    )
    return doc


def stage_main(
    stage: str,
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    cells: Callable[..., dict[str, dict[str, Any]]],
    header: Callable[[dict[str, Any], int | None], dict[str, Any]],
    *,
    by_depth: bool,
    description: str,
) -> None:
    """The command line every atlas cell stage shares: ``--params``, ``--data`` (the
    split directory), ``--out``, ``--record`` and, for a matrix stage over a depth list
    (``by_depth``), ``--depth``. Loads the stage's declared params
    (``params.stage_keys(stage)``) and the split, builds ``cells(p, split, V, T[,
    depth])`` and runs them through ``run_stage`` under ``header(p, depth)``.

    Raises:
        SystemExit: bad arguments (argparse), ``--depth`` below 1.
        pipeline.params.ParamsError: the params file is invalid.
    """
    parser = argparse.ArgumentParser(description=description)
    if by_depth:
        parser.add_argument("--depth", type=int, required=True, help="hidden layers L")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    records.add_record_argument(parser)
    args = parser.parse_args()
    depth = args.depth if by_depth else None
    if depth is not None and depth < 1:
        parser.error(f"--depth must be >= 1, got {depth}")
    p = params.load(args.params, params.stage_keys(stage))
    split, V, T = load_split(args.data)
    built = cells(p, split, V, T, depth) if by_depth else cells(p, split, V, T)
    run_stage(
        fn, built, desc=stage if depth is None else f"{stage}@{depth}", out=args.out,
        record=args.record, header=header(p, depth),
    )  # fmt: skip
