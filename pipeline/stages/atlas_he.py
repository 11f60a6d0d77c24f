"""Depth atlas, He et al. 2015's analogue (sec. 2.2, figs. 2-3): a relu net of
atlas.he.depth hidden layers without BatchNorm, trained at gain 1 (their "Xavier",
std sqrt(1/fan_in)) and sqrt 2 (theirs), at atlas.he.lr and, as a second cell, at
atlas.he.lower_lr (the page uses it when an arm diverges at lr, and says so).

Reads params model.n_embd and atlas.he, and the splits in ``--data``; the two cells
(``pipeline.atlas.train_cell``) run on Dask (``pipeline.cells``). Writes ``--out``
(JSON: {"cells": [run at lr, run at lower_lr]}) and the run record.
Run: python -m pipeline.stages.atlas_he --data data/processed --out data/atlas/he.json \
    --record data/atlas/runs/atlas_he.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline import atlas, outputs, params, records


def cells(p: dict[str, Any], split: dict[str, Any], V: int, T: int) -> dict[str, dict[str, Any]]:
    """The stage's two cells, 'lr' and 'lower_lr': atlas.he's relu net at each learning
    rate, all its gains x seeds, with the whole split.

    Args:
        p: params as ``params.load`` hands them to this stage (its ``stage_keys``).
        split, V, T: ``atlas.load_split`` of the split directory.

    Returns:
        cell id -> the ``atlas.train_cell`` argument.
    """
    he = p["atlas.he"]
    return {
        name: {
            "depth": he.depth,
            "nonlinearity": "relu",
            "batchnorm": False,
            "width": he.width,
            "n_embd": p["model.n_embd"],
            "V": V,
            "T": T,
            "gains": list(he.gains),
            "seeds": list(he.seeds),
            "steps": he.steps,
            "batch_size": he.batch_size,
            "lr": lr,
            "split": split,
        }
        for name, lr in (("lr", he.lr), ("lower_lr", he.lower_lr))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    records.add_record_argument(parser)
    args = parser.parse_args()
    p = params.load(args.params, params.stage_keys("atlas_he"))
    split, V, T = atlas.load_split(args.data)
    atlas.run_stage(
        atlas.train_cell, cells(p, split, V, T), desc="atlas_he", out=args.out,
        record=args.record, header={"depth": p["atlas.he"].depth},
    )  # fmt: skip


if __name__ == "__main__":
    outputs.run(main)
