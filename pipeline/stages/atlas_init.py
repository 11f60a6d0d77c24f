"""Depth atlas at initialisation, one depth: every (nonlinearity, BatchNorm, width) cell.

Reads params model.n_embd and atlas's grid and measurement keys (never atlas.depths:
dvc.yaml's matrix gives ``--depth``, so adding a depth reruns only its stage) and the
training split in ``--data``. Each cell batches all gains x seeds of one architecture
and measures, per hidden layer 1..L on the same real minibatches, the statistics of
``charlm.atlas.LAYER_STATS`` (median and 10-90% band over seeds; ``pipeline.atlas``).
The cells run on Dask (``pipeline.cells``: embedded, or $CHARLM_SCHEDULER). Writes
``--out`` (JSON: {"depth", "cells": [...]}) and the run record (where the cells ran).
Run: python -m pipeline.stages.atlas_init --depth 16 --data data/processed \
    --out data/atlas/init/d16.json --record data/atlas/runs/atlas_init@16.json
"""

from __future__ import annotations

from typing import Any

from pipeline import atlas, outputs


def cells(
    p: dict[str, Any], split: dict[str, Any], V: int, T: int, depth: int
) -> dict[str, dict[str, Any]]:
    """The stage's cells at ``depth``: one per (nonlinearity, BatchNorm, width) of the
    grid, in that order, each with all its gains x seeds and the same real minibatches.

    Args:
        p: params as ``params.load`` hands them to this stage (its ``stage_keys``).
        split, V, T: ``atlas.load_split`` of the split directory.
        depth: hidden layers L.

    Returns:
        cell id ('tanh-bnfalse-w100') -> the ``atlas.init_cell`` argument.
    """
    batches = atlas.draw_minibatches(
        split["X"], split["Y"], p["atlas.init_batches"], p["atlas.batch_size"],
        p["atlas.batch_seed"],
    )  # fmt: skip
    out = {}
    for nl in p["atlas.nonlinearities"]:
        gains = atlas.gains_of(nl, p["atlas.gain_factors"], p["atlas.extra_gains"])
        for bn in p["atlas.batchnorm"]:
            for width in p["atlas.widths"]:
                out[f"{nl}-bn{str(bn).lower()}-w{width}"] = {
                    "depth": depth, "nonlinearity": nl, "batchnorm": bn, "width": width,
                    "n_embd": p["model.n_embd"], "V": V, "T": T, "gains": gains,
                    "seeds": p["atlas.seeds"], "threshold": p["atlas.threshold"],
                    "minibatches": batches,
                }  # fmt: skip
    return out


def main() -> None:
    atlas.stage_main(
        "atlas_init",
        atlas.init_cell,
        cells,
        lambda p, depth: {"depth": depth},
        by_depth=True,
        description=__doc__.splitlines()[0],
    )


if __name__ == "__main__":
    outputs.run(main)
