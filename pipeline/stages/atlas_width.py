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

from typing import Any

from pipeline import atlas, outputs


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
    atlas.stage_main(
        "atlas_width",
        atlas.init_cell,
        cells,
        lambda p, depth: {
            "depth": p["atlas.width_sweep"].depth,
            "nonlinearity": p["atlas.width_sweep"].nonlinearity,
        },
        by_depth=False,
        description=__doc__.splitlines()[0],
    )


if __name__ == "__main__":
    outputs.run(main)
