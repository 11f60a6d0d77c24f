"""One op per layer type: forward and hand-written backward on preallocated buffers.

``charlm.step.TrainStep`` builds one op per layer of the model (``OPS[type(layer)]``,
else ``AutogradOp``) and chains them: each op reads its input buffer, writes ``out``,
and its ``backward(dout)`` writes the parameter gradients into views of the flat
gradient buffer and returns the gradient of its input. Every op is per model (``bmm``,
reductions over the batch dim), so a seed gives the same bits inside any batch.

Kernels: where an op has two, ``kernels='exact'`` uses autograd's own kernels in
autograd's node order, so the composed step is bitwise the lecture's loop, and
``kernels='fast'`` trades ~1e-6 relative for speed (tanh as 2 sigmoid(2x) - 1; the
'var' BatchNorm's float32 variance and closed-form backward). Measurements:
docs/engine.md.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from charlm.layers import BatchNorm1d, Identity, Linear, ReLU, Sigmoid, Tanh


class Buffers:
    """Allocation helper: float buffers of the step's device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def __call__(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(shape, device=self.device, dtype=dtype or self.dtype)

    def const(self, value: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A 0-dim tensor: same rounding as a Python scalar, no conversion per call."""
        return torch.tensor(value, device=self.device, dtype=dtype or self.dtype)


class LinearOp:
    """out = x @ W (+ b); backward dW = x^T @ dout, db = sum_B dout, dx = dout @ W^T.

    ``W`` and ``x`` may be stored padded (docs/engine.md, "padding"): ``W`` (S, Kp, Np)
    of which the model's weight is ``[:, :K, :N]``; with ``fold`` the bias is W's row K
    and x's column K is 1, so MKL's K-loop ends with ``acc + 1 * b``, bitwise
    ``(x @ W) + b``. Padded output columns carry a -inf bias (softmax 0).
    """

    def __init__(self, x, W, gW, b, gb, K: int, N: int, fold: bool, new: Buffers):
        S, B, _ = x.shape
        self.xT, self.W, self.gW, self.K, self.N, self.fold = x.transpose(1, 2), W, gW, K, N, fold
        self.x = x
        self.b = None if b is None or fold else b.unsqueeze(1)
        self.gb = gb
        self.WT = W[:, :, :N].transpose(1, 2)  # (S, N, Kp): K = N is faster than Np
        self.out = new(S, B, W.shape[2])
        self.dx = new(S, B, W.shape[1])
        self._dout: torch.Tensor | None = None  # the last dout and its unpadded view
        self._d: torch.Tensor | None = None
        self._dc: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        torch.bmm(self.x, self.W, out=self.out)
        if self.b is not None:
            self.out.add_(self.b)  # the lecture's self.out += self.bias
        return self.out

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        torch.bmm(self.xT, dout, out=self.gW)
        if dout is not self._dout:  # the same buffer every step: slice it once
            padded = dout.shape[2] != self.N
            self._dout, self._d = dout, dout[:, :, : self.N]
            self._dc = torch.empty_like(self._d) if padded else None
        d = self._d
        if self.gb is not None:  # (over)writes the folded row: autograd's summation order
            torch.sum(d, 1, out=self.gb)
        if self._dc is not None:
            # contiguous, as autograd's grad is: on the strided view MKL picks another
            # kernel when the fan-in is <= 11 and rounds 1 ulp differently
            d = self._dc.copy_(d)
        return torch.bmm(d, self.WT, out=self.dx)


class BatchNormOp:
    """``charlm.layers.BatchNorm1d`` in training mode, either form, either kernels.

    'var' form, fast: mean = sum_B x / B; var by two float32 passes (``Tensor.var``
    accumulates in float64); xhat = (x - mean) / sqrt(var + eps); out = gamma * xhat
    + beta (``addcmul``); backward in closed form with the unbiased variance,
    dx = (gamma / std) * (dout - dbeta / B - xhat * dgamma / (B - 1)).
    Exact (both forms): ``Tensor.var`` / a float64 std that rounds as ``Tensor.std``,
    the lecture's expression op by op, and a backward that replays autograd's nodes
    (Add, Mul, Div, Sqrt or Std, Var, Sub, Mean) in the order its engine accumulates
    them. Running buffers: (1 - m) * running + m * batch in three roundings.
    """

    def __init__(self, x, p: dict, g: dict, running, mod: BatchNorm1d, exact: bool, new: Buffers):
        S, B, H = x.shape
        self.x, self.B, self.form = x, B, mod.form
        self.exact = exact or mod.form == "std"  # the 'std' form has exact kernels only
        self.gamma, self.beta = p["gamma"].unsqueeze(1), p["beta"].unsqueeze(1)
        self.ggamma, self.gbeta = g["gamma"], g["beta"]
        self.running = running  # (2, S, H): mean and var (or std)
        self.stats = new(2, S, 1, H)  # batch mean and var (or std)
        self.mean, self.stat = self.stats[0], self.stats[1]
        self.stats_m = new(2, S, 1, H)
        self.stats_m_flat = self.stats_m.view(2, S, H)
        self.std = new(S, 1, H)
        self.a, self.xhat, self.out, self.t, self.dx = (new(S, B, H) for _ in range(5))
        self.small = [new(S, 1, H) for _ in range(3)]
        if self.form == "std":
            self.x64 = new(S, B, H, dtype=torch.float64)
            self.s1, self.s2 = new(S, 1, H, dtype=torch.float64), new(S, 1, H, dtype=torch.float64)
        m = mod.momentum
        k = {"B": B, "B-1": B - 1, "-(B-1)": -(B - 1), "eps": mod.eps, "m": m, "1-m": 1 - m}
        self.k = {n: new.const(v) for n, v in k.items()}
        self.k["2/(B-1)"] = new.const(2.0 / (B - 1))
        self.k["B-1 f64"] = new.const(B - 1.0, dtype=torch.float64)

    def forward(self) -> torch.Tensor:
        k, x = self.k, self.x
        torch.sum(x, 1, keepdim=True, out=self.mean)  # bitwise Tensor.mean
        self.mean.div_(k["B"])
        torch.sub(x, self.mean, out=self.a)
        if self.form == "std":
            self._std_forward()
        elif self.exact:
            torch.var(x, 1, keepdim=True, out=self.stat)
            torch.add(self.stat, k["eps"], out=self.std).sqrt_()
            torch.div(self.a, self.std, out=self.xhat)
            torch.mul(self.gamma, self.xhat, out=self.t)
            torch.add(self.t, self.beta, out=self.out)
        else:
            torch.mul(self.a, self.a, out=self.t)
            torch.sum(self.t, 1, keepdim=True, out=self.stat).div_(k["B-1"])
            torch.add(self.stat, k["eps"], out=self.std).sqrt_()
            torch.div(self.a, self.std, out=self.xhat)
            torch.addcmul(self.beta, self.xhat, self.gamma, out=self.out)
        torch.mul(self.stats, k["m"], out=self.stats_m)
        self.running.mul_(k["1-m"]).add_(self.stats_m_flat)
        return self.out

    def _std_forward(self) -> None:
        """The first half's gamma * (x - mean) / std + beta. std: unbiased, sqrt of
        (sum d^2 - (sum d)^2 / B) / (B - 1) with d = x - mean exact in float64, then
        rounded to float32: ``Tensor.std`` (a float64 Welford pass, 57 us per
        model-step here) rounds to the same float32 except within ~1e-16 of a rounding
        boundary (1 of the 15.3 million stds of the canonical 200,000-step run, 1 ulp)."""
        k = self.k
        d = self.x64.copy_(self.x).sub_(self.mean)  # exact in float64
        torch.sum(d, 1, keepdim=True, out=self.s1)
        torch.sum(d.square_(), 1, keepdim=True, out=self.s2)
        var = self.s2.addcmul_(self.s1, self.s1, value=-1.0 / self.B).div_(k["B-1 f64"])
        self.stat.copy_(var.sqrt_())
        torch.mul(self.a, self.gamma, out=self.t)  # b = gamma * a
        torch.div(self.t, self.stat, out=self.xhat)  # c = b / std
        torch.add(self.xhat, self.beta, out=self.out)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        if self.form == "std":
            return self._std_backward(dout)
        if self.exact:
            return self._var_backward(dout)
        k, c = self.k, self.small[0]
        torch.sum(dout, 1, out=self.gbeta)
        torch.mul(dout, self.xhat, out=self.t)
        torch.sum(self.t, 1, out=self.ggamma)
        # sum_B(dxhat) = gamma * dbeta and sum_B(dxhat * xhat) = gamma * dgamma
        c_flat = c.view(c.shape[0], -1)
        torch.div(self.gbeta, k["B"], out=c_flat)
        torch.sub(dout, c, out=self.dx)
        torch.div(self.ggamma, k["-(B-1)"], out=c_flat)
        self.dx.addcmul_(self.xhat, c)
        torch.div(self.gamma, self.std, out=c)
        return self.dx.mul_(c)

    def _var_backward(self, dout: torch.Tensor) -> torch.Tensor:
        """Autograd's nodes of gamma * ((x - mean) / sqrt(var + eps)) + beta: Add (beta),
        Mul (gamma), Div, Sqrt, Add (eps), Var, Sub and Mean; x's gradient accumulates
        Sub's, then Var's, then Mean's term."""
        k = self.k
        neg_dstd, neg_dmean, coef = self.small
        torch.sum(dout, 1, out=self.gbeta)  # AddBackward: sum_to_size
        torch.mul(dout, self.xhat, out=self.t)  # MulBackward, gamma: grad * xhat
        torch.sum(self.t, 1, out=self.ggamma)
        dxhat = torch.mul(dout, self.gamma, out=self.dx)  # MulBackward, xhat: grad * gamma
        torch.div(self.xhat, self.std, out=self.t)  # DivBackward, other:
        self.t.mul_(dxhat)  # -grad * ((self / other) / other)
        torch.sum(self.t, 1, keepdim=True, out=neg_dstd)
        da = dxhat.div_(self.std)  # DivBackward, self: grad / other
        torch.sum(da, 1, keepdim=True, out=neg_dmean)  # SubBackward, mean: -grad
        # SqrtBackward: grad / (2 * result); VarBackward: (2 / (B - 1)) * grad * (x - mean)
        torch.add(self.std, self.std, out=coef)
        torch.div(neg_dstd, coef, out=coef).mul_(self.k["2/(B-1)"])
        torch.mul(coef, self.a, out=self.t)
        da.sub_(self.t)
        return da.sub_(neg_dmean.div_(k["B"]))  # MeanBackward: grad.expand / B

    def _std_backward(self, dout: torch.Tensor) -> torch.Tensor:
        """Autograd's nodes of gamma * (x - mean) / std + beta: out = c + beta,
        c = b / std, b = gamma * a, a = x - mean; x's gradient accumulates Sub's, then
        Std's, then Mean's term. Negated terms are kept positive and subtracted:
        rounding is symmetric, so the bits agree."""
        k = self.k
        neg_dstd, neg_dmean, coef = self.small
        dc = self.dx
        torch.sum(dout, 1, out=self.gbeta)  # AddBackward: sum_to_size
        torch.div(dout, self.stat, out=dc)  # DivBackward, self: grad / other
        torch.div(self.xhat, self.stat, out=self.t)  # other: -grad * ((self / other) / other)
        self.t.mul_(dout)
        torch.sum(self.t, 1, keepdim=True, out=neg_dstd)
        torch.mul(dc, self.a, out=self.t)  # MulBackward, gamma: grad * a
        torch.sum(self.t, 1, out=self.ggamma)
        da = dc.mul_(self.gamma)  # MulBackward, a: grad * gamma
        torch.sum(da, 1, keepdim=True, out=neg_dmean)  # SubBackward, mean: -grad
        # StdBackward: (2 / (B - 1)) * (grad / (std * 2)) * (x - mean)
        torch.add(self.stat, self.stat, out=coef)  # std * 2, exactly
        torch.div(neg_dstd, coef, out=coef).mul_(k["2/(B-1)"])
        torch.mul(self.a, coef, out=self.t)
        da.sub_(self.t)
        return da.sub_(neg_dmean.div_(k["B"]))  # MeanBackward: grad.expand(B, H) / B


class TanhOp:
    """out = tanh(x); dx = dout * (1 - out^2) (autograd's ``tanh_backward``).

    Exact: ``torch.tanh`` (Sleef, 2.5 ns per element). Fast: 2 sigmoid(2x) - 1, 2.8x
    faster and within 1.8e-7 of it (absolute; |tanh| <= 1), about an ulp at |h| ~ 1.
    """

    def __init__(self, x, exact: bool, new: Buffers):
        self.x, self.out, self.dx, self.exact = x, new(*x.shape), new(*x.shape), exact
        self.two, self.one = new.const(2.0), new.const(1.0)

    def forward(self) -> torch.Tensor:
        if self.exact:
            return torch.tanh(self.x, out=self.out)
        torch.mul(self.x, self.two, out=self.out)
        torch.sigmoid(self.out, out=self.out)
        return self.out.mul_(self.two).sub_(self.one)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.tanh_backward.grad_input(dout, self.out, grad_input=self.dx)


class SigmoidOp:
    """out = sigmoid(x); dx = dout * out * (1 - out) (autograd's ``sigmoid_backward``)."""

    def __init__(self, x, exact: bool, new: Buffers):
        self.x, self.out, self.dx = x, new(*x.shape), new(*x.shape)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.x, out=self.out)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.sigmoid_backward.grad_input(dout, self.out, grad_input=self.dx)


class ReLUOp:
    """out = max(x, 0); dx = dout where out > 0 (autograd's ``threshold_backward``)."""

    def __init__(self, x, exact: bool, new: Buffers):
        self.x, self.out, self.dx = x, new(*x.shape), new(*x.shape)

    def forward(self) -> torch.Tensor:
        return torch.clamp_min(self.x, 0.0, out=self.out)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.threshold_backward.grad_input(dout, self.out, 0, grad_input=self.dx)


class IdentityOp:
    """The 'linear' nonlinearity: no op either way."""

    def __init__(self, x, exact: bool, new: Buffers):
        self.out = x

    def forward(self) -> torch.Tensor:
        return self.out

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return dout


class AutogradOp:
    """Any layer without a hand-written op (e.g. ``GELU``), through autograd.

    Forward: ``torch.func.functional_call`` of the layer on the views of the flat
    parameter buffer, recorded by autograd; backward: ``torch.autograd.grad`` of that
    graph, written into the gradient views. Layers with buffers (running statistics)
    need a hand-written op. Slower than a hand-written op (a graph per step), exact as
    autograd is.
    """

    def __init__(self, x, p: dict, g: dict, mod: nn.Module, new: Buffers):
        if any(True for _ in mod.buffers()):
            raise ValueError(f"{type(mod).__name__} has buffers: it needs a hand-written op")
        self.x, self.p, self.g, self.mod = x, p, g, mod
        self.dx = new(*x.shape)
        self._graph: tuple | None = None
        with torch.no_grad():  # the output's shape, from a forward on the input buffer
            self.out = new(*functional_call(mod, dict(p), (x,)).shape)

    def forward(self) -> torch.Tensor:
        with torch.enable_grad():
            x = self.x.detach().requires_grad_()
            params = {n: t.detach().requires_grad_() for n, t in self.p.items()}
            out = functional_call(self.mod, params, (x,))
        self._graph = (out, x, params)
        return self.out.copy_(out.detach())

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        out, x, params = self._graph
        names = list(params)
        grads = torch.autograd.grad(out, [x, *params.values()], dout)
        for n, gr in zip(names, grads[1:], strict=True):
            self.g[n].copy_(gr)
        self._graph = None
        return self.dx.copy_(grads[0])


# layer type -> its op (constructor arguments: x, exact, new); others: AutogradOp
NONLINEARITY_OPS = {Tanh: TanhOp, Sigmoid: SigmoidOp, ReLU: ReLUOp, Identity: IdentityOp}
OPS = {Linear: LinearOp, BatchNorm1d: BatchNormOp, **NONLINEARITY_OPS}
