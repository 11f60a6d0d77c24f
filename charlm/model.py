"""The character-level MLP of Bengio et al. (2003) as taught in makemore, part 3.

One ``MLP`` holds S independent models (one per seed) as stacked parameters with a
leading seed dimension, so a batch of seeds trains with batched matrix products; S = 1
is a single model. Every model honours one contract::

    logits, loss = model(idx, targets)   # idx (S, B, T) int64 -> logits (S, B, V)

with ``loss`` the mean cross-entropy per model, shape (S,), in nats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import ModelConfig, VariantConfig
from charlm.layers import DeepMLP, draw_deep_parameters, new_deep_mlp


class BatchNorm1d(nn.Module):
    """Batch normalisation of the hidden pre-activations (Ioffe & Szegedy, 2015).

    As in the makemore lecture (part 3), not as ``torch.nn.BatchNorm1d``: the batch
    statistics are the per-unit mean and the *unbiased* (Bessel-corrected, n - 1)
    standard deviation, there is no epsilon, and the running buffers hold a mean and a
    standard deviation (not a variance). Momentum uses PyTorch's convention::

        running = (1 - momentum) * running + momentum * batch

    so the lecture's 0.999 / 0.001 update is ``momentum = 0.001``.

    Parameters ``gain`` and ``bias`` and buffers ``running_mean`` and ``running_std``
    all have shape (S, H), float32; they start at 1, 0, 0 and 1.
    """

    def __init__(self, n_models: int, dim: int, momentum: float = 0.001):
        super().__init__()
        self.momentum = momentum
        self.gain = nn.Parameter(torch.ones(n_models, dim))
        self.bias = nn.Parameter(torch.zeros(n_models, dim))
        self.register_buffer("running_mean", torch.zeros(n_models, dim))
        self.register_buffer("running_std", torch.ones(n_models, dim))

    def forward(self, hpreact: torch.Tensor) -> torch.Tensor:
        """Normalise ``hpreact`` of shape (S, B, H) over B.

        In training mode it uses the batch statistics (B >= 2) and updates the running
        buffers; in eval mode it uses the running buffers.
        """
        if self.training:
            mean = hpreact.mean(1, keepdim=True)  # (S, 1, H)
            std = hpreact.std(1, keepdim=True)  # (S, 1, H), unbiased
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.squeeze(1))
                self.running_std.mul_(1 - m).add_(m * std.squeeze(1))
        else:
            mean = self.running_mean.unsqueeze(1)
            std = self.running_std.unsqueeze(1)
        return self.gain.unsqueeze(1) * (hpreact - mean) / std + self.bias.unsqueeze(1)


class MLP(nn.Module):
    """S stacked copies of: C (V, E); W1 (T*E, H); b1 (H); W2 (H, V); b2 (V).

    h = tanh(emb @ W1 + b1), logits = h @ W2 + b2 (makemore part 3). With
    ``batchnorm`` there is no b1 and ``bn`` normalises emb @ W1 instead.
    Parameters are created empty; ``init_mlp_`` fills them.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_embd: int,
        n_hidden: int,
        n_models: int = 1,
        batchnorm: bool = False,
        momentum: float = 0.001,
    ):
        super().__init__()
        S, V, T, E, H = n_models, vocab_size, block_size, n_embd, n_hidden
        self.vocab_size, self.block_size, self.n_models = V, T, S
        self.C = nn.Parameter(torch.empty(S, V, E))
        self.W1 = nn.Parameter(torch.empty(S, T * E, H))
        self.b1 = None if batchnorm else nn.Parameter(torch.empty(S, H))
        self.W2 = nn.Parameter(torch.empty(S, H, V))
        self.b2 = nn.Parameter(torch.empty(S, V))
        self.bn = BatchNorm1d(S, H, momentum) if batchnorm else None

    @property
    def fan_in(self) -> int:
        return self.W1.shape[1]

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Concatenated embeddings: idx (S, B, T) int64 -> embcat (S, B, T*E)."""
        S, B, _ = idx.shape
        flat = idx + self.vocab_size * torch.arange(S, device=idx.device).view(S, 1, 1)
        emb = self.C.reshape(S * self.vocab_size, -1)[flat]  # (S, B, T, E)
        return emb.reshape(S, B, -1)  # (S, B, T*E)

    def hidden(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations and activations of the hidden layer, each (S, B, H)."""
        hpreact = torch.bmm(self.embed(idx), self.W1)  # (S, B, H)
        if self.bn is not None:
            hpreact = self.bn(hpreact)
        else:
            hpreact = hpreact + self.b1.unsqueeze(1)
        return hpreact, torch.tanh(hpreact)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (S, B, T) int64, targets (S, B) int64 or None.

        Returns logits (S, B, V) float32 and the mean cross-entropy per model (S,)
        in nats, or None without targets.
        """
        _, h = self.hidden(idx)
        logits = torch.baddbmm(self.b2.unsqueeze(1), h, self.W2)  # (S, B, V)
        loss = None
        if targets is not None:
            loss = cross_entropy_per_model(logits, targets)
        return logits, loss


def cross_entropy_per_model(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over B for each model: (S, B, V), (S, B) -> (S,) in nats."""
    S, B, V = logits.shape
    nll = F.cross_entropy(logits.reshape(S * B, V), targets.reshape(S * B), reduction="none")
    return nll.view(S, B).mean(1)


def kaiming_scale(gain: float, fan_in: int) -> float:
    """std of Kaiming (He) normal init: gain / sqrt(fan_in).

    He et al. 2015, "Delving Deep into Rectifiers", eq. 10; the gain of a
    nonlinearity is ``torch.nn.init.calculate_gain`` (5/3 for tanh).
    """
    return gain / math.sqrt(fan_in)


def draw_initial_parameters(
    model_cfg: ModelConfig,
    variant: VariantConfig,
    vocab_size: int,
    block_size: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Draw one model's initial parameters from ``generator``, in the lecture's order.

    Order (DESIGN.md): C, W1, b1 (skipped with BatchNorm), W2, b2, each N(0, 1) of its
    own shape, then scaled by the variant. Changing the order changes every number.
    Returns float32 CPU tensors: C (V, E), W1 (T*E, H), b1 (H), W2 (H, V), b2 (V).
    """
    V, E, H = vocab_size, model_cfg.n_embd, variant.hidden_size(model_cfg)
    fan_in = block_size * E
    g = generator
    p = {"C": torch.randn((V, E), generator=g)}
    w1 = torch.randn((fan_in, H), generator=g)
    if variant.w1_init == "kaiming":
        p["W1"] = w1 * kaiming_scale(variant.gain_value, fan_in)
    else:
        p["W1"] = w1 * variant.w1_scale
    if not variant.batchnorm:
        p["b1"] = torch.randn(H, generator=g) * variant.b1_scale
    p["W2"] = torch.randn((H, V), generator=g) * variant.w2_scale
    p["b2"] = torch.randn(V, generator=g) * variant.b2_scale
    return p


def new_model(
    model_cfg: ModelConfig, variant: VariantConfig, vocab_size: int, block_size: int, n_models: int
) -> MLP | DeepMLP:
    """Empty models of the variant's form: ``DeepMLP`` when ``variant.is_deep``, else ``MLP``.

    Used to rebuild saved models (``load_state_dict``); ``build_mlp`` also initialises.
    """
    if variant.is_deep:
        return new_deep_mlp(model_cfg, variant, vocab_size, block_size, n_models)
    return MLP(
        vocab_size,
        block_size,
        model_cfg.n_embd,
        variant.hidden_size(model_cfg),
        n_models=n_models,
        batchnorm=variant.batchnorm,
        momentum=variant.momentum_value,
    )


def build_mlp(
    model_cfg: ModelConfig,
    variant: VariantConfig,
    vocab_size: int,
    block_size: int,
    generators: list[torch.Generator],
) -> MLP | DeepMLP:
    """Models of ``len(generators)`` seeds, model s initialised from ``generators[s]``.

    One-layer variants: ``draw_initial_parameters``; deep ones (``variant.is_deep``):
    ``charlm.layers.draw_deep_parameters``. Each generator is used for model s alone, so
    a seed gives the same initial model whether it is trained alone or inside a batch
    of seeds. The generators are left positioned after the initial draws, ready to draw
    the minibatch indices.
    """
    model = new_model(model_cfg, variant, vocab_size, block_size, len(generators))
    if isinstance(model, DeepMLP):
        draws = [draw_deep_parameters(model, variant, g) for g in generators]
    else:
        draws = [
            draw_initial_parameters(model_cfg, variant, vocab_size, block_size, g)
            for g in generators
        ]
    with torch.no_grad():
        for name in draws[0]:
            model.get_parameter(name).copy_(torch.stack([d[name] for d in draws]))
    return model
