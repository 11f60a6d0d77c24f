"""Depth atlas, width sweep: signal propagation at init of one depth and nonlinearity,
without BatchNorm, over atlas.width_sweep.widths (how far finite width moves the
measurements from the mean-field theory, which assumes infinite width).

Reads params model.n_embd, atlas.width_sweep and atlas's measurement keys, and the
training split in ``--data``; one cell per width (``pipeline.atlas.init_cell``) on Dask
(``pipeline.cells``). Writes ``--out`` (JSON: {"cells": [...]}) and the run record.
Run: python -m pipeline.stages.atlas_width --data data/processed \
    --out data/atlas/width.json --record data/atlas/runs/atlas_width.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline import atlas, outputs, params, records


def cells(p: dict[str, Any], split: dict[str, Any], V: int, T: int) -> dict[str, dict[str, Any]]:
    """The stage's cells: one per width of atlas.width_sweep, in that order, each with
    all its gains x seeds and the same real minibatches.

    Args:
        p: params as ``params.load`` hands them to this stage (its ``stage_keys``).
        split, V, T: ``atlas.load_split`` of the split directory.

    Returns:
        cell id ('w100') -> the ``atlas.init_cell`` argument.
    """
    sweep = p["atlas.width_sweep"]
    batches = atlas.draw_minibatches(
        split["X"], split["Y"], p["atlas.init_batches"], p["atlas.batch_size"],
        p["atlas.batch_seed"],
    )  # fmt: skip
    gains = atlas.gains_of(sweep.nonlinearity, sweep.gain_factors, [])
    return {
        f"w{width}": {
            "depth": sweep.depth,
            "nonlinearity": sweep.nonlinearity,
            "batchnorm": False,
            "width": width,
            "n_embd": p["model.n_embd"],
            "V": V,
            "T": T,
            "gains": gains,
            "seeds": p["atlas.seeds"],
            "threshold": p["atlas.threshold"],
            "minibatches": batches,
        }
        for width in sweep.widths
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    records.add_record_argument(parser)
    args = parser.parse_args()
    p = params.load(args.params, params.stage_keys("atlas_width"))
    sweep = p["atlas.width_sweep"]
    split, V, T = atlas.load_split(args.data)
    atlas.run_stage(
        atlas.init_cell, cells(p, split, V, T), desc="atlas_width", out=args.out,
        record=args.record, header={"depth": sweep.depth, "nonlinearity": sweep.nonlinearity},
    )  # fmt: skip


if __name__ == "__main__":
    outputs.run(main)
