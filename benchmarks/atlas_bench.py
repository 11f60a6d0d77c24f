"""The atlas row of ``make bench``: one depth-16 architecture, 8 gains x 4 seeds.

The depth atlas trains every (gain, seed) model of one architecture at once
(``pipeline.atlas.train_cell``: ``charlm.atlas.batched_model``, then
``charlm.engine.train`` with fast kernels). This row times that against two other ways
to train the same S = 32 models for the same steps:

- batched: ``engine.train`` on the batched model, as the atlas runs it;
- lecture: the lecture's deep loop (``reference.lecture.lecture_layers_train``, its
  training lines only), model by model: eager autograd on the lecture's ``Linear`` /
  ``Tanh`` objects, ``loss.backward()``, ``p.data += -lr * p.grad``, ``loss.item()``;
- torch.func: the ensemble of ``benchmarks/ensemble.py`` (``stack_module_state`` +
  ``vmap(grad(functional_call))`` of S single-model modules).

All three start from the same parameters (model s of the batched model, copied out) and
draw their minibatches from the same generators (``batched_model``'s, left after the
initial draws; one ``randint(0, N, (32,))`` a step however they are drawn), so they
train the same 32 models on the same minibatches; only float32 rounding differs (the
engine's fast kernels, e.g. tanh as 2 sigmoid(2x) - 1). Each run is asserted to agree
with the batched one on every model's first loss (same init, same first minibatch)
within ``INIT_TOL``; the loss after training is reported, not asserted (at the large
gains, chaotic deep nets amplify rounding differences).

Each run is a fresh subprocess that runs one method (``python -m benchmarks.atlas_bench
--child METHOD``), so its peak resident memory (getrusage's ru_maxrss) is that method's
own; every child uses one torch intra-op thread (``torch.set_num_threads(1)``,
OMP/MKL_NUM_THREADS=1) and the engine one worker (``workers=1``), or n of each with
``--atlas-threads n`` (the same count for every method). A child warms up
first (a short untimed run, as vmap's first calls are slow) and times the training loop
only (not building or copying models). Rounds interleave the three methods, rotating
their order, and the median is reported, so that load from other jobs on the machine
hits every column alike; the load average is printed.

Run alone: ``python -m benchmarks.bench --only atlas`` (``make bench`` runs every row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.ensemble import LectureDeepNet, func_train_models
from charlm import engine
from charlm.atlas import batched_model
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from charlm.layers import Linear as StackedLinear
from charlm.layers import Tanh as StackedTanh
from charlm.model import MLP
from charlm.step import TrainStep
from reference.lecture import Linear, Tanh, lecture_layers_train

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("batched", "lecture", "func")
LABELS = {"batched": "batched engine", "lecture": "lecture loop", "func": "torch.func"}
DEPTH, WIDTH, STEPS, BATCH, LR = 16, 100, 300, 32, 0.1
# x tanh's 5/3: gains 0.83, 1.0 (the order-to-chaos edge), 1.25, 1.5, 1.67, 2.08, 2.5, 3.33
GAIN_FACTORS = (0.5, 0.6, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0)
SEEDS = (0, 1, 2, 3)
TARGET = 6.0  # the budget: batched >= 6x the lecture's loop (and ahead of func)
INIT_TOL = 1e-4  # nats: each model's first loss, every method against the batched run
WARMUP_STEPS = 2


def variant(depth: int, width: int) -> VariantConfig:
    """The atlas's variant of a tanh cell without BatchNorm (``pipeline.atlas._variant``):
    ``depth`` hidden layers of ``width`` units; the gain is replaced per model by
    ``batched_model``."""
    return VariantConfig(
        init="second_half", layers=depth, n_hidden=width, nonlinearity="tanh",
        batchnorm=False, gain=1.0,
    )  # fmt: skip


def build(
    depth: int, width: int, gains: list[float], seeds: list[int], V: int, T: int
) -> tuple[MLP, list[torch.Generator]]:
    """The atlas's batched model: S = len(gains) * len(seeds) models, gain-major, and
    their generators (``charlm.atlas.batched_model``)."""
    model_cfg = ModelConfig(n_embd=10, n_hidden=width)
    model, generators = batched_model(model_cfg, variant(depth, width), gains, seeds, V, T)
    assert model.layers[0].weight.shape[2] == width  # the variant's width is the model's
    return model, generators


def train_config(steps: int, seeds: list[int]) -> TrainConfig:
    """The atlas's training run (``pipeline.atlas.train_cell``): constant lr 0.1,
    batch 32, fast kernels, CPU, one record."""
    return TrainConfig(
        seeds=seeds, max_steps=steps, batch_size=BATCH, lr=LR, lr_decay_step=steps,
        record_every=steps, kernels="fast", device="cpu",
    )  # fmt: skip


class _GivenLinear(Linear):
    """The lecture's ``Linear`` (its ``__call__`` and ``parameters``) holding given
    tensors, weight (fan_in, fan_out) and bias (fan_out,), instead of drawing them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias


def lecture_model(model: MLP, s: int) -> tuple[torch.Tensor, list]:
    """Model s of the batched ``model`` as the lecture's objects: a copy of C (V, E) and
    the layer list (``_GivenLinear`` and the lecture's ``Tanh``), copies of its tensors.
    Only Linear and tanh layers (the atlas's tanh cells without BatchNorm)."""
    layers: list = []
    for m in model.layers:
        if isinstance(m, StackedLinear):
            bias = None if m.bias is None else m.bias[s].detach().clone()
            layers.append(_GivenLinear(m.weight[s].detach().clone(), bias))
        elif isinstance(m, StackedTanh):
            layers.append(Tanh())
        else:
            raise ValueError(f"the atlas row has Linear and Tanh layers only, not {m}")
    return model.C[s].detach().clone(), layers


def run_method(
    method: str, X: torch.Tensor, Y: torch.Tensor, model: MLP, gens: list[torch.Generator],
    steps: int, seeds: list[int],
) -> dict:  # fmt: skip
    """Train the S models of ``model`` (changed in place only by 'batched') by ``method``;
    model s draws its minibatches from ``gens[s]``; ``seeds``: the atlas's seed list.
    The engine runs ``torch.get_num_threads()`` workers (each on one thread).

    Returns 'seconds' (the training loop(s), wall time) and 'loss' float32 (steps, S)
    in nats, each step's minibatch loss before its update.
    """
    S = model.n_models
    if method == "batched":
        workers = torch.get_num_threads()  # the other methods' intra-op threads
        result = engine.train(model, X, Y, gens, train_config(steps, seeds), workers=workers)
        return {"seconds": result.seconds, "loss": result.loss}
    copies = [lecture_model(model, s) for s in range(S)]
    if method == "lecture":
        losses = torch.empty(steps, S)
        t0 = time.perf_counter()
        for s, (C, layers) in enumerate(copies):
            run = lecture_layers_train(C, layers, gens[s], X, Y, steps, BATCH, steps, False)
            losses[:, s] = run["loss"]
        return {"seconds": time.perf_counter() - t0, "loss": losses}
    if method == "func":
        nets = [LectureDeepNet(C, layers) for C, layers in copies]
        result = func_train_models(X, Y, nets, gens, steps, BATCH, steps)
        return {"seconds": result["seconds"], "loss": result["loss"]}
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def child(args: argparse.Namespace) -> dict:
    """One method in this (fresh) process: warm up, then the timed run; the figures."""
    from benchmarks.bench import PeakRSS, T, V, load_train_split

    torch.set_num_threads(args.threads)
    X, Y, source = load_train_split()
    gains, seeds = args.gains, args.seeds
    warm, warm_gens = build(args.depth, args.width, gains, seeds, V, T)
    run_method(args.child, X, Y, warm, warm_gens, WARMUP_STEPS, seeds)
    del warm, warm_gens
    model, gens = build(args.depth, args.width, gains, seeds, V, T)
    with PeakRSS() as mem:
        run = run_method(args.child, X, Y, model, gens, args.steps, seeds)
    loss = run["loss"]
    tail = loss[-min(50, args.steps) :].double().mean(0)  # (S,) trainability's final loss
    return {
        "method": args.child, "seconds": run["seconds"], "data": source,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mb": mem.peak, "train_rss_growth_mb": mem.delta,
        "first_loss": loss[0].tolist(), "final_loss": tail.tolist(),
    }  # fmt: skip


def gemm_seconds(
    depth: int, width: int, S: int, steps: int, workers: int, V: int = 27, T: int = 3
) -> float:  # fmt: skip
    """Seconds the engine's torch.bmm calls alone take for S models x ``steps``: its
    (padded) shapes read from a ``TrainStep`` of its largest seed group
    (``engine.seed_groups``), timed on one thread by ``bench.bmm_seconds``, divided by
    the workers that run groups in parallel. No method doing these float32 GEMMs can
    beat it; the lecture's loop does the same GEMMs one model at a time."""
    from benchmarks.bench import bmm_seconds
    from charlm.ops import LinearOp

    groups = engine.seed_groups(S, workers)
    g = max(sl.stop - sl.start for sl in groups)
    model, _ = build(depth, width, [1.0], [0] * g, V, T)
    step = TrainStep(model, BATCH, slice(0, g), "fast")
    shapes = []
    for op in step.ops:
        if isinstance(op, LinearOp):  # forward, dW = x^T dout, dx = dout W^T
            dout = op.out[:, :, : op.N]
            shapes += [(op.x.shape, op.W.shape), (op.xT.shape, op.out.shape)]
            shapes += [(dout.shape, op.WT.shape)]
    return bmm_seconds(shapes) / g * S * steps / min(workers, len(groups))


def measure_atlas(
    rounds: int, steps: int, depth: int, width: int, factors: list[float], seeds: list[int],
    threads: int = 1,
) -> dict:  # fmt: skip
    """The atlas row: ``rounds`` interleaved rounds of the three methods, each run in a
    child process (``child``) with ``threads`` torch threads (the engine: as many
    workers), plus the engine's GEMM time each round.

    Returns one dict of figures (seconds: medians over rounds; peak memory: the largest
    over rounds; losses: the first round's, each run being deterministic);
    AssertionError if a method's first losses leave the batched run's by more than
    ``INIT_TOL``.
    """
    from pipeline.atlas import gains_of

    gains = gains_of("tanh", factors, [])
    S = len(gains) * len(seeds)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "benchmarks.atlas_bench", "--steps", str(steps),
           "--depth", str(depth), "--width", str(width), "--threads", str(threads),
           "--gain-factors", ",".join(map(str, factors)),
           "--seeds", ",".join(map(str, seeds)), "--child"]  # fmt: skip
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    gemm: list[float] = []
    load_before = os.getloadavg()
    for r in range(rounds):
        for m in METHODS[r % 3 :] + METHODS[: r % 3]:  # rotate the order each round
            out = subprocess.run(
                [*cmd, m], cwd=ROOT, env=env, capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                raise RuntimeError(f"atlas child {m} failed:\n{out.stderr[-4000:]}")
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
        gemm.append(gemm_seconds(depth, width, S, steps, threads))
    load_after = os.getloadavg()
    sec = {m: statistics.median(r["seconds"] for r in runs[m]) for m in METHODS}
    ref = runs["batched"][0]
    row = {
        "row": "atlas", "depth": depth, "width": width, "nonlinearity": "tanh",
        "batchnorm": False, "gains": gains, "seeds": seeds, "models": S, "steps": steps,
        "batch_size": BATCH, "lr": LR, "rounds": rounds, "torch_threads": threads,
        "engine_workers": threads, "data": ref["data"],
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "gemm_limit_seconds": statistics.median(gemm), "target": TARGET,
    }  # fmt: skip
    for m in METHODS:
        first = max(
            abs(a - b) for a, b in zip(runs[m][0]["first_loss"], ref["first_loss"], strict=True)
        )
        assert first <= INIT_TOL, f"atlas: {m}'s first losses off the batched run's by {first}"
        row |= {
            f"{m}_seconds": sec[m], f"{m}_seconds_per_round": [r["seconds"] for r in runs[m]],
            f"{m}_us_per_model_step": sec[m] / steps / S * 1e6,
            f"{m}_threads": max(r["threads"] for r in runs[m]),
            f"{m}_peak_rss_mb": max(r["peak_rss_mb"] for r in runs[m]),
            f"{m}_train_rss_growth_mb": _max_or_none(r["train_rss_growth_mb"] for r in runs[m]),
            f"{m}_first_loss_max_abs_diff": first,
        }  # fmt: skip
        final = runs[m][0]["final_loss"]
        row |= {f"{m}_{k}": v for k, v in _final_figures(final, ref["final_loss"], len(gains))}
    row["lecture_over_batched"] = sec["lecture"] / sec["batched"]
    row["func_over_batched"] = sec["func"] / sec["batched"]
    row["lecture_over_gemm_limit"] = sec["lecture"] / row["gemm_limit_seconds"]
    row["met_lecture"] = row["lecture_over_batched"] >= TARGET
    row["met_func"] = row["func_over_batched"] > 1.0
    return row


def _final_figures(final: list[float], ref: list[float], G: int) -> list[tuple[str, object]]:
    """Summaries of one method's final losses (S,) (nats, gain-major) against the batched
    run's ``ref``: median and [min, max] over finite models, the count of non-finite
    ones, and |final - ref| (median, max; and max per gain, (G,)) over models finite in
    both. None where no model qualifies."""
    f, r = torch.tensor(final, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    ok = torch.isfinite(f) & torch.isfinite(r)
    diff = (f - r).abs()

    def stat(x: torch.Tensor, fn) -> float | None:
        return float(fn(x)) if x.numel() else None

    return [
        ("final_loss_median", stat(f[ok], torch.median)),
        ("final_loss_range", [stat(f[ok], torch.min), stat(f[ok], torch.max)]),
        ("non_finite", int((~torch.isfinite(f)).sum())),
        ("final_loss_abs_diff_median", stat(diff[ok], torch.median)),
        ("final_loss_abs_diff_max", stat(diff[ok], torch.max)),
        ("final_loss_abs_diff_max_per_gain", [
            stat(d[k], torch.max)
            for d, k in zip(diff.view(G, -1), ok.view(G, -1), strict=True)
        ]),
    ]  # fmt: skip


def _max_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def print_atlas(r: dict) -> None:
    """The atlas row as a small table, its legend, then the budget verdicts."""
    g = r["gains"]
    print(
        f"\natlas: depth {r['depth']}, width {r['width']}, tanh, no BatchNorm; "
        f"{len(g)} gains ({g[0]:.3g}..{g[-1]:.3g}) x {len(r['seeds'])} seeds = "
        f"{r['models']} models; {r['steps']} steps, batch {r['batch_size']}, lr {r['lr']}\n"
        f"every method on {_threads(r['torch_threads'])} (engine workers="
        f"{r['engine_workers']}), each run in a fresh process; "
        f"median of {r['rounds']} interleaved rounds; load average (1/5/15 min) "
        f"{_load(r['load_average_before'])} before, {_load(r['load_average_after'])} after"
    )
    print(
        f"{'method':15} {'seconds':>8} {'us/m-s':>8} {'/batched':>8} {'peak RSS MB':>11}"
        f" {'train +MB':>9} {'1st loss':>8} {'final loss median [range]':>26}"
        f" {'|final diff| med/max':>21}"
    )
    for m in METHODS:
        if r[f"{m}_final_loss_median"] is None:
            final, diff = "-", "-"
        else:
            lo, hi = r[f"{m}_final_loss_range"]
            final = f"{r[f'{m}_final_loss_median']:.3f} [{lo:.3f}, {hi:.3f}]"
            diff = f"{r[f'{m}_final_loss_abs_diff_median']:.1e}/"
            diff += f"{r[f'{m}_final_loss_abs_diff_max']:.1e}"
        growth = r[f"{m}_train_rss_growth_mb"]
        print(
            f"{LABELS[m]:15} {r[f'{m}_seconds']:8.2f} {r[f'{m}_us_per_model_step']:8.1f}"
            f" {r[f'{m}_seconds'] / r['batched_seconds']:7.2f}x {r[f'{m}_peak_rss_mb']:11.0f}"
            f" {'-' if growth is None else f'+{growth:.0f}':>9}"
            f" {r[f'{m}_first_loss_max_abs_diff']:8.1e} {final:>26} {diff:>21}",
            flush=True,
        )
    print(ATLAS_LEGEND)
    print(
        f"GEMM limit of this run: {r['gemm_limit_seconds']:.2f} s; the lecture's loop takes "
        f"{r['lecture_over_gemm_limit']:.2f}x that, the batched engine "
        f"{r['batched_seconds'] / r['gemm_limit_seconds']:.2f}x"
    )
    ok = {True: "met", False: "NOT met"}
    print(
        f"budget: batched >= {r['target']:.0f}x the lecture's loop: "
        f"{r['lecture_over_batched']:.2f}x, {ok[r['met_lecture']]}; ahead of torch.func: "
        f"{r['func_over_batched']:.2f}x, {ok[r['met_func']]}",
        flush=True,
    )


ATLAS_LEGEND = """\
seconds: training loop(s) only, all models, median over rounds; us/m-s: per model-step.
peak RSS: the child process's lifetime high-water mark (getrusage ru_maxrss: Python,
  torch, the data and the run); train +MB: its growth during the timed run.
1st loss: max over models of |first-step loss - the batched run's| (same init, same first
  minibatch; asserted <= 1e-4). final loss: mean of the last 50 steps, nats, over models;
  |final diff|: against the batched run (float32 rounding: the engine's fast tanh vs
  autograd's, amplified by training, most at the largest gains).
GEMM limit: the engine's own torch.bmm shapes timed alone (one core, divided by the
  workers that run in parallel): no method doing these float32 GEMMs gets below it."""


def _threads(n: int) -> str:
    return "ONE torch thread" if n == 1 else f"{n} torch threads"


def _load(avg: list[float]) -> str:
    return "/".join(f"{a:.1f}" for a in avg)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The atlas row's options (shared by ``benchmarks.bench``)."""
    parser.add_argument("--atlas-rounds", type=int, default=3,
                        help="interleaved rounds of the atlas row; median (default 3)")  # fmt: skip
    parser.add_argument("--atlas-steps", type=int, default=STEPS,
                        help=f"steps of the atlas row (default {STEPS})")  # fmt: skip
    parser.add_argument("--atlas-depth", type=int, default=DEPTH,
                        help=f"hidden layers of the atlas row (default {DEPTH})")  # fmt: skip
    parser.add_argument("--atlas-width", type=int, default=WIDTH,
                        help=f"hidden units of the atlas row (default {WIDTH})")  # fmt: skip
    parser.add_argument("--atlas-threads", type=int, default=1,
                        help="torch threads of every method in the atlas row, engine "
                        "workers alike (default 1; on a loaded machine 2 made the lecture's "
                        "loop spin: > 9 min instead of 35 s)")  # fmt: skip


def run_row(args: argparse.Namespace) -> dict:
    """Measure and print the atlas row with ``add_arguments``'s options."""
    row = measure_atlas(
        args.atlas_rounds, args.atlas_steps, args.atlas_depth, args.atlas_width,
        list(GAIN_FACTORS), list(SEEDS), args.atlas_threads,
    )  # fmt: skip
    print_atlas(row)
    return row


def main() -> None:
    """One method in this process, its figures as one JSON line (``measure_atlas``'s
    children; the row itself: ``python -m benchmarks.bench --only atlas``)."""
    from pipeline.atlas import gains_of

    parser = argparse.ArgumentParser(description="one method of the atlas row (a child)")
    parser.add_argument("--child", choices=METHODS, required=True)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--gain-factors", type=_floats, default=list(GAIN_FACTORS))
    parser.add_argument("--seeds", type=_ints, default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.gains = gains_of("tanh", args.gain_factors, [])
    print(json.dumps(child(args)))


if __name__ == "__main__":
    main()
