"""Speed of the engine against the lecture's loop, per model-step, in one process.

For each network (the one-layer naive, kaiming, batchnorm; the deep deep_bn and
deep_tanh) and each number of seeds S, three ways to train, on the real training split
(names.txt from $NAMES_MIRROR or ../shared/data/names.txt; synthetic windows of the same
shape if neither exists, and the output says so):
- the lecture's loop as written (one model, eager autograd; ``reference/lecture.py``,
  the deep one without its debugging ``retain_grad`` and update:data lines);
- ``charlm.engine.train`` (S models at once);
- the ``torch.func`` ensemble of ``benchmarks/ensemble.py`` (S models at once, PyTorch's
  model-ensembling recipe), with one intra-op thread like the lecture (``--func-threads
  1,2`` tries more and keeps the faster: on a machine shared with other jobs, torch's
  spinning OpenMP threads made it 5-47x slower at S <= 8 in one run here).
Repeats are interleaved (lecture, then every S) and the median is reported, so machine
load hits every column alike. Also printed: the engine's diagnostics cost
(record_every=1000 against no recording), peak memory, the GEMM limit (FLOPs per
model-step / torch.bmm throughput on the engine's own shapes, measured here), and
whether the canonical seed's losses equal the lecture's bit for bit; a 3-seed ensemble's
losses, parameters and BatchNorm running buffers after 20 steps must be the lecture's
loop's with the same seed within 1e-4 (asserted).
Then the atlas row (``benchmarks/atlas_bench.py``): one depth-16 tanh architecture, 8
gains x 4 seeds, 300 steps, as the depth atlas trains it (the batched engine) against
the lecture's loop model by model and a torch.func ensemble, each in a fresh process on
one thread, with peak memory; ``--only atlas`` runs it alone, ``--only networks`` skips it.
Run: python -m benchmarks.bench [--steps 1000] [--deep-steps 300] [--seeds 1,8,64]
     [--only networks|atlas] [--atlas-rounds 3] [--atlas-threads 1]
The last line of output is one JSON object with every figure ('rows'; 'atlas').
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks import atlas_bench
from benchmarks.ensemble import NETWORKS, func_check, func_train
from charlm import engine
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from charlm.data import Vocabulary, build_windows, parse_names, shuffle_split
from charlm.init import build_mlp
from charlm.step import round_up
from reference.lecture import lecture_deep_train, lecture_train

ROOT = Path(__file__).resolve().parents[1]
CANONICAL = 2147483647
# required speed-up over the lecture at S seeds: one-layer (the first brief), deep (issue 10)
TARGETS = {"shallow": {8: 4.0, 64: 10.0}, "deep": {8: 5.0, 64: 8.0}}
FIRST = {"init": "first_half", "out_weight_scale": 0.01, "out_bias_scale": 0.0}
NAIVE = {**FIRST, "weight_scale": 1.0, "bias_scale": 1.0, "out_weight_scale": 1.0}
NAIVE["out_bias_scale"] = 1.0
VARIANT_CFG = {  # the lecture's three variants (DESIGN.md), as the pipeline's configs
    "naive": VariantConfig(**NAIVE),
    "kaiming": VariantConfig(**FIRST, bias_scale=0.01),
    "batchnorm": VariantConfig(**FIRST, batchnorm=True, batchnorm_form="std", momentum=0.001),
    # the lecture's deep nets (tests/test_deep.py): BatchNorm after every Linear, the
    # last gamma x 0.1, gain 1; without BatchNorm: biases, last weight x 0.1, gain 5/3
    "deep_bn": VariantConfig(
        layers=5, n_hidden=100, batchnorm=True, batchnorm_output=True, gain=1.0
    ),
    "deep_tanh": VariantConfig(layers=5, n_hidden=100),
}
# the pipeline's kernels per network (params.yaml): the deep variants train with 'fast'
KERNELS = {"deep_bn": "fast", "deep_tanh": "fast"}
B, T, V, E, H = 32, 3, 27, 10, 200
LINEARS = {  # (fan_in, fan_out) of each network's Linear layers
    "shallow": [(T * E, H), (H, V)],
    "deep": [(T * E, 100), *[(100, 100)] * 4, (100, V)],
}
# a 3-seed ensemble after 20 steps against the lecture's loop run with each seed
FUNC_CHECK_STEPS, FUNC_CHECK_SEEDS, FUNC_TOL = 20, 3, 1e-4


def gemm_flops(kind: str) -> int:
    """Multiply-adds x 2 of one model-step's GEMMs: each Linear forward, and two
    backward (grad of the weight and of the input)."""
    return 3 * 2 * B * sum(k * n for k, n in LINEARS[kind])


def load_train_split() -> tuple[torch.Tensor, torch.Tensor, str]:
    """The lecture's training windows (X int64 (N, 3), Y (N,)) and where they came from."""
    env = os.environ.get("NAMES_MIRROR", "").removeprefix("file://")
    for path in (Path(env) if env else None, ROOT.parent / "shared" / "data" / "names.txt"):
        if path is not None and path.is_file():
            words = parse_names(path.read_bytes(), source=str(path))
            train_words, _, _ = shuffle_split(words, 42, 0.8, 0.1)
            X, Y = build_windows(train_words, Vocabulary.from_words(words), T)
            return X, Y, f"real names.txt ({path})"
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (182_625, T), generator=g)
    return X, torch.randint(0, V, (182_625,), generator=g), "synthetic windows"


class PeakRSS:
    """Peak resident memory of this process during a block, in MB (Linux /proc).

    Freed memory is first returned to the OS (gc, glibc malloc_trim) and the kernel's
    high-water mark reset (/proc/self/clear_refs, '5'), so ``peak`` is this block's
    peak and ``delta`` its growth over the RSS at entry. Where that is unavailable,
    ``peak`` is getrusage's lifetime maximum and ``delta`` is None.
    """

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.resettable and self.start is not None:
            self.peak = self._status("VmHWM")
            self.delta = self.peak - self.start
        else:
            import resource

            self.peak, self.delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return None


def time_lecture(
    X: torch.Tensor, Y: torch.Tensor, variant: str, steps: int, seed: int = CANONICAL
) -> dict:  # fmt: skip
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if variant.startswith("deep_"):
            bn = variant == "deep_bn"
            loss = lecture_deep_train(X, Y, steps, bn, seed=seed, debug=False)["loss"]
        else:
            _, loss = lecture_train(X, Y, variant, steps, seed=seed)
        seconds = time.perf_counter() - t0
    return {"us": seconds / steps * 1e6, "loss": loss, "peak_mb": mem.peak, "delta_mb": mem.delta}


def time_engine(
    X: torch.Tensor, Y: torch.Tensor, variant: str, S: int, steps: int, record_every: int,
    workers: int,
) -> dict:  # fmt: skip
    """One engine run of S seeds (the canonical seed first); record_every > steps: none."""
    generators = [torch.Generator().manual_seed(s) for s in seeds(S)]
    model = build_mlp(ModelConfig(), VARIANT_CFG[variant], V, T, generators)
    cfg = TrainConfig(
        seeds=seeds(S), max_steps=steps, lr_decay_step=steps, record_every=record_every,
        kernels=KERNELS.get(variant, "exact"),
    )  # fmt: skip
    with PeakRSS() as mem:
        result = engine.train(model, X, Y, generators, cfg, workers=workers)
    return {
        "us": result.seconds / steps / S * 1e6, "loss": result.loss[:, 0],
        "peak_mb": mem.peak, "delta_mb": mem.delta,
    }  # fmt: skip


def time_func(
    X: torch.Tensor, Y: torch.Tensor, variant: str, S: int, steps: int, threads: int
) -> dict:  # fmt: skip
    """One ``torch.func`` ensemble run of S seeds (``seeds(S)``), ``threads`` intra-op."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with PeakRSS() as mem:
            result = func_train(X, Y, variant, seeds(S), steps)
    finally:
        torch.set_num_threads(before)
    return {
        "us": result["seconds"] / steps / S * 1e6, "loss": result["loss"][:, 0],
        "peak_mb": mem.peak, "delta_mb": mem.delta,
    }  # fmt: skip


def seeds(S: int) -> list[int]:
    """The seeds of an S-model run: the canonical seed first, then 1, 2, ..."""
    return [CANONICAL, *range(1, S)]


def bmm_seconds(shapes: list[tuple[tuple, tuple]], repeats: int = 5) -> float:
    """Seconds of one pass of ``torch.bmm(A, B, out=...)`` over ``shapes`` ((A, B)
    shapes, each (batch, rows, cols)) on one intra-op thread: the best of ``repeats``
    means of 20 passes, random float32 operands."""
    ops = [(torch.randn(a), torch.randn(b)) for a, b in shapes]
    outs = [torch.empty(a[0], a[1], b[2]) for a, b in shapes]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(20):
                for (a, b), out in zip(ops, outs, strict=True):
                    torch.bmm(a, b, out=out)
            best = min(best, (time.perf_counter() - t0) / 20)
    finally:
        torch.set_num_threads(threads)
    return best


def gemm_limit(S: int, workers: int, kind: str = "shallow", repeats: int = 5) -> dict:
    """Time of the engine's torch.bmm calls per model-step, on its (padded) shapes.

    One thread, batches of the engine's group size for S seeds; ``limit_us`` divides by
    the number of workers that run groups in parallel (at most the number of groups).
    ``kind``: 'shallow' (engine._Step's six GEMMs) or 'deep' (DeepStep's three per Linear).
    """
    groups = engine.seed_groups(S, workers)
    g = max(sl.stop - sl.start for sl in groups)
    Kp, Vp = round_up(T * E + 1), round_up(V)
    shapes = [  # (A, B) per GEMM, as engine._Step issues them
        ((g, B, Kp), (g, Kp, H)), ((g, B, H), (g, H, Vp)), ((g, H, B), (g, B, Vp)),
        ((g, B, V), (g, V, H)), ((g, Kp, B), (g, B, H)), ((g, B, H), (g, H, Kp)),
    ]  # fmt: skip
    if kind == "deep":  # DeepStep: x @ W; x^T @ dout; dout @ W^T (unpadded)
        shapes = [
            s for k, n in LINEARS["deep"]
            for s in (((g, B, k), (g, k, n)), ((g, k, B), (g, B, n)), ((g, B, n), (g, n, k)))
        ]  # fmt: skip
    per_model = bmm_seconds(shapes, repeats) / g * 1e6
    parallel = min(workers, len(groups))
    return {
        "group": g, "gemm_us_one_core": per_model,
        "gflops_per_s": gemm_flops(kind) / per_model / 1e3,
        "limit_us": per_model / parallel, "parallel_workers": parallel,
    }  # fmt: skip


def measure(
    X: torch.Tensor, Y: torch.Tensor, variant: str, seed_counts: list[int], steps: int,
    repeats: int, workers: int, func_steps: int, func_threads: list[int],
) -> list[dict]:  # fmt: skip
    """Rows of one network: lecture, engine and ``torch.func`` ensemble at each S.

    Runs are interleaved per repeat (lecture, then each S: engine modes, ensemble at
    each thread count); figures are medians. Raises AssertionError when the ensemble's
    losses, parameters or running buffers leave the lecture's by more than ``FUNC_TOL``
    (``func_check``).
    """
    kind = "deep" if variant.startswith("deep_") else "shallow"
    # record_every: the default, none, and every step (to size one record's cost)
    modes = {"default": 1000, "none": steps + 1, "every": 1}
    runs: dict = {"lecture": [], **{(S, m): [] for S in seed_counts for m in modes}}
    runs |= {(S, t): [] for S in seed_counts for t in func_threads}
    # warm-up, not timed: first calls pay lazy initialisation (vmap's most of all)
    time_lecture(X, Y, variant, 2)
    time_engine(X, Y, variant, 2, 2, 1, workers)
    time_func(X, Y, variant, 2, 2, func_threads[0])
    check = func_check(X, Y, variant, seeds(FUNC_CHECK_SEEDS), FUNC_CHECK_STEPS)
    bad = {k: v for k, v in check.items() if v > FUNC_TOL}
    assert not bad, f"{variant}: torch.func ensemble off the lecture's loop by {bad}"
    for rep in range(repeats):
        runs["lecture"].append(time_lecture(X, Y, variant, steps))
        for S in seed_counts:
            for m in list(modes)[:: 1 if rep % 2 == 0 else -1]:  # alternate the order
                runs[(S, m)].append(time_engine(X, Y, variant, S, steps, modes[m], workers))
            for t in func_threads:
                runs[(S, t)].append(time_func(X, Y, variant, S, func_steps, t))
    lec = runs["lecture"]
    lec_us = statistics.median(r["us"] for r in lec)
    rows = []
    for S in seed_counts:
        eng = runs[(S, "default")]
        eng_us = statistics.median(r["us"] for r in eng)
        bare_us = statistics.median(r["us"] for r in runs[(S, "none")])
        every_us = statistics.median(r["us"] for r in runs[(S, "every")])
        all_runs = [r for m in modes for r in runs[(S, m)]]
        exact = all(torch.equal(r["loss"], lec[0]["loss"]) for r in all_runs)
        max_diff = max(float((r["loss"] - lec[0]["loss"]).abs().max()) for r in all_runs)
        func_us = {t: statistics.median(r["us"] for r in runs[(S, t)]) for t in func_threads}
        best = min(func_us, key=func_us.get)
        func = [r for t in func_threads for r in runs[(S, t)]]
        target = TARGETS[kind].get(S)
        rows.append({
            "variant": variant, "seeds": S, "steps": steps, "lecture_us_per_step": lec_us,
            "engine_us_per_model_step": eng_us, "speedup": lec_us / eng_us,
            "target": target, "met": lec_us / eng_us >= target if target else None,
            "func_us_per_model_step": func_us[best], "func_threads": best,
            **{f"func_us_per_model_step_{t}_threads": v for t, v in func_us.items()},
            "func_steps": func_steps,
            "speedup_vs_func": func_us[best] / eng_us, "func_speedup": lec_us / func_us[best],
            "func_peak_rss_mb": max(r["peak_mb"] for r in func),
            "func_rss_growth_mb": _max_or_none(r["delta_mb"] for r in func),
            **{f"func_max_abs_{k}_diff_to_lecture": v for k, v in check.items()},
            "engine_no_diagnostics_us": bare_us,
            "diagnostics_overhead_pct": 100 * (eng_us / bare_us - 1),
            # one record's cost, measured at record_every=1, spread over 1000 steps
            "diagnostics_overhead_pct_from_every_step": (every_us / bare_us - 1) / 10,
            "lecture_peak_rss_mb": max(r["peak_mb"] for r in lec),
            "lecture_rss_growth_mb": _max_or_none(r["delta_mb"] for r in lec),
            "engine_peak_rss_mb": max(r["peak_mb"] for r in eng),
            "engine_rss_growth_mb": _max_or_none(r["delta_mb"] for r in eng),
            "canonical_seed_bitwise_equal_to_lecture": exact,
            "canonical_seed_max_abs_loss_diff": max_diff,
            "gemm_flops_per_model_step": gemm_flops(kind),
            **{f"gemm_{k}": v for k, v in gemm_limit(S, workers, kind).items()},
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpus = os.cpu_count() or 1
    parser.add_argument("--steps", type=int, default=1000,
                        help="steps per run, one-layer networks (default 1000)")  # fmt: skip
    parser.add_argument("--deep-steps", type=int, default=300,
                        help="steps per run, deep networks (default 300)")  # fmt: skip
    parser.add_argument("--func-steps", type=int, default=200,
                        help="at most this many steps per torch.func run")  # fmt: skip
    parser.add_argument("--func-threads", default="1",
                        help="intra-op thread counts tried for torch.func, the faster "
                        "kept (default 1; e.g. 1,2: slow on a shared machine)")  # fmt: skip
    parser.add_argument("--seeds", default="1,8,64", help="numbers of seeds S (default 1,8,64)")
    parser.add_argument("--variants", default=",".join(NETWORKS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; median")
    parser.add_argument("--workers", type=int, default=cpus,
                        help="engine worker threads (default: number of CPUs)")  # fmt: skip
    parser.add_argument("--only", choices=("networks", "atlas"),
                        help="one part: the networks' rows or the atlas row "
                        "(default: both)")  # fmt: skip
    atlas_bench.add_arguments(parser)
    args = parser.parse_args()
    seed_counts = [int(s) for s in args.seeds.split(",")]
    func_threads = sorted({int(t) for t in args.func_threads.split(",")})
    # The lecture runs with one intra-op thread: its tensors are too small for torch to
    # split (same speed with 2 threads on an idle machine), and on a loaded one idle
    # OpenMP threads only spin (up to 30x slower). The engine uses its own worker
    # threads (engine.train docstring); torch.func with each of --func-threads.
    torch.set_num_threads(1)
    X, Y, source = load_train_split()
    if args.only != "atlas":
        print(f"data: {source}; {args.steps} steps per run ({args.deep_steps} deep, "
              f"torch.func at most {args.func_steps}), median of {args.repeats} interleaved "
              f"repeats; engine workers {args.workers}; torch {torch.__version__}")  # fmt: skip
    rows = []
    for variant in args.variants.split(",") if args.only != "atlas" else []:
        steps = args.deep_steps if variant.startswith("deep_") else args.steps
        func_steps = min(steps, args.func_steps)
        for row in measure(X, Y, variant, seed_counts, steps, args.repeats, args.workers,
                           func_steps, func_threads):  # fmt: skip
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    if rows:
        print(LEGEND)
    atlas = atlas_bench.run_row(args) if args.only != "networks" else None
    print(json.dumps({
        "data": source, "steps": args.steps, "deep_steps": args.deep_steps,
        "func_steps": args.func_steps, "repeats": args.repeats, "workers": args.workers,
        "gemm_flops_per_model_step": gemm_flops("shallow"), "rows": rows, "atlas": atlas,
    }))  # fmt: skip


LEGEND = """\
lecture: the lecture's loop, one model, us per step; engine: us per model-step (wall time
  / steps / S), record_every=1000; speed-up: lecture / engine.
func: the torch.func ensemble (stack_module_state + vmap(grad(functional_call))), us per
  model-step, the faster of its thread counts (threads); eng/func: func / engine.
GEMM limit: the engine's torch.bmm calls per model-step on its own (padded) shapes,
  timed here on one core, divided by the workers running in parallel; GFLOP/s: the
  model's 2*M*N*K per model-step over that time. The engine cannot beat this limit.
diag %: time with record_every=1000 over time with no recording, minus 1 (side by side)
  / the same estimated from record_every=1 (one record's cost spread over 1000 steps).
peak RSS (lecture/engine/func): the process's resident memory high-water mark during
  the run (reset before each run; includes ~250 MB of Python and torch).
bitwise: the canonical seed's loss at every step equals the lecture loop's exactly (the
  deep engine is not bitwise by design: docs/engine.md, "Deep networks")."""


def _max_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def print_row(r: dict, header: bool) -> None:
    """One line of the table (us/m-s: microseconds per model-step)."""
    if header:
        print(
            f"{'variant':10} {'S':>3} {'lecture':>9} {'engine':>8} {'speed-up':>8} {'target':>6}"
            f" {'func':>8} {'thr':>3} {'eng/func':>8} {'GEMM limit':>10} {'GFLOP/s':>7}"
            f" {'diag %':>11} {'peak RSS MB':>15} {'bitwise':>7}"
        )
        print(f"{'':14} {'us/step':>9} {'us/m-s':>8} {'':15} {'us/m-s':>8} {'':12}"
              f" {'us/m-s':>10} {'':7} {'lec/eng':>11} {'lec/eng/func':>15}")  # fmt: skip
    target = f"{r['target']:.0f}x" if r["target"] else "-"
    peak = f"{r['lecture_peak_rss_mb']:.0f}/{r['engine_peak_rss_mb']:.0f}"
    peak += f"/{r['func_peak_rss_mb']:.0f}"
    bitwise = "yes" if r["canonical_seed_bitwise_equal_to_lecture"] else "no"
    print(
        f"{r['variant']:10} {r['seeds']:>3} {r['lecture_us_per_step']:9.1f}"
        f" {r['engine_us_per_model_step']:8.1f} {r['speedup']:7.2f}x {target:>6}"
        f" {r['func_us_per_model_step']:8.1f} {r['func_threads']:>3}"
        f" {r['speedup_vs_func']:7.2f}x"
        f" {r['gemm_limit_us']:10.1f} {r['gemm_gflops_per_s']:7.1f}"
        f" {r['diagnostics_overhead_pct']:6.1f}/{r['diagnostics_overhead_pct_from_every_step']:.2f}"
        f" {peak:>15} {bitwise:>7}",
        flush=True,
    )


if __name__ == "__main__":
    main()
