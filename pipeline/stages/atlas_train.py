"""Depth atlas, trainability at one depth: every (nonlinearity, BatchNorm) family's
short training runs over the gain grid, each model classified trained / stalled /
diverged against the unigram baseline (``charlm.trainability``).

Reads params model.n_embd, atlas.extra_gains and atlas.train's keys (never
atlas.train.depths: dvc.yaml's matrix gives ``--depth``) and the training and
validation splits in ``--data``. One cell per family trains all its gains x seeds in
one batched engine call (each model bitwise the model trained alone), on Dask
(``pipeline.cells``). Writes ``--out`` (JSON: {"depth", "cells": [...]}: per gain and
seed the val loss in nats, the mean training loss of the last 50 steps, the class,
10-step training-loss curves) and the run record.
Run: python -m pipeline.stages.atlas_train --depth 16 --data data/processed \
    --out data/atlas/train/d16.json --record data/atlas/runs/atlas_train@16.json
"""

from __future__ import annotations

from typing import Any

from pipeline import atlas, outputs


def cells(
    p: dict[str, Any], split: dict[str, Any], V: int, T: int, depth: int
) -> dict[str, dict[str, Any]]:
    """The stage's cells at ``depth``: one per (nonlinearity, BatchNorm) family of
    atlas.train, in that order, each with all its gains x seeds and the whole split.

    Args:
        p: params as ``params.load`` hands them to this stage (its ``stage_keys``).
        split, V, T: ``atlas.load_split`` of the split directory.
        depth: hidden layers L.

    Returns:
        cell id ('tanh-bnfalse') -> the ``atlas.train_cell`` argument.
    """
    out = {}
    for nl in p["atlas.train.nonlinearities"]:
        gains = atlas.gains_of(nl, p["atlas.train.gain_factors"], p["atlas.extra_gains"])
        for bn in p["atlas.train.batchnorm"]:
            out[f"{nl}-bn{str(bn).lower()}"] = {
                "depth": depth, "nonlinearity": nl, "batchnorm": bn,
                "width": p["atlas.train.width"], "n_embd": p["model.n_embd"], "V": V, "T": T,
                "gains": gains, "seeds": p["atlas.train.seeds"],
                "steps": p["atlas.train.steps"], "batch_size": p["atlas.train.batch_size"],
                "lr": p["atlas.train.lr"], "split": split,
            }  # fmt: skip
    return out


def main() -> None:
    atlas.stage_main(
        "atlas_train",
        atlas.train_cell,
        cells,
        lambda p, depth: {"depth": depth},
        by_depth=True,
        description=__doc__.splitlines()[0],
    )


if __name__ == "__main__":
    outputs.run(main)
