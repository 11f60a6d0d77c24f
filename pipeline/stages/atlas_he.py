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

from typing import Any

from pipeline import atlas, outputs


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
    atlas.stage_main(
        "atlas_he",
        atlas.train_cell,
        cells,
        lambda p, depth: {"depth": p["atlas.he"].depth},
        by_depth=False,
        description=__doc__.splitlines()[0],
    )


if __name__ == "__main__":
    outputs.run(main)
