"""Training engine: S models (one per seed) trained at once by minibatch SGD.

Contract of ``train``:

- Shapes: the model holds S stacked models (leading seed dim); X (N, T) int64 contexts
  and Y (N,) int64 targets of the training split; one ``torch.Generator`` per model.
  Returns ``TrainResult``: float32 per-step losses (max_steps, S) in nats, update:data
  ratios per weight matrix, optional captured steps.
- Exactness: one step for every ``charlm.model.MLP`` (``charlm.step.TrainStep``, one
  op per layer). With ``cfg.kernels == 'exact'`` every value is the one autograd
  computes for the lecture's code, bit for bit (same kernels, same order, same
  operands), so the engine reproduces the lecture's runs themselves; 'fast' kernels
  agree to float32 rounding (~1e-6 relative after 1,001 steps).
- Randomness: model s draws its minibatch indices from its own ``generators[s]``, one
  ``randint(0, n, (batch_size,))`` per step as in the lecture (drawn ``CHUNK`` steps at
  a time, which yields the identical sequence), and every op is per model, so a seed
  trained inside a batch of seeds, in any group or worker thread, follows the
  trajectory of the seed trained alone, bit for bit.

Why a hand-written backward pass, the padding and buffer tricks, the worker threads
and their measurements: docs/engine.md; ``make bench`` prints the current figures.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from charlm.config import TrainConfig
from charlm.cpus import available_cpus
from charlm.model import MLP
from charlm.step import TrainStep

CHUNK = 1000  # steps of minibatch indices drawn at once per generator

MAX_GROUP = 16  # largest group of seeds one worker steps together (cache-sized)


@dataclass
class TrainResult:
    """What a run leaves besides the trained model.

    Attributes:
        loss: float32 (max_steps, S), the minibatch loss of every step in nats
            (before that step's update; row 0 is the loss at initialisation).
        diverged_at: per model, the first step whose loss was not finite, or None.
        record_steps: int64 (R,), the steps at which ``update_ratio`` was recorded.
        update_ratio: name -> float32 (R, S), log10(std(lr * grad) / std(param)) of
            each weight matrix at those steps, param taken after that step's update
            (makemore part 3's ``ud``, computed after ``p.data += -lr * p.grad``):
            C and every ``layers.i.weight`` (``MLP.weight_names``).
        seconds: wall time of the training loop in seconds.
        captures: step -> snapshot of that step (``capture_steps``):
            'out' and 'out_grad', hidden layer index -> float32 (S, B, H), each hidden
            nonlinearity's output in that step's forward pass and the loss gradient at
            it (the lecture's ``layer.out`` and ``layer.out.grad``); 'grad', parameter
            name -> (S, ...), that step's gradient; 'param', name -> (S, ...), the
            parameters after that step's update (the lecture's grad:data ratio divides
            by their std).
    """

    loss: torch.Tensor
    diverged_at: list[int | None]
    record_steps: torch.Tensor
    update_ratio: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    captures: dict[int, dict[str, dict]] = field(default_factory=dict)


def nll_mean(nll: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim, summed in the order of ATen's CPU ``nll_loss``.

    ``F.cross_entropy(..., reduction='mean')`` sums the B per-example losses with a
    cascade of 8 partial sums flushed every 2**p examples (``nll_loss_out_frame`` in
    ATen's LossNLL.cpp, p = max(4, ceil(log2 B) / 8)); replaying it makes the recorded
    loss bitwise the lecture's ``loss.item()``. (N, B) float32 -> (N,).
    """
    B = nll.shape[-1]
    levels = 8
    power = max(4, math.ceil(math.log2(B)) // levels) if B > 1 else 4
    mask = (1 << power) - 1
    partial = [torch.zeros_like(nll[..., 0]) for _ in range(levels)]
    for b in range(B):
        partial[0] = partial[0] + nll[..., b]
        for j in range(levels - 1):
            if b & (mask << (j * power)):
                break
            partial[j + 1] = partial[j + 1] + partial[j]
            partial[j] = torch.zeros_like(partial[j])
    total = torch.zeros_like(partial[0])
    for p in partial:
        total = total + p
    return total / B


def forward_backward(
    model: MLP,
    idx: torch.Tensor,
    targets: torch.Tensor,
    grads: dict[str, torch.Tensor],
    kernels: str = "exact",
) -> torch.Tensor:
    """One training-mode forward and hand-written backward pass for all S models.

    Args:
        model: the models; in-place updates their BatchNorm running buffers.
        idx: int64 (S, B, T) contexts; targets: int64 (S, B) next characters.
        grads: name -> tensor of the parameter's shape, overwritten with dloss/dparam
            where loss is each model's own mean cross-entropy.
        kernels: 'exact' or 'fast' (``charlm.ops``).

    Returns:
        float32 (S,), each model's mean cross-entropy on its minibatch, in nats.

    With exact kernels every value is bitwise what autograd gives for the lecture's
    code (see the module docstring). ``train`` runs the same step on persistent buffers.
    """
    S, B, _ = idx.shape
    step = TrainStep(model, B, kernels=kernels)
    step.load(model)
    flat = (idx + model.vocab_size * torch.arange(S, device=idx.device).view(S, 1, 1)).view(-1)
    nll = torch.empty(S, B, 1, device=idx.device, dtype=step.dtype)
    with torch.no_grad():
        step.step(flat, targets.unsqueeze(2), targets.reshape(-1), nll)
        for name, g in step.unpadded(step.G).items():
            grads[name].copy_(g)
        step.store(model)  # parameters unchanged; running buffers updated
    return -nll_mean(nll.squeeze(2))


def _update_ratio(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """log10(std(g) / std(p)) per model: (S, ...) -> (S,); ``g`` is already -lr * grad."""
    S = p.shape[0]
    return (g.reshape(S, -1).std(1) / p.reshape(S, -1).std(1)).log10()


class _Group:
    """A slice of the S models trained by one worker: its ``TrainStep`` and generators."""

    def __init__(
        self,
        model: MLP,
        B: int,
        seeds: slice,
        generators: list[torch.Generator],
        X: torch.Tensor,
        Y: torch.Tensor,
        cfg: TrainConfig,
        lr_scale: float,
        losses: torch.Tensor,
        ratios: dict[str, torch.Tensor],
        capture_steps: frozenset[int] = frozenset(),
    ):
        self.step = TrainStep(model, B, seeds, cfg.kernels)
        self.step.load(model)
        self.generators = generators[seeds]
        self.X, self.Y, self.cfg, self.lr_scale = X, Y, cfg, lr_scale
        self.losses, self.ratios = losses[:, seeds], {w: r[:, seeds] for w, r in ratios.items()}
        S = seeds.stop - seeds.start
        self.nll = torch.empty(CHUNK, S, B, 1, device=X.device, dtype=self.step.dtype)
        self.nll_steps = self.nll.unbind(0)
        self.offset = model.vocab_size * torch.arange(S, device=X.device).view(1, S, 1, 1)
        self.capture_steps, self.captures = capture_steps, {}

    def run(self, start: int, k: int) -> None:
        """Steps ``start`` to ``start + k - 1``: draw their indices, train, record."""
        step, cfg, X, Y = self.step, self.cfg, self.X, self.Y
        S, B = step.S, step.B
        ix = torch.stack(
            [torch.randint(0, X.shape[0], (k, B), generator=g) for g in self.generators], 1
        ).to(X.device)  # (k, S, B)
        flat = X.index_select(0, ix.view(-1)).view(k, S, B, -1).add_(self.offset)
        flat = flat.view(k, -1).unbind(0)  # k x (S*B*T,), rows of C viewed as (S*V, E)
        tgt = Y.index_select(0, ix.view(-1)).view(k, S, B)
        tgt3, tgt_flat = tgt.unsqueeze(3).unbind(0), tgt.view(k, -1).unbind(0)
        nll = self.nll_steps
        p, g = step.unpadded(step.P), step.unpadded(step.G)
        with torch.no_grad():
            for j in range(k):
                i = start + j
                step.step(flat[j], tgt3[j], tgt_flat[j], nll[j])
                if i in self.capture_steps:
                    self.captures[i] = step.capture()
                step.scale_grads_(cfg.lr_at(i, self.lr_scale))
                step.P.add_(step.G)
                if i % cfg.record_every == 0:  # the lecture's ud: std of the updated weight
                    for w, r in self.ratios.items():
                        r[i // cfg.record_every] = _update_ratio(p[w], g[w])
                if i in self.capture_steps:
                    self.captures[i]["param"] = {n: t.clone() for n, t in p.items()}
            self.losses[start : start + k] = -nll_mean(self.nll[:k].squeeze(3))


def seed_groups(S: int, workers: int, max_group: int = MAX_GROUP) -> list[slice]:
    """Split S models into contiguous, near-equal groups: at least ``workers`` of them
    (so every worker has one) and none larger than ``max_group`` (cache-sized)."""
    n = min(S, max(workers, -(-S // max_group)))
    bounds = [round(i * S / n) for i in range(n + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def train(
    model: MLP,
    X: torch.Tensor,
    Y: torch.Tensor,
    generators: list[torch.Generator],
    cfg: TrainConfig,
    lr_scale: float = 1.0,
    progress: Callable[[int, torch.Tensor], None] | None = None,
    workers: int | None = None,
    capture_steps: tuple[int, ...] = (),
) -> TrainResult:
    """Train ``model`` (S models) in place with minibatch SGD, as in makemore part 3.

    Args:
        model: S = ``len(generators)`` models on the device where training runs.
        X, Y: int64 (N, T) contexts and (N,) targets of the training split (any device).
        generators: one CPU ``torch.Generator`` per model, already advanced past the
            initial draws (``build_mlp`` leaves them so).
        cfg: steps, batch size, learning-rate schedule, recording interval.
        lr_scale: multiplies the schedule (a variant's ``lr_scale``).
        progress: called as ``progress(steps_done, last_loss)`` after each chunk.
        workers: CPU threads, each training its own groups of seeds with single-threaded
            ops (docs/engine.md, "workers"); default ``charlm.cpus.available_cpus()``. While
            training on the CPU, torch's intra-op thread count is set to 1 and then
            restored. Ignored on CUDA (one group, one thread).
        capture_steps: 0-based steps whose forward/backward pass is kept in
            ``TrainResult.captures``, e.g. ``(1000, max_steps - 1)``
            for the lecture's snapshot after 1,001 steps and the end of training.

    Returns:
        TrainResult; models whose loss became non-finite keep running harmlessly on
        NaNs and are reported in ``diverged_at``.

    Raises:
        ValueError: on mismatched sizes, a BatchNorm model with batch_size < 2, or
            an unknown ``cfg.kernels``.
    """
    S = model.n_models
    if len(generators) != S:
        raise ValueError(f"{len(generators)} generators for {S} models")
    if model.batchnorm_modules and cfg.batch_size < 2:
        raise ValueError("BatchNorm needs batch_size >= 2 (the unbiased std divides by B - 1)")
    device = model.C.device
    cpu = device.type == "cpu"
    workers = (workers or available_cpus()) if cpu else 1
    X, Y = X.to(device), Y.to(device)
    losses = torch.empty(cfg.max_steps, S, device=device)
    record_steps = list(range(0, cfg.max_steps, cfg.record_every))
    weights = model.weight_names
    ratios = {w: torch.empty(len(record_steps), S, device=device) for w in weights}
    slices = seed_groups(S, workers) if cpu else [slice(0, S)]
    cap = frozenset(capture_steps)
    groups = [
        _Group(model, cfg.batch_size, sl, generators, X, Y, cfg, lr_scale, losses, ratios, cap)
        for sl in slices
    ]
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers) if workers > 1 and len(groups) > 1 else None
    t0 = time.perf_counter()
    try:
        if cpu:
            torch.set_num_threads(1)
        for start in range(0, cfg.max_steps, CHUNK):
            k = min(CHUNK, cfg.max_steps - start)
            if pool is None:
                for group in groups:
                    group.run(start, k)
            else:
                list(pool.map(lambda group: group.run(start, k), groups))  # noqa: B023
            if progress is not None:
                progress(start + k, losses[start + k - 1])
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown()
    seconds = time.perf_counter() - t0
    for group in groups:
        group.step.store(model)
    captures = {
        i: _concat([g.captures[i] for g in groups]) for i in sorted(cap) if i < cfg.max_steps
    }
    losses = losses.cpu()
    finite = torch.isfinite(losses)
    diverged_at = [
        None if bool(finite[:, s].all()) else int((~finite[:, s]).nonzero()[0, 0]) for s in range(S)
    ]
    return TrainResult(
        loss=losses,
        diverged_at=diverged_at,
        record_steps=torch.tensor(record_steps, dtype=torch.int64),
        update_ratio={w: v.cpu() for w, v in ratios.items()},
        seconds=seconds,
        captures=captures,
    )


def _concat(parts: list[dict]) -> dict:
    """Nested dicts of (S_group, ...) tensors, one per seed group -> (S, ...) on the CPU."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts).cpu()
    return {k: _concat([p[k] for p in parts]) for k in parts[0]}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto'")
    return torch.device(name)
