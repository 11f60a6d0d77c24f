"""Layers of the MLP (makemore part 3), each holding S stacked models.

Every layer maps (S, B, fan_in) -> (S, B, fan_out) with a leading seed dimension, so a
batch of seeds runs as batched matrix products. ``charlm.model.MLP`` lists them in the
lecture's order: per hidden block Linear -> [BatchNorm1d] -> nonlinearity, then an
output Linear -> [BatchNorm1d]. A new nonlinearity is one class here plus one entry of
``NONLINEARITIES``; the training step (``charlm.ops``) runs it through autograd until it
is given a hand-written op.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """x @ weight (+ bias): weight (S, fan_in, fan_out), bias (S, fan_out) or None.

    The lecture's ``Linear`` (no transpose, unlike ``torch.nn.Linear``): the matrix
    product, then the bias added, as two roundings. Parameters are created empty and
    filled by an init recipe (``charlm.init``).
    """

    def __init__(self, n_models: int, fan_in: int, fan_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_models, fan_in, fan_out))
        self.bias = nn.Parameter(torch.zeros(n_models, fan_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(x, self.weight)  # (S, B, fan_out)
        return out if self.bias is None else out + self.bias.unsqueeze(1)


BatchNormForm = Literal["var", "std"]


class BatchNorm1d(nn.Module):
    """Batch normalisation (Ioffe & Szegedy 2015) over B, in one of the lecture's forms.

    Both forms use the per-unit batch mean and the *unbiased* (n - 1) batch statistic,
    keep parameters ``gamma`` (1) and ``beta`` (0) apart from the running buffers, and
    follow PyTorch's momentum convention ``running = (1 - momentum) * running +
    momentum * batch``:

    - ``form='var'`` (makemore part 3's second half, "PyTorch-ifying"):
      ``gamma * ((x - mean) / sqrt(var + eps)) + beta``; buffers ``running_mean`` (0)
      and ``running_var`` (1). This is ``torch.nn.BatchNorm1d`` except that torch
      normalises by the biased variance; the lecture uses ``x.var(0)``, unbiased.
    - ``form='std'`` (its first half): ``gamma * (x - mean) / std + beta`` with the
      unbiased std and no eps; buffers ``running_mean`` (0) and ``running_std`` (1).
      The lecture's 0.999 / 0.001 update is ``momentum=0.001``.

    Parameters and buffers are float32 (S, dim). Training mode needs B >= 2.
    """

    def __init__(
        self,
        n_models: int,
        dim: int,
        form: BatchNormForm = "var",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        if form not in ("var", "std"):
            raise ValueError(f"BatchNorm1d form must be 'var' or 'std', got {form!r}")
        self.form, self.momentum, self.eps = form, momentum, eps
        self.gamma = nn.Parameter(torch.ones(n_models, dim))
        self.beta = nn.Parameter(torch.zeros(n_models, dim))
        self.register_buffer("running_mean", torch.zeros(n_models, dim))
        self.register_buffer(f"running_{form}", torch.ones(n_models, dim))

    @property
    def running_stat(self) -> torch.Tensor:
        """The running variance ('var' form) or std ('std' form) buffer, (S, dim)."""
        return self.get_buffer(f"running_{self.form}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (S, B, dim) -> (S, B, dim)."""
        if self.training:
            mean = x.mean(1, keepdim=True)  # (S, 1, dim)
            stat = x.var(1, keepdim=True) if self.form == "var" else x.std(1, keepdim=True)
            with torch.no_grad():
                m, r = self.momentum, self.running_stat
                self.running_mean.copy_((1 - m) * self.running_mean + m * mean.squeeze(1))
                r.copy_((1 - m) * r + m * stat.squeeze(1))
        else:
            mean, stat = self.running_mean.unsqueeze(1), self.running_stat.unsqueeze(1)
        gamma, beta = self.gamma.unsqueeze(1), self.beta.unsqueeze(1)
        if self.form == "std":  # the lecture's expression and rounding order
            return gamma * (x - mean) / stat + beta
        return gamma * ((x - mean) / torch.sqrt(stat + self.eps)) + beta


class Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class ReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class Identity(nn.Module):
    """The 'linear' nonlinearity: out = x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Sigmoid(nn.Module):
    """1 / (1 + exp(-x)): Glorot & Bengio (2010)'s failing case at depth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


class GELU(nn.Module):
    """x * Phi(x), the exact (erf) form of Hendrycks & Gimpel (2016), as
    ``torch.nn.functional.gelu``'s default. It has no hand-written op: the training
    step runs it through autograd (``charlm.ops.AutogradOp``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


# name in params.yaml (variants.<v>.nonlinearity) -> layer class
NONLINEARITIES: dict[str, type[nn.Module]] = {
    "tanh": Tanh,
    "relu": ReLU,
    "linear": Identity,
    "sigmoid": Sigmoid,
    "gelu": GELU,
}
