"""What the one-layer and the deep training steps share: flat-buffer views, the loss
head (log-softmax and the mean negative log-likelihood, forward and backward) and the
learning-rate scaling of the gradients.

``charlm.engine._Step`` (the one-layer MLP, bitwise the lecture) and
``charlm.deep_step.DeepStep`` (any depth) derive from ``StepBase``; they set the
attributes listed in its docstring in their ``__init__``.
"""

from __future__ import annotations

import math

import torch


class StepBase:
    """Shared ops of a training step for S models.

    Subclasses set: ``shapes`` (name -> (S, ...) shape of each parameter in the flat
    buffers ``P`` and ``G``), ``logits`` (S, B, V') float32, ``lp`` (its log-softmax),
    ``table`` ((V', V') identity times -1/B), ``onehot`` (S*B, V') with its (S, B, V')
    view ``onehot3``, ``dlogits`` (S, B, V'), ``dtype``, ``neg_lr`` (a 0-dim tensor) and
    ``lr`` (float). V' is the vocabulary size, padded or not.
    """

    shapes: dict[str, tuple[int, ...]]
    G: torch.Tensor
    logits: torch.Tensor
    lp: torch.Tensor
    table: torch.Tensor
    onehot: torch.Tensor
    onehot3: torch.Tensor
    dlogits: torch.Tensor
    dtype: torch.dtype
    neg_lr: torch.Tensor
    lr: float

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat buffer ``flat`` (P or G), name -> tensor of ``shapes``."""
        out, i = {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            out[name] = flat[i : i + n].view(shape)
            i += n
        return out

    def loss_head(self, tgt: torch.Tensor, tgt_flat: torch.Tensor, nll: torch.Tensor) -> None:
        """Log-softmax of ``logits`` and its gradient for the mean NLL, into ``dlogits``.

        Forward: ``lp = log_softmax(logits)``, ``nll`` (S, B, 1) <- lp at the targets
        ``tgt`` (S, B, 1). Backward: autograd's own kernels for ``nll_loss`` (mean over
        B: -1/B at the target) and ``_log_softmax_backward_data``, so the gradient is
        bitwise what ``F.cross_entropy(...).backward()`` gives; ``tgt_flat`` is ``tgt``
        as (S*B,).
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
