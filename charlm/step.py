"""One training step of S models of one ``charlm.model.MLP``, backward by hand.

``TrainStep`` walks the model's layer list once and builds one op per layer
(``charlm.ops.OPS``, or ``AutogradOp`` for a layer without a hand-written op), each
reading the previous op's output buffer. A step is then: the embedding gather, every
op's forward, log-softmax and the mean NLL's gradient (autograd's own kernels), every
op's backward in reverse, and an ``index_add_`` into C's gradient. Depth, width,
nonlinearity and BatchNorm placement are all the same code.

Parameters live in one flat buffer ``P`` and their gradients in ``G`` (the update is
two ops), padded where MKL's small-edge kernels are slow (docs/engine.md): the first
Linear's weight is stored (S, Kp, H) with its bias as row T*E (the embedding's column
T*E is 1), and a biased output Linear (S, H, Vp) with -inf bias columns. Padded GEMMs
are bitwise the unpadded ones; ``unpadded(P)`` gives the model's tensors by name.
"""

from __future__ import annotations

import math

import torch

from charlm.layers import BatchNorm1d, Linear
from charlm.model import MLP
from charlm.ops import NONLINEARITY_OPS, AutogradOp, BatchNormOp, Buffers, LinearOp

PAD = 16  # free GEMM dimensions are padded to a multiple of this (one AVX-512 vector)


def round_up(n: int, m: int = PAD) -> int:
    return -(-n // m) * m


class TrainStep:
    """Buffers and ops of one training step for models ``seeds`` of ``model``.

    Args:
        model: the models; read by ``load``, written by ``store`` only.
        B: batch size. seeds: the slice of the S models this step trains.
        kernels: 'exact' (bitwise the lecture's loop) or 'fast' (``charlm.ops``).

    Attributes: ``P``, ``G`` flat float32 buffers; ``weight_names`` (C and every Linear
    weight, the update:data ratio's matrices); ``hidden`` (layer indices of the hidden
    nonlinearities, whose outputs ``capture`` copies).
    """

    def __init__(self, model: MLP, B: int, seeds: slice | None = None, kernels: str = "exact"):
        if kernels not in ("exact", "fast"):
            raise ValueError(f"kernels must be 'exact' or 'fast', got {kernels!r}")
        self.seeds = seeds = seeds or slice(0, model.n_models)
        S = seeds.stop - seeds.start
        V, T, E = model.vocab_size, model.block_size, model.C.shape[2]
        self.S, self.B, self.V, self.TE = S, B, V, T * E
        dev, dt = model.C.device, model.C.dtype
        self.dtype = dt
        new = Buffers(dev, dt)
        mods = list(model.layers)
        self.fold = mods[0].bias is not None  # b of the first Linear as W's row T*E
        Kp = round_up(self.TE + self.fold)
        last = len(mods) - 1
        self.out_index = (
            last if isinstance(mods[last], Linear) and mods[last].bias is not None else None
        )
        Vp = round_up(V) if self.out_index is not None else V
        self.names = [n for n, _ in model.named_parameters()]
        shapes = {}
        for name, p in model.named_parameters():
            shape = (S, *p.shape[1:])
            if name == "layers.0.bias" and self.fold:
                continue
            if name == "layers.0.weight":
                shape = (S, Kp, shape[2])
            elif self.out_index is not None and name.startswith(f"layers.{last}."):
                shape = (*shape[:-1], Vp)
            shapes[name] = shape
        self.shapes = shapes
        self.P = torch.zeros(sum(math.prod(s) for s in shapes.values()), device=dev, dtype=dt)
        self.G = torch.zeros_like(self.P)
        ps, gs = self.views(self.P), self.views(self.G)  # stored (padded)
        pv, gv = self.unpadded(self.P), self.unpadded(self.G)  # the model's shapes
        self.weight_names = model.weight_names
        self.hidden = model.hidden_indices
        self.Cflat, self.gCflat = pv["C"].view(S * V, E), gv["C"].view(S * V, E)
        self.emb = new(S * B * T, E)  # index_select writes rows of E, ordered (s, b, t)
        self.emb_TE = self.emb.view(S, B, self.TE)
        self.embcat = torch.zeros(S, B, Kp, device=dev, dtype=dt)  # pads stay 0
        if self.fold:
            self.embcat[:, :, self.TE] = 1.0  # multiplies b
        self.embcat_TE = self.embcat[:, :, : self.TE]
        self.demb_rows = new(S, B, self.TE)
        self.demb_src = self.demb_rows.view(S * B * T, E)
        exact = kernels == "exact"
        self.bn_names, self.running, self.ops = [], [], []
        x = self.embcat
        for i, mod in enumerate(mods):
            n = f"layers.{i}."
            local = {k: pv[n + k] for k, _ in mod.named_parameters()}
            glocal = {k: gv[n + k] for k, _ in mod.named_parameters()}
            if isinstance(mod, Linear):
                b = ps.get(n + "bias")
                K, N = mod.weight.shape[1:]
                fold = i == 0 and self.fold
                op = LinearOp(
                    x, ps[n + "weight"], gs[n + "weight"], b, glocal.get("bias"), K, N, fold, new
                )
            elif isinstance(mod, BatchNorm1d):
                running = new(2, S, mod.gamma.shape[1])
                self.bn_names.append(n)
                self.running.append(running)
                op = BatchNormOp(x, local, glocal, running, mod, exact, new)
            elif type(mod) in NONLINEARITY_OPS:
                op = NONLINEARITY_OPS[type(mod)](x, exact, new)
            else:
                op = AutogradOp(x, local, glocal, mod, new)
            self.ops.append(op)
            x = op.out
        self.logits = x  # (S, B, Vp)
        Vx = x.shape[2]
        self.lp = new(S, B, Vx)
        self.onehot = new(S * B, Vx)  # -1/B at the target, else 0
        self.onehot3 = self.onehot.view(S, B, Vx)
        self.table = torch.eye(Vx, device=dev, dtype=dt) * (-1.0 / B)
        self.dlogits = new(S, B, Vx)
        self.douts: list[torch.Tensor | None] = [None] * len(self.ops)  # grad at each output
        self.demb_view = self.ops[0].dx[:, :, : self.TE]
        self.neg_lr = new.const(0.0)
        self.lr = 0.0

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat buffer ``flat`` (P or G) as stored (padded), by name."""
        out, i = {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            out[name] = flat[i : i + n].view(shape)
            i += n
        return out

    def unpadded(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (P or G) with the model's shapes, in ``named_parameters``
        order (some non-contiguous)."""
        v = self.views(flat)
        if self.fold:
            W = v["layers.0.weight"]
            v["layers.0.weight"], v["layers.0.bias"] = W[:, : self.TE], W[:, self.TE]
        else:
            v["layers.0.weight"] = v["layers.0.weight"][:, : self.TE]
        if self.out_index is not None:
            n = f"layers.{self.out_index}."
            v[n + "weight"], v[n + "bias"] = (
                v[n + "weight"][..., : self.V],
                v[n + "bias"][..., : self.V],
            )
        return {name: v[name] for name in self.names}

    @torch.no_grad()
    def load(self, model: MLP) -> None:
        """Copy the models' parameters and BatchNorm running buffers into the buffers."""
        self.P.zero_()
        if self.out_index is not None:  # padded logits are -inf: softmax 0
            self.views(self.P)[f"layers.{self.out_index}.bias"].fill_(-math.inf)
        sl = self.seeds
        for name, t in self.unpadded(self.P).items():
            t.copy_(model.get_parameter(name)[sl])
        for n, running in zip(self.bn_names, self.running, strict=True):
            bn = model.get_submodule(n[:-1])
            running[0].copy_(bn.running_mean[sl])
            running[1].copy_(bn.running_stat[sl])

    @torch.no_grad()
    def store(self, model: MLP) -> None:
        """Copy the buffers back into the models' parameters and running buffers."""
        sl = self.seeds
        for name, t in self.unpadded(self.P).items():
            model.get_parameter(name)[sl] = t
        for n, running in zip(self.bn_names, self.running, strict=True):
            bn = model.get_submodule(n[:-1])
            bn.running_mean[sl] = running[0]
            bn.running_stat[sl] = running[1]

    def step(
        self, flat: torch.Tensor, tgt: torch.Tensor, tgt_flat: torch.Tensor, nll: torch.Tensor
    ) -> None:
        """Forward and backward for one minibatch; gradients into ``G``.

        Args:
            flat: int64 (S*B*T,), indices into C viewed as (S*V, E).
            tgt: int64 (S, B, 1) targets; tgt_flat: the same as (S*B,).
            nll: float32 (S, B, 1), receives log-probabilities of the targets.
        """
        torch.index_select(self.Cflat, 0, flat, out=self.emb)
        self.embcat_TE.copy_(self.emb_TE)
        for op in self.ops:
            op.forward()
        self.loss_head(tgt, tgt_flat, nll)
        d = self.dlogits
        for j in range(len(self.ops) - 1, -1, -1):
            self.douts[j] = d
            d = self.ops[j].backward(d)
        self.demb_rows.copy_(self.demb_view if d is self.ops[0].dx else d[:, :, : self.TE])
        self.gCflat.zero_()
        self.gCflat.index_add_(0, flat, self.demb_src)

    def loss_head(self, tgt: torch.Tensor, tgt_flat: torch.Tensor, nll: torch.Tensor) -> None:
        """Log-softmax of ``logits`` and its gradient for the mean NLL, into ``dlogits``.

        Forward: ``lp = log_softmax(logits)``, ``nll`` (S, B, 1) <- lp at the targets.
        Backward: autograd's own kernels for ``nll_loss`` (mean over B: -1/B at the
        target) and ``_log_softmax_backward_data``, so the gradient is bitwise what
        ``F.cross_entropy(...).backward()`` gives.
        """
        torch.ops.aten._log_softmax.out(self.logits, 2, False, out=self.lp)
        torch.gather(self.lp, 2, tgt, out=nll)
        torch.index_select(self.table, 0, tgt_flat, out=self.onehot)
        torch.ops.aten._log_softmax_backward_data.out(
            self.onehot3, self.lp, 2, self.dtype, out=self.dlogits
        )

    def scale_grads_(self, lr: float) -> None:
        """G = (-lr) * G, the first rounding of the lecture's ``p.data += -lr * p.grad``."""
        if lr != self.lr:
            self.lr = lr
            self.neg_lr.fill_(-lr)  # float32(-lr), as the op would cast it
        self.G.mul_(self.neg_lr)

    def capture(self) -> dict[str, dict]:
        """Copies, after ``step``, of what the lecture's histograms show: 'out' and
        'out_grad' (hidden layer index -> (S, B, H)), 'grad' (name -> (S, ...))."""
        return {
            "out": {i: self.ops[i].out.clone() for i in self.hidden},
            "out_grad": {i: self.douts[i].clone() for i in self.hidden},
            "grad": {n: t.clone() for n, t in self.unpadded(self.G).items()},
        }
