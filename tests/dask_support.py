"""A deterministic torch cell for the pipeline.cells tests and benchmark.

Module-level, so that Dask pickles ``train_cell`` by reference and a worker imports it:
workers started by the tests get the repository root and tests/ on PYTHONPATH.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def train_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """A few SGD steps of a tanh layer on seeded random data: a pure function of ``cell``.

    ``cell``: "seed" (int), "gain" (float), optional "size" (default 64), "steps"
    (default 20). Returns the final weights, the loss after every step and the last
    loss as a Python float.
    """
    size, steps = cell.get("size", 64), cell.get("steps", 20)
    g = torch.Generator().manual_seed(cell["seed"])
    x = torch.randn(4 * size, size, generator=g)
    y = torch.randn(4 * size, size, generator=g)
    w = torch.randn(size, size, generator=g) * cell["gain"] / size**0.5
    losses = torch.empty(steps)
    for step in range(steps):
        h = torch.tanh(x @ w)
        err = h - y
        losses[step] = (err * err).mean()
        grad = x.T @ (err * (1 - h * h)) * (2 / err.numel())
        w = w - 0.1 * grad
    return {"w": w, "losses": losses, "loss": float(losses[-1])}


def sleepy_cell(cell: dict[str, Any]) -> int:
    """Sleep ``cell["seconds"]`` then return ``cell["seed"]`` (interruption tests).

    With "started" (a directory), first create ``<started>/<seed>`` there, so that a
    test knows the cell is running.
    """
    if "started" in cell:
        Path(cell["started"], str(cell["seed"])).touch()
    time.sleep(cell["seconds"])
    return cell["seed"]


def task_states(dask_scheduler: Any) -> dict[str, int]:
    """How many tasks the scheduler holds in each state (for ``run_on_scheduler``)."""
    states: dict[str, int] = {}
    for ts in dask_scheduler.tasks.values():
        states[ts.state] = states.get(ts.state, 0) + 1
    return states


def failing_cell(cell: dict[str, Any]) -> int:
    """Raise ValueError for an odd seed (error propagation tests)."""
    if cell["seed"] % 2:
        raise ValueError(f"odd seed {cell['seed']}")
    return cell["seed"]
