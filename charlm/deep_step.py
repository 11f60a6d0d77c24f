"""One training step of S deep MLPs (``charlm.layers.DeepMLP``), backward by hand.

Each layer type has one op class with a ``forward`` and a hand-written ``backward`` on
preallocated buffers, and ``DeepStep`` composes them in the model's layer order, so
any depth, width, nonlinearity and BatchNorm placement runs the same code. It has the
interface ``charlm.engine`` drives (``load``, ``step``, ``scale_grads_``, ``store``,
views of the flat parameter buffer ``P`` and gradient buffer ``G``), so seed groups,
worker threads and recording are shared with the one-layer engine.

Exactness: every op is per model (``bmm``, reductions over the batch dim), so a seed
gives bitwise the same run inside any batch of seeds. Against autograd on the
lecture's code (``reference.lecture.lecture_deep_train``) the linear, log-softmax,
tanh-backward and update kernels are the same; tanh is computed as 2 sigmoid(2x) - 1
and BatchNorm's variance in float32 and its backward in closed form, each for speed
(see the classes). So the runs agree to float32 rounding, not bitwise: after the
lecture's 1,001 steps its printed statistics agree to ~2e-6 relative
(tests/test_deep.py asserts 1e-4).

Speed (2-core AVX-512 EPYC, torch 2.13 CPU, deep BatchNorm net of the lecture, 300
steps, median of 3), microseconds per model-step: the lecture's loop 1,414; this
engine 462 at S=1, 214 at S=8 (6.6x), 153 at S=64 (9.2x). GEMMs are ~55% of a step
(the 100x100 ones at ~80% of one core's sgemm peak); groups of 8 seeds instead of 16
(``engine.MAX_GROUP``) made no difference.
"""

from __future__ import annotations

import math

import torch

from charlm.layers import BatchNorm1d, DeepMLP, Identity, Linear, ReLU, Tanh
from charlm.step_base import StepBase


class _Buffers:
    """Allocation helper: float buffers of the step's device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def __call__(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(shape, device=self.device, dtype=dtype or self.dtype)

    def const(self, value: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A 0-dim tensor: same rounding as a Python scalar, no conversion per call."""
        return torch.tensor(value, device=self.device, dtype=dtype or self.dtype)


class _LinearOp:
    """out = x @ W (+ b); backward dW = x^T @ dout, db = sum_B dout, dx = dout @ W^T."""

    def __init__(self, x, W, gW, b, gb, new: _Buffers):
        S, B, _ = x.shape
        self.x, self.xT, self.W, self.WT, self.gW = x, x.transpose(1, 2), W, W.transpose(1, 2), gW
        self.b = None if b is None else b.unsqueeze(1)
        self.gb = gb
        self.out = new(S, B, W.shape[2])
        self.dx = new(S, B, W.shape[1])

    def forward(self) -> torch.Tensor:
        torch.bmm(self.x, self.W, out=self.out)
        if self.b is not None:
            self.out.add_(self.b)  # the lecture's self.out += self.bias
        return self.out

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        torch.bmm(self.xT, dout, out=self.gW)
        if self.gb is not None:
            torch.sum(dout, 1, out=self.gb)
        return torch.bmm(dout, self.WT, out=self.dx)


class _BatchNormOp:
    """The lecture's deep BatchNorm1d (``charlm.layers.BatchNorm1d``), training mode.

    Forward: mean = sum_B x / B; var = sum_B (x - mean)^2 / (B - 1) (unbiased), two
    passes in float32 (``Tensor.var`` accumulates in float64: the two differ by an ulp
    or so; a float64 pass here cost ~25% of a step); std = sqrt(var + eps);
    xhat = (x - mean) / std; out = gamma * xhat + beta (``addcmul``); running
    = (1 - m) * running + m * batch for mean and var.
    Backward (d/dx of the above with the unbiased variance, eps inside the root):
    dx = (dxhat - sum_B(dxhat) / B - xhat * sum_B(dxhat * xhat) / (B - 1)) / std with
    dxhat = gamma * dout; dgamma = sum_B(dout * xhat), dbeta = sum_B(dout). As gamma is
    constant over B this is (gamma / std) * (dout - dbeta / B - xhat * dgamma / (B - 1)):
    4 passes over (S, B, H) instead of 7.
    """

    def __init__(self, x, gamma, ggamma, beta, gbeta, running, mod: BatchNorm1d, new: _Buffers):
        S, B, H = x.shape
        self.x, self.B = x, B
        self.gamma, self.beta = gamma.unsqueeze(1), beta.unsqueeze(1)
        self.ggamma, self.gbeta = ggamma, gbeta
        self.running = running  # (2, S, H): mean, var
        self.stats = new(2, S, 1, H)
        self.mean, self.var = self.stats[0], self.stats[1]
        self.stats_m = new(2, S, 1, H)
        self.std = new(S, 1, H)
        self.xhat, self.out, self.t, self.dx = (
            new(S, B, H),
            new(S, B, H),
            new(S, B, H),
            new(S, B, H),
        )
        self.sa = new(S, 1, H)
        self.sa_flat = self.sa.view(S, H)
        self.stats_m_flat = self.stats_m.view(2, S, H)
        self.k = {
            "B": new.const(B),
            "B-1": new.const(B - 1),
            "-(B-1)": new.const(-(B - 1)),
            "eps": new.const(mod.eps),
            "m": new.const(mod.momentum),
            "1-m": new.const(1 - mod.momentum),
        }

    def forward(self) -> torch.Tensor:
        k, x, xc = self.k, self.x, self.xhat
        torch.sum(x, 1, keepdim=True, out=self.mean)
        self.mean.div_(k["B"])
        torch.sub(x, self.mean, out=xc)
        torch.mul(xc, xc, out=self.t)
        torch.sum(self.t, 1, keepdim=True, out=self.var).div_(k["B-1"])
        torch.add(self.var, k["eps"], out=self.std).sqrt_()
        xc.div_(self.std)  # xhat
        torch.addcmul(self.beta, self.xhat, self.gamma, out=self.out)
        torch.mul(self.stats, k["m"], out=self.stats_m)
        self.running.mul_(k["1-m"]).add_(self.stats_m_flat)
        return self.out

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        k, c = self.k, self.sa
        torch.sum(dout, 1, out=self.gbeta)
        torch.mul(dout, self.xhat, out=self.t)
        torch.sum(self.t, 1, out=self.ggamma)
        # sum_B(dxhat) = gamma * dbeta and sum_B(dxhat * xhat) = gamma * dgamma, so
        # dx = (gamma / std) * (dout - dbeta / B - xhat * dgamma / (B - 1))
        torch.div(self.gbeta, k["B"], out=self.sa_flat)
        torch.sub(dout, c, out=self.dx)
        torch.div(self.ggamma, k["-(B-1)"], out=self.sa_flat)
        self.dx.addcmul_(self.xhat, c)
        torch.div(self.gamma, self.std, out=c)
        return self.dx.mul_(c)


class _TanhOp:
    """out = tanh(x) = 2 sigmoid(2x) - 1; dx = dout * (1 - out^2) (``tanh_backward``).

    ``torch.tanh`` (Sleef, 2.5 ns per element) was 17% of a deep step; the sigmoid form
    is 2.8x faster and within 1.8e-7 of it (absolute; |tanh| <= 1), the size of an ulp
    at |h| ~ 1. The 1,001-step figures still agree with the lecture's to ~2e-6.
    """

    def __init__(self, x, new: _Buffers):
        self.x, self.out, self.dx = x, new(*x.shape), new(*x.shape)
        self.two, self.one = new.const(2.0), new.const(1.0)

    def forward(self) -> torch.Tensor:
        torch.mul(self.x, self.two, out=self.out)
        torch.sigmoid(self.out, out=self.out)
        return self.out.mul_(self.two).sub_(self.one)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.tanh_backward.grad_input(dout, self.out, grad_input=self.dx)


class _ReLUOp:
    """out = max(x, 0); dx = dout where out > 0 (autograd's ``threshold_backward``)."""

    def __init__(self, x, new: _Buffers):
        self.x, self.out, self.dx = x, new(*x.shape), new(*x.shape)

    def forward(self) -> torch.Tensor:
        return torch.clamp_min(self.x, 0.0, out=self.out)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.threshold_backward.grad_input(dout, self.out, 0, grad_input=self.dx)


class _IdentityOp:
    """The 'linear' nonlinearity: no op either way."""

    def __init__(self, x, new: _Buffers):
        self.out = x

    def forward(self) -> torch.Tensor:
        return self.out

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return dout


_ACT = {Tanh: _TanhOp, ReLU: _ReLUOp, Identity: _IdentityOp}


class DeepStep(StepBase):
    """Buffers and ops of one training step for models ``seeds`` of a ``DeepMLP``.

    ``P`` and ``G`` are flat buffers of all parameters and their gradients in
    ``named_parameters`` order; ``unpadded(P)`` gives them by name, shape (S, ...).
    ``weight_names``: C and every Linear weight (the update:data ratio's matrices).
    ``hidden``: layer indices of the hidden nonlinearities (their outputs are captured).
    """

    def __init__(self, model: DeepMLP, B: int, seeds: slice | None = None):
        self.seeds = seeds = seeds or slice(0, model.n_models)
        S = seeds.stop - seeds.start
        V, T, E = model.vocab_size, model.block_size, model.C.shape[2]
        self.S, self.B, self.V = S, B, V
        dev, dt = model.C.device, model.C.dtype
        self.dtype = dt
        new = _Buffers(dev, dt)
        self.shapes = {n: (S, *p.shape[1:]) for n, p in model.named_parameters()}
        self.P = torch.zeros(sum(math.prod(s) for s in self.shapes.values()), device=dev, dtype=dt)
        self.G = torch.zeros_like(self.P)
        p, g = self.views(self.P), self.views(self.G)
        self.weight_names = model.weight_names
        self.hidden = model.hidden_indices
        self.Cflat, self.gCflat = p["C"].view(S * V, E), g["C"].view(S * V, E)
        self.emb = new(S * B * T, E)
        x = self.emb.view(S, B, T * E)  # (S, B, T*E): rows are ordered (s, b, t)
        self.bn_names, self.running = [], []
        self.ops = []
        for i, mod in enumerate(model.layers):
            n = f"layers.{i}."
            if isinstance(mod, Linear):
                has_b = mod.bias is not None
                b, gb = (p[n + "bias"], g[n + "bias"]) if has_b else (None, None)
                op = _LinearOp(x, p[n + "weight"], g[n + "weight"], b, gb, new)
            elif isinstance(mod, BatchNorm1d):
                running = new(2, S, mod.gamma.shape[1])
                self.bn_names.append(n)
                self.running.append(running)
                op = _BatchNormOp(
                    x,
                    p[n + "gamma"],
                    g[n + "gamma"],
                    p[n + "beta"],
                    g[n + "beta"],
                    running,
                    mod,
                    new,
                )
            else:
                op = _ACT[type(mod)](x, new)
            self.ops.append(op)
            x = op.out
        self.logits = x  # (S, B, V)
        self.lp = new(S, B, V)
        self.onehot = new(S * B, V)  # -1/B at the target, else 0
        self.onehot3 = self.onehot.view(S, B, V)
        self.table = torch.eye(V, device=dev, dtype=dt) * (-1.0 / B)
        self.dlogits = new(S, B, V)
        self.douts: list[torch.Tensor | None] = [None] * len(self.ops)  # grad at each output
        self.neg_lr = new.const(0.0)
        self.lr = 0.0

    def unpadded(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same as ``views``: no padding here (the one-layer engine's name)."""
        return self.views(flat)

    @torch.no_grad()
    def load(self, model: DeepMLP) -> None:
        """Copy the models' parameters and BatchNorm running buffers into the buffers."""
        sl = self.seeds
        for name, t in self.views(self.P).items():
            t.copy_(model.get_parameter(name)[sl])
        for n, running in zip(self.bn_names, self.running, strict=True):
            running[0].copy_(model.get_buffer(n + "running_mean")[sl])
            running[1].copy_(model.get_buffer(n + "running_var")[sl])

    @torch.no_grad()
    def store(self, model: DeepMLP) -> None:
        """Copy the buffers back into the models' parameters and running buffers."""
        sl = self.seeds
        for name, t in self.views(self.P).items():
            model.get_parameter(name)[sl] = t
        for n, running in zip(self.bn_names, self.running, strict=True):
            model.get_buffer(n + "running_mean")[sl] = running[0]
            model.get_buffer(n + "running_var")[sl] = running[1]

    def step(
        self, flat: torch.Tensor, tgt: torch.Tensor, tgt_flat: torch.Tensor, nll: torch.Tensor
    ) -> None:
        """Forward and backward for one minibatch; gradients into ``G`` (arguments as
        ``charlm.engine._Step.step``): the layers' ops forward, then backward in reverse."""
        torch.index_select(self.Cflat, 0, flat, out=self.emb)
        for op in self.ops:
            op.forward()
        self.loss_head(tgt, tgt_flat, nll)  # then backward through the layers
        d = self.dlogits
        for j in range(len(self.ops) - 1, -1, -1):
            self.douts[j] = d
            d = self.ops[j].backward(d)
        self.gCflat.zero_()
        self.gCflat.index_add_(0, flat, d.view(-1, self.Cflat.shape[1]))

    def capture(self) -> dict[str, dict]:
        """Copies, after ``step``, of what the lecture's histograms show: 'out' and
        'out_grad' (hidden layer index -> (S, B, H)), 'grad' (name -> (S, ...))."""
        return {
            "out": {i: self.ops[i].out.clone() for i in self.hidden},
            "out_grad": {i: self.douts[i].clone() for i in self.hidden},
            "grad": {n: t.clone() for n, t in self.views(self.G).items()},
        }
