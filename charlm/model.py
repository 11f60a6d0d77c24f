"""The character-level MLP of Bengio et al. (2003) as taught in makemore, part 3.

One ``MLP`` for every variant: an embedding table C and a list of layers
(``charlm.layers``), ``layers`` hidden blocks Linear -> [BatchNorm1d] -> nonlinearity
and an output Linear -> [BatchNorm1d]. The lecture's first network is depth 1 of it,
its "PyTorch-ified" one depth 5. It holds S independent models (one per seed) with a
leading seed dimension; S = 1 is a single model. Every model honours one contract::

    logits, loss = model(idx, targets)   # idx (S, B, T) int64 -> logits (S, B, V)

with ``loss`` the mean cross-entropy per model, shape (S,), in nats. Parameters are
created empty; an init recipe (``charlm.init``) fills them.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import ModelConfig, VariantConfig
from charlm.layers import NONLINEARITIES, BatchNorm1d, BatchNormForm, Linear


class MLP(nn.Module):
    """S stacked copies of C (V, E) and the layer list.

    Parameter names follow the layer's index in ``layers`` (``layers.0.weight``,
    ``layers.1.gamma``, ...), the lecture's numbering of its deep network: with
    BatchNorm its hidden nonlinearities are layers 2, 5, 8, ...
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_embd: int,
        n_hidden: int,
        layers: int = 1,
        nonlinearity: str = "tanh",
        batchnorm: bool = False,
        batchnorm_output: bool = False,
        batchnorm_form: BatchNormForm = "var",
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
                mods.append(BatchNorm1d(S, fan_out, batchnorm_form, momentum, eps))
            if not last:
                mods.append(NONLINEARITIES[nonlinearity]())
        self.layers = nn.ModuleList(mods)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.hidden_indices)

    @property
    def hidden_indices(self) -> list[int]:
        """Indices in ``layers`` of the hidden nonlinearities (the lecture's 2, 5, ...
        with BatchNorm; 1, 3, ... without). Hidden layer l (1..L) is entry l - 1."""
        kinds = tuple(NONLINEARITIES.values())
        return [i for i, m in enumerate(self.layers) if isinstance(m, kinds)]

    @property
    def batchnorm_modules(self) -> dict[str, BatchNorm1d]:
        """The BatchNorm modules by ``named_modules()`` name (``layers.i``)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, BatchNorm1d)}

    @property
    def weight_names(self) -> list[str]:
        """C and every Linear weight: the matrices of the update:data ratio."""
        linear = [f"layers.{i}.weight" for i, m in enumerate(self.layers) if isinstance(m, Linear)]
        return ["C", *linear]

    def weight_label(self, name: str) -> str:
        """The lecture's short name of a weight matrix: C, then W1, W2, ... in layer
        order (the one-layer network's W1 and W2)."""
        names = self.weight_names
        return "C" if name == "C" else f"W{names.index(name)}"

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
        """idx (S, B, T) int64, targets (S, B) int64 or None.

        Returns logits (S, B, V) float32 and the mean cross-entropy per model (S,)
        in nats, or None without targets.
        """
        logits = self.trace(idx)[-1]
        loss = None if targets is None else cross_entropy_per_model(logits, targets)
        return logits, loss


def cross_entropy_per_model(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over B for each model: (S, B, V), (S, B) -> (S,) in nats."""
    S, B, V = logits.shape
    nll = F.cross_entropy(logits.reshape(S * B, V), targets.reshape(S * B), reduction="none")
    return nll.view(S, B).mean(1)


def new_model(
    model_cfg: ModelConfig, variant: VariantConfig, vocab_size: int, block_size: int, n_models: int
) -> MLP:
    """Empty models shaped by the variant's architecture keys (used to rebuild saved
    models with ``load_state_dict``; ``charlm.init.build_mlp`` also initialises)."""
    return MLP(
        vocab_size,
        block_size,
        model_cfg.n_embd,
        variant.hidden_size(model_cfg),
        layers=variant.layers,
        nonlinearity=variant.nonlinearity,
        batchnorm=variant.batchnorm,
        batchnorm_output=variant.batchnorm_output,
        batchnorm_form=variant.batchnorm_form,
        momentum=variant.momentum,
        eps=variant.eps_value,
        n_models=n_models,
    )
