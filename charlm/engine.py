"""Training engine: S models (one per seed) trained at once by minibatch SGD.

Contract of ``train``:

- Shapes: the model holds S stacked models (leading seed dim); X (N, T) int64 contexts
  and Y (N,) int64 targets of the training split; one ``torch.Generator`` per model.
  Returns ``TrainResult``: float32 per-step losses (max_steps, S) in nats, update:data
  ratios per weight matrix, optional captured steps (deep models).
- Exactness: for the one-layer MLP (``charlm.model.MLP``, ``_Step``) every value is the
  one autograd computes for the lecture's code, bit for bit (same kernels, same order,
  same operands), so the engine reproduces the lecture's run itself. Deep models
  (``charlm.layers.DeepMLP``) run the same loop with ``charlm.deep_step.DeepStep``:
  per-layer ops composed per variant, equal to the lecture's deep loop to float32
  rounding (~1e-6 relative after 1,001 steps), not bitwise.
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
from charlm.deep_step import DeepStep
from charlm.layers import DeepMLP
from charlm.model import MLP
from charlm.step_base import StepBase

CHUNK = 1000  # steps of minibatch indices drawn at once per generator

WEIGHTS = ("C", "W1", "W2")  # matrices whose update:data ratio is recorded

MAX_GROUP = 16  # largest group of seeds one worker steps together (cache-sized)

PAD = 16  # free GEMM dimensions are padded to a multiple of this (one AVX-512 vector)


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
            C, W1, W2 for the one-layer MLP; C and every ``layers.i.weight`` if deep.
        seconds: wall time of the training loop in seconds.
        captures: step -> snapshot of that step (deep models, ``capture_steps``):
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


def _round_up(n: int, m: int = PAD) -> int:
    return -(-n // m) * m


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


class _Step(StepBase):
    """Buffers and the op sequence of one training step for S models of one shape.

    Parameters live in one flat buffer ``P`` and their gradients in ``G`` (same layout,
    padded as docs/engine.md explains); ``views(P)`` and ``views(G)`` give the tensors
    by name. The model itself is only read by ``load`` and written by ``store``.
    """

    def __init__(self, model: MLP, B: int, seeds: slice | None = None):
        self.seeds = seeds = seeds or slice(0, model.n_models)
        S = seeds.stop - seeds.start
        V, T = model.vocab_size, model.block_size
        E, H = model.C.shape[2], model.W1.shape[2]
        Vp, Kp = _round_up(V), _round_up(T * E + 1)
        self.S, self.B, self.V, self.T, self.E = S, B, V, T, E
        self.bn = model.bn is not None
        m = model.bn.momentum if self.bn else 0.0
        dev, dt = model.C.device, model.C.dtype
        self.dtype = dt
        # Python scalars as 0-dim CPU tensors of the op's dtype: same rounding (a Python
        # float is cast to the tensor's dtype by the op anyway), no conversion per call
        k = {"B": B, "m": m, "1-m": 1 - m, "2/(B-1)": 2.0 / (B - 1), "-lr": 0.0}
        self.k = {name: torch.tensor(float(v), dtype=dt) for name, v in k.items()}
        self.k["B-1 f64"] = torch.tensor(B - 1.0, dtype=torch.float64)
        self.lr, self.neg_lr = 0.0, self.k["-lr"]
        # b1 is row T*E of the padded W1 (embcat's column T*E is 1): (embcat @ W1) + b1
        # rounds exactly as the K-loop's last FMA, 1 * b1 + acc
        shapes = {"C": (S, V, E), "W1": (S, Kp, H)}
        if self.bn:
            shapes.update({"bn.gain": (S, H), "bn.bias": (S, H)})
        shapes.update({"W2": (S, H, Vp), "b2": (S, Vp)})
        self.shapes = shapes
        self.P = torch.zeros(sum(math.prod(s) for s in shapes.values()), device=dev, dtype=dt)
        self.G = torch.zeros_like(self.P)
        p = self.views(self.P)
        self.g = g = self.views(self.G)
        empty = lambda *shape: torch.empty(shape, device=dev, dtype=dt)  # noqa: E731
        TE = T * E
        # forward
        self.Cflat = p["C"].view(S * V, E)
        self.emb = empty(S * B * T, E)  # index_select writes rows of E
        self.embcat = torch.zeros(S, B, Kp, device=dev, dtype=dt)  # (S, B, Kp), pads stay 0
        self.embcat_TE = self.embcat[:, :, :TE]
        if not self.bn:
            self.embcat[:, :, TE] = 1.0  # multiplies b1
        self.emb_TE = self.emb.view(S, B, TE)
        self.embcatT = self.embcat.transpose(1, 2)
        self.W1, self.W1T = p["W1"], p["W1"].transpose(1, 2)  # (S, Kp, H), (S, H, Kp)
        self.hpre = empty(S, B, H)
        self.h = empty(S, B, H)
        self.hT = self.h.transpose(1, 2)
        self.W2 = p["W2"]
        self.W2T = p["W2"][:, :, :V].transpose(1, 2)  # (S, V, H): K = V is faster than Vp
        self.b2 = p["b2"].unsqueeze(1)  # (S, 1, Vp)
        self.logits = empty(S, B, Vp)
        self.lp = empty(S, B, Vp)
        self.onehot = empty(S * B, Vp)  # -1/B at the target, else 0
        self.onehot3 = self.onehot.view(S, B, Vp)
        self.table = torch.eye(Vp, device=dev, dtype=dt) * (-1.0 / B)
        # backward
        self.dlogits = empty(S, B, Vp)
        self.dlogits_V = self.dlogits[:, :, :V]
        self.gb2 = g["b2"][:, :V]
        self.dh = empty(S, B, H)
        self.dhpre = empty(S, B, H)
        self.demb = empty(S, B, Kp)
        self.demb_rows = empty(S, B, TE)
        self.demb_src = self.demb_rows.view(S * B * T, E)
        self.demb_view = self.demb[:, :, :TE]
        self.gCflat = g["C"].view(S * V, E)
        if self.bn:
            self.gain, self.bias = p["bn.gain"].unsqueeze(1), p["bn.bias"].unsqueeze(1)
            self.stats = empty(2, S, 1, H)  # batch mean and std
            self.mean, self.std = self.stats[0], self.stats[1]
            self.running = empty(2, S, H)  # running mean and std
            self.stats_m = empty(2, S, 1, H)
            self.hpre_f64 = torch.empty(S, B, H, device=dev, dtype=torch.float64)
            self.s1 = torch.empty(S, 1, H, device=dev, dtype=torch.float64)
            self.s2 = torch.empty(S, 1, H, device=dev, dtype=torch.float64)
            self.a = empty(S, B, H)  # hpre - mean
            self.b = empty(S, B, H)  # gain * a
            self.c = empty(S, B, H)  # b / std
            self.t = empty(S, B, H)
            self.dc = empty(S, B, H)
            self.small = [empty(S, 1, H) for _ in range(3)]
        else:
            self.gb1 = g["W1"][:, TE]  # (S, H)

    def unpadded(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (P or G) with the model's shapes (non-contiguous)."""
        v = self.views(flat)
        TE, V = self.T * self.E, self.V
        if not self.bn:
            v["b1"] = v["W1"][:, TE]
        v["W1"], v["W2"], v["b2"] = v["W1"][:, :TE], v["W2"][..., :V], v["b2"][..., :V]
        return v

    @torch.no_grad()
    def load(self, model: MLP) -> None:
        """Copy the model's parameters (and BatchNorm buffers) into the buffers."""
        self.P.zero_()
        self.views(self.P)["b2"].fill_(-math.inf)  # padded logits are -inf: softmax 0
        sl = self.seeds
        for name, t in self.unpadded(self.P).items():
            t.copy_(model.get_parameter(name)[sl])
        if self.bn:
            self.running[0].copy_(model.bn.running_mean[sl])
            self.running[1].copy_(model.bn.running_std[sl])

    @torch.no_grad()
    def store(self, model: MLP) -> None:
        """Copy the buffers back into the model's parameters (and BatchNorm buffers)."""
        sl = self.seeds
        for name, t in self.unpadded(self.P).items():
            model.get_parameter(name)[sl] = t
        if self.bn:
            model.bn.running_mean[sl] = self.running[0]
            model.bn.running_std[sl] = self.running[1]

    def step(
        self, flat: torch.Tensor, tgt: torch.Tensor, tgt_flat: torch.Tensor, nll: torch.Tensor
    ) -> None:
        """Forward and backward for one minibatch; gradients into ``G``.

        Args:
            flat: int64 (S*B*T,), indices into C viewed as (S*V, E).
            tgt: int64 (S, B, 1) targets; tgt_flat: the same as (S*B,).
            nll: float32 (S, B, 1), receives log-probabilities of the targets.
        """
        bmm = torch.bmm
        # forward: embcat @ W1 (+ b1 | BatchNorm), tanh, @ W2 + b2, log_softmax
        torch.index_select(self.Cflat, 0, flat, out=self.emb)
        self.embcat_TE.copy_(self.emb_TE)
        bmm(self.embcat, self.W1, out=self.hpre)
        hpreact = self._batchnorm_forward() if self.bn else self.hpre  # b1 included
        torch.tanh(hpreact, out=self.h)
        bmm(self.h, self.W2, out=self.logits)
        self.logits.add_(self.b2)
        self.loss_head(tgt, tgt_flat, nll)  # log_softmax, nll_loss and their backward
        g = self.g
        bmm(self.hT, self.dlogits, out=g["W2"])
        torch.sum(self.dlogits_V, 1, out=self.gb2)  # V wide: autograd's summation order
        bmm(self.dlogits_V, self.W2T, out=self.dh)
        torch.ops.aten.tanh_backward.grad_input(self.dh, self.h, grad_input=self.dhpre)
        dhpre = self._batchnorm_backward(self.dhpre) if self.bn else self.dhpre
        bmm(self.embcatT, dhpre, out=g["W1"])
        if not self.bn:  # overwrite the GEMM's row sum with autograd's summation order
            torch.sum(dhpre, 1, out=self.gb1)
        bmm(dhpre, self.W1T, out=self.demb)
        self.demb_rows.copy_(self.demb_view)
        self.gCflat.zero_()
        self.gCflat.index_add_(0, flat, self.demb_src)

    def _batchnorm_forward(self) -> torch.Tensor:
        """gain * (hpre - mean) / std + bias with the lecture's rounding; running update.

        mean: float32 sum / B, bitwise ``Tensor.mean``. std: unbiased, sqrt of
        (sum d^2 - (sum d)^2 / B) / (B - 1) with d = hpre - mean exact in float64, then
        rounded to float32. ``Tensor.std`` runs Welford's algorithm in float64 (9 ns
        per element on this CPU: 57 us per model-step); both are accurate to ~1e-16, so
        they round to the same float32 except when the value lies within ~1e-16 of a
        rounding boundary: 0 of 640,000 random values, 1 of the 15.3 million of the
        canonical 200,000-step run (step 76,426, 1 ulp). Running buffers:
        (1 - m) * running + m * batch in three roundings, as
        ``0.999 * running + 0.001 * batch``.
        """
        k = self.k
        torch.sum(self.hpre, 1, keepdim=True, out=self.mean)
        self.mean.div_(k["B"])
        d = self.hpre_f64.copy_(self.hpre).sub_(self.mean)  # exact in float64
        torch.sum(d, 1, keepdim=True, out=self.s1)
        torch.sum(d.square_(), 1, keepdim=True, out=self.s2)
        var = self.s2.addcmul_(self.s1, self.s1, value=-1.0 / self.B).div_(k["B-1 f64"])
        self.std.copy_(var.sqrt_())
        torch.sub(self.hpre, self.mean, out=self.a)
        torch.mul(self.a, self.gain, out=self.b)
        torch.div(self.b, self.std, out=self.c)
        torch.mul(self.stats, k["m"], out=self.stats_m)
        self.running.mul_(k["1-m"]).add_(self.stats_m.squeeze(2))
        return torch.add(self.c, self.bias, out=self.hpre)

    def _batchnorm_backward(self, dout: torch.Tensor) -> torch.Tensor:
        """Autograd's backward of the lecture's BatchNorm expression, node by node.

        out = c + bias, c = b / std, b = gain * a, a = hpre - mean, with mean and std
        functions of hpre. Grad of hpre = (da + dstd-term) + dmean-term, accumulated in
        the order autograd's engine runs the nodes (Sub, then Std, then Mean). Negated
        terms are kept positive and subtracted: rounding is symmetric, so the bits agree.
        """
        g, k = self.g, self.k
        neg_dstd, neg_dmean, coef = self.small
        torch.sum(dout, 1, out=g["bn.bias"])  # AddBackward: sum_to_size
        torch.div(dout, self.std, out=self.dc)  # DivBackward, self: grad / other
        torch.div(self.c, self.std, out=self.t)  # other: -grad * ((self / other) / other)
        self.t.mul_(dout)
        torch.sum(self.t, 1, keepdim=True, out=neg_dstd)
        torch.mul(self.dc, self.a, out=self.t)  # MulBackward, gain: grad * a
        torch.sum(self.t, 1, out=g["bn.gain"])
        da = self.dc.mul_(self.gain)  # MulBackward, a: grad * gain
        torch.sum(da, 1, keepdim=True, out=neg_dmean)  # SubBackward, mean: -grad
        # StdBackward: (2 / (B - 1)) * (grad / (std * 2)) * (hpre - mean)
        torch.add(self.std, self.std, out=coef)  # std * 2, exactly
        torch.div(neg_dstd, coef, out=coef).mul_(k["2/(B-1)"])  # -coefficient
        torch.mul(self.a, coef, out=self.t)
        da.sub_(self.t)
        # MeanBackward: grad.expand(B, H) / B
        return da.sub_(neg_dmean.div_(k["B"]))


def forward_backward(
    model: MLP | DeepMLP, idx: torch.Tensor, targets: torch.Tensor, grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One training-mode forward and hand-written backward pass for all S models.

    Args:
        model: the models (one-layer ``MLP`` or ``DeepMLP``); in-place updates their
            BatchNorm running buffers.
        idx: int64 (S, B, T) contexts; targets: int64 (S, B) next characters.
        grads: name -> tensor of the parameter's shape, overwritten with dloss/dparam
            where loss is each model's own mean cross-entropy.

    Returns:
        float32 (S,), each model's mean cross-entropy on its minibatch, in nats.

    For ``MLP`` every value is bitwise what autograd gives for the lecture's code (see
    the module docstring); for ``DeepMLP`` equal up to float32 rounding
    (charlm/deep_step.py). ``train`` runs the same step on persistent buffers.
    """
    S, B, _ = idx.shape
    deep = isinstance(model, DeepMLP)
    step = DeepStep(model, B) if deep else _Step(model, B)
    step.load(model)
    flat = (idx + model.vocab_size * torch.arange(S, device=idx.device).view(S, 1, 1)).view(-1)
    nll = torch.empty(S, B, 1, device=idx.device, dtype=step.dtype)
    with torch.no_grad():
        step.step(flat, targets.unsqueeze(2), targets.reshape(-1), nll)
        for name, g in step.unpadded(step.G).items():
            grads[name].copy_(g)
        if deep:
            step.store(model)  # parameters unchanged; running buffers updated
        elif step.bn:
            model.bn.running_mean.copy_(step.running[0])
            model.bn.running_std.copy_(step.running[1])
    return -nll_mean(nll.squeeze(2))


def _update_ratio(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """log10(std(g) / std(p)) per model: (S, ...) -> (S,); ``g`` is already -lr * grad."""
    S = p.shape[0]
    return (g.reshape(S, -1).std(1) / p.reshape(S, -1).std(1)).log10()


class _Group:
    """A slice of the S models trained by one worker: its ``_Step`` and its generators."""

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
        # One-layer models keep _Step, their fast path that is bitwise the lecture's
        # loop (padded GEMMs, b1 folded into W1, float64 std, autograd's BatchNorm node
        # order, the lecture's std-form BatchNorm). The layer-generic DeepStep is not
        # bitwise (closed-form backward, sigmoid tanh) and has the deep BatchNorm form,
        # so expressing the one-layer net through it would change its numbers.
        self.step = _Step(model, B, seeds) if isinstance(model, MLP) else DeepStep(model, B, seeds)
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
    model: MLP | DeepMLP,
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
            ``TrainResult.captures`` (deep models only), e.g. ``(1000, max_steps - 1)``
            for the lecture's snapshot after 1,001 steps and the end of training.

    Returns:
        TrainResult; models whose loss became non-finite keep running harmlessly on
        NaNs and are reported in ``diverged_at``.

    Raises:
        ValueError: on mismatched sizes, a BatchNorm model with batch_size < 2, or
            ``capture_steps`` for a one-layer model.
    """
    S = model.n_models
    deep = isinstance(model, DeepMLP)
    if len(generators) != S:
        raise ValueError(f"{len(generators)} generators for {S} models")
    if (model.has_batchnorm if deep else model.bn is not None) and cfg.batch_size < 2:
        raise ValueError("BatchNorm needs batch_size >= 2 (the unbiased std divides by B - 1)")
    if capture_steps and not deep:
        raise ValueError("capture_steps is implemented for deep models only")
    device = model.C.device
    cpu = device.type == "cpu"
    workers = (workers or available_cpus()) if cpu else 1
    X, Y = X.to(device), Y.to(device)
    losses = torch.empty(cfg.max_steps, S, device=device)
    record_steps = list(range(0, cfg.max_steps, cfg.record_every))
    weights = model.weight_names if deep else WEIGHTS
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
