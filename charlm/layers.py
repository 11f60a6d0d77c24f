"""Layers of the deep MLP (makemore part 3, "PyTorch-ifying"), for S stacked models.

Each layer holds S independent copies with a leading seed dimension and maps
(S, B, fan_in) -> (S, B, fan_out). ``DeepMLP`` composes them per variant, in the
lecture's order: ``layers`` hidden blocks Linear -> [BatchNorm1d] -> nonlinearity, then
an output Linear -> [BatchNorm1d]. Parameter names follow the layer's index in that
list (``layers.0.weight``, ``layers.1.gamma``, ...), which is the lecture's numbering:
with BatchNorm its tanh layers are 2, 5, 8, 11, 14.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import ModelConfig, VariantConfig


class Linear(nn.Module):
    """x @ weight (+ bias): weight (S, fan_in, fan_out), bias (S, fan_out) or None.

    The lecture's ``Linear`` (no transpose, unlike ``torch.nn.Linear``); filled by
    ``draw_deep_parameters``.
    """

    def __init__(self, n_models: int, fan_in: int, fan_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_models, fan_in, fan_out))
        self.bias = nn.Parameter(torch.zeros(n_models, fan_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(x, self.weight)  # (S, B, fan_out)
        return out if self.bias is None else out + self.bias.unsqueeze(1)


class BatchNorm1d(nn.Module):
    """Batch normalisation (Ioffe & Szegedy 2015) in the lecture's deep form.

    Training mode: per-unit batch mean and *unbiased* (n - 1) batch variance,
    ``xhat = (x - mean) / sqrt(var + eps)``, ``out = gamma * xhat + beta``; then
    ``running = (1 - momentum) * running + momentum * batch`` for the mean and the
    variance (PyTorch's momentum convention, default 0.1; eps 1e-5). Eval mode uses
    ``running_mean`` and ``running_var``. This is ``torch.nn.BatchNorm1d`` except that
    torch normalises by the biased variance (it keeps the unbiased one only in
    ``running_var``); the lecture uses ``x.var(0)``, unbiased, for both.

    Not the one-layer ``charlm.model.BatchNorm1d`` (running std, no eps).
    Parameters ``gamma`` (1) and ``beta`` (0), buffers ``running_mean`` (0) and
    ``running_var`` (1): float32 (S, dim).
    """

    def __init__(self, n_models: int, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(n_models, dim))
        self.beta = nn.Parameter(torch.zeros(n_models, dim))
        self.register_buffer("running_mean", torch.zeros(n_models, dim))
        self.register_buffer("running_var", torch.ones(n_models, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (S, B, dim) -> (S, B, dim); training mode needs B >= 2."""
        if self.training:
            mean = x.mean(1, keepdim=True)  # (S, 1, dim)
            var = x.var(1, keepdim=True)  # (S, 1, dim), unbiased
            with torch.no_grad():
                m = self.momentum
                self.running_mean.copy_((1 - m) * self.running_mean + m * mean.squeeze(1))
                self.running_var.copy_((1 - m) * self.running_var + m * var.squeeze(1))
        else:
            mean, var = self.running_mean.unsqueeze(1), self.running_var.unsqueeze(1)
        xhat = (x - mean) / torch.sqrt(var + self.eps)
        return self.gamma.unsqueeze(1) * xhat + self.beta.unsqueeze(1)


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


NONLINEARITY = {"tanh": Tanh, "relu": ReLU, "linear": Identity}


class DeepMLP(nn.Module):
    """S stacked copies of C (V, E) and the layer list of a deep variant.

    Contract as ``charlm.model.MLP``: ``logits, loss = model(idx, targets)`` with idx
    (S, B, T) int64, logits (S, B, V) float32, loss (S,) in nats or None. Parameters
    are created empty (Linear biases zero, BatchNorm at 1 / 0); ``build_mlp`` fills them.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_embd: int,
        layers: int,
        n_hidden: int,
        nonlinearity: str = "tanh",
        batchnorm: bool = False,
        batchnorm_output: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
        n_models: int = 1,
    ):
        super().__init__()
        S, V, T, E, H = n_models, vocab_size, block_size, n_embd, n_hidden
        self.vocab_size, self.block_size, self.n_models = V, T, S
        self.nonlinearity = nonlinearity
        self.C = nn.Parameter(torch.empty(S, V, E))
        mods: list[nn.Module] = []
        sizes = [T * E] + [H] * layers + [V]
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            last = i == layers
            norm = batchnorm_output if last else batchnorm
            mods.append(Linear(S, fan_in, fan_out, bias=not norm))
            if norm:
                mods.append(BatchNorm1d(S, fan_out, momentum, eps))
            if not last:
                mods.append(NONLINEARITY[nonlinearity]())
        self.layers = nn.ModuleList(mods)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, BatchNorm1d) for m in self.layers)

    @property
    def hidden_indices(self) -> list[int]:
        """Indices in ``layers`` of the hidden nonlinearities (the lecture's 2, 5, ...)."""
        kinds = tuple(NONLINEARITY.values())
        return [i for i, m in enumerate(self.layers) if isinstance(m, kinds)]

    @property
    def weight_names(self) -> list[str]:
        """C and every Linear weight: the matrices of the update:data ratio."""
        linear = [f"layers.{i}.weight" for i, m in enumerate(self.layers) if isinstance(m, Linear)]
        return ["C", *linear]

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Concatenated embeddings: idx (S, B, T) int64 -> embcat (S, B, T*E)."""
        S, B, _ = idx.shape
        flat = idx + self.vocab_size * torch.arange(S, device=idx.device).view(S, 1, 1)
        emb = self.C.reshape(S * self.vocab_size, -1)[flat]  # (S, B, T, E)
        return emb.reshape(S, B, -1)  # (S, B, T*E)

    def trace(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output, in order (the lecture's ``layer.out``); last: logits."""
        x, outs = self.embed(idx), []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (S, B, T) int64, targets (S, B) int64 or None -> logits (S, B, V), loss (S,)."""
        logits = self.trace(idx)[-1]
        loss = None
        if targets is not None:
            S, B, V = logits.shape
            nll = F.cross_entropy(
                logits.reshape(S * B, V), targets.reshape(S * B), reduction="none"
            )
            loss = nll.view(S, B).mean(1)
        return logits, loss


def new_deep_mlp(
    model_cfg: ModelConfig, variant: VariantConfig, vocab_size: int, block_size: int, n_models: int
) -> DeepMLP:
    """An empty ``DeepMLP`` shaped by the variant (``variant.is_deep``)."""
    return DeepMLP(
        vocab_size,
        block_size,
        model_cfg.n_embd,
        variant.layers,
        variant.hidden_size(model_cfg),
        variant.nonlinearity,
        variant.batchnorm,
        variant.batchnorm_output,
        variant.momentum_value,
        variant.eps_value,
        n_models,
    )


def draw_deep_parameters(
    model: DeepMLP, variant: VariantConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One model's initial parameters, drawn from ``generator`` in the lecture's order.

    C = randn(V, E); then each Linear in layer order:
    ``weight = randn(fan_in, fan_out) / fan_in**0.5`` (biases zero, BatchNorm gamma 1 and
    beta 0: nothing else is drawn). Then, as the lecture's ``torch.no_grad`` block: the
    last layer is made less confident, ``gamma *= last_scale`` when it is a BatchNorm,
    else ``weight *= last_scale``; then ``weight *= gain`` for every Linear before the
    last layer (so with a normalised output all Linear weights get the gain). Each
    multiplication rounds to float32 separately, in this order.
    Returns name -> float32 CPU tensor without the seed dimension, named as
    ``model.named_parameters()``.
    """
    g = generator
    p = {"C": torch.randn(model.C.shape[1:], generator=g)}
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Linear):
            fan_in, fan_out = layer.weight.shape[1:]
            p[f"layers.{i}.weight"] = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5
            if layer.bias is not None:
                p[f"layers.{i}.bias"] = torch.zeros(fan_out)
        elif isinstance(layer, BatchNorm1d):
            p[f"layers.{i}.gamma"] = torch.ones(layer.gamma.shape[1])
            p[f"layers.{i}.beta"] = torch.zeros(layer.beta.shape[1])
    last = len(model.layers) - 1
    key = "gamma" if isinstance(model.layers[last], BatchNorm1d) else "weight"
    p[f"layers.{last}.{key}"] *= variant.last_scale
    gain = variant.gain_value
    for i, layer in enumerate(model.layers[:last]):
        if isinstance(layer, Linear):
            p[f"layers.{i}.weight"] *= gain
    return p
