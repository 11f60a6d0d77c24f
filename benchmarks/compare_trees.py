"""The engine of two source trees side by side: e.g. before and after a merge.

Each round runs, for each tree in turn (alternating which goes first), one subprocess
per (variant, S) that imports *that tree's* ``charlm`` and times ``engine.train`` on the
real training split, as ``benchmarks/bench.py`` does (record_every=1000, one intra-op
thread, one engine worker thread per CPU, passed explicitly: the default differs
between trees, ``torch.get_num_threads()`` before the deep merge and the CPU count now).
Medians over rounds, and their ratio, per row.
Only APIs both trees have are used (``build_mlp``, the config models, ``engine.train``);
"same" means the canonical seed's losses are bitwise equal and so are its final parameter
values taken as a multiset (the trees name and order parameters differently).

Run: python -m benchmarks.compare_trees OLD NEW [--variants kaiming,batchnorm]
       [--seeds 8,64] [--steps 1000] [--rounds 3]
e.g. OLD from ``git archive d8a955c | tar -x -C /tmp/old``. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, os, sys, torch
from benchmarks.bench import VARIANT_CFG, load_train_split
from charlm import engine
from charlm.config import ModelConfig, TrainConfig
try:  # the layer-list tree (one MLP, init recipes in charlm.init)
    from charlm.init import build_mlp
    from benchmarks.bench import KERNELS
except ImportError:  # trees before it: one-layer and deep families in charlm.model
    from charlm.model import build_mlp
    KERNELS = {}
variant, S, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
X, Y, _ = load_train_split()
seeds = [2147483647, *range(1, S)]
gens = [torch.Generator().manual_seed(s) for s in seeds]
model = build_mlp(ModelConfig(), VARIANT_CFG[variant], 27, 3, gens)
extra = {"kernels": KERNELS[variant]} if variant in KERNELS else {}
cfg = TrainConfig(seeds=seeds, max_steps=steps, lr_decay_step=steps, record_every=1000, **extra)
r = engine.train(model, X, Y, gens, cfg, workers=os.cpu_count())
params = {n: p[0].flatten().tolist() for n, p in model.named_parameters()}
print(json.dumps({"us": r.seconds / steps / S * 1e6, "loss": r.loss[:, 0].tolist(),
                  "params": params}))
"""


def run(tree: Path, variant: str, S: int, steps: int) -> dict:
    """One engine run of ``tree``'s code in a fresh process (its own imports)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(S), str(steps)],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--variants", default="kaiming,batchnorm")
    parser.add_argument("--seeds", default="8,64")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    cases = [(v, int(s)) for v in args.variants.split(",") for s in args.seeds.split(",")]
    runs: dict = {(name, c): [] for name in trees for c in cases}
    for rnd in range(args.rounds):
        for case in cases:
            for name in list(trees)[:: 1 if rnd % 2 == 0 else -1]:
                runs[(name, case)].append(run(trees[name], *case, args.steps))
    rows = []
    print(f"{'variant':10} {'S':>3} {'old us/m-s':>10} {'new us/m-s':>10} {'new/old':>7} same loss")
    for v, S in cases:
        old, new = (statistics.median(r["us"] for r in runs[(n, (v, S))]) for n in trees)
        o, n = runs[("old", (v, S))][0], runs[("new", (v, S))][0]
        # as multisets: the trees may name and order the same tensors differently
        # (W1 / layers.0.weight; a BatchNorm registered after or before the output layer)
        values = lambda r: sorted(x for p in r["params"].values() for x in p)  # noqa: E731
        same = o["loss"] == n["loss"] and values(o) == values(n)
        rows.append({"variant": v, "seeds": S, "old_us_per_model_step": old,
                     "new_us_per_model_step": new, "new_over_old": new / old,
                     "canonical_losses_bitwise_equal": same})  # fmt: skip
        print(f"{v:10} {S:>3} {old:10.1f} {new:10.1f} {new / old:7.3f} {same}", flush=True)
    print(json.dumps({"trees": {k: str(p) for k, p in trees.items()}, "steps": args.steps,
                      "rounds": args.rounds, "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
