"""Init recipes: named functions that draw one model's initial parameters.

A recipe takes an empty ``charlm.model.MLP``, the variant and one seed's
``torch.Generator`` and returns that model's parameters, name -> float32 CPU tensor
without the seed dimension (named as ``model.named_parameters()``). Each states its
draw order and rounding order, because changing either changes every number. A recipe
never looks at the depth: depth 1 and depth 64 are drawn by the same rules. Register a
new recipe in ``RECIPES`` (its name is ``variants.<v>.init`` in params.yaml).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from charlm.config import ModelConfig, VariantConfig
from charlm.layers import BatchNorm1d, Linear
from charlm.model import MLP, new_model


def kaiming_scale(gain: float, fan_in: int) -> float:
    """std of Kaiming (He) normal init: gain / sqrt(fan_in), one Python float.

    He et al. 2015, "Delving Deep into Rectifiers", eq. 10; the gain of a
    nonlinearity is ``torch.nn.init.calculate_gain`` (5/3 for tanh).
    """
    return gain / math.sqrt(fan_in)


def _linears(model: MLP) -> list[tuple[int, Linear]]:
    return [(i, m) for i, m in enumerate(model.layers) if isinstance(m, Linear)]


def _norms(model: MLP) -> dict[str, torch.Tensor]:
    out = {}
    for i, m in enumerate(model.layers):
        if isinstance(m, BatchNorm1d):
            out[f"layers.{i}.gamma"] = torch.ones(m.gamma.shape[1])
            out[f"layers.{i}.beta"] = torch.zeros(m.beta.shape[1])
    return out


def first_half(model: MLP, variant: VariantConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """makemore part 3, first half: every tensor drawn N(0, 1), then scaled.

    Order: C (V, E) unscaled; then per Linear in layer order its weight
    ``randn(fan_in, fan_out)`` and its bias ``randn(fan_out)`` (not drawn when a
    BatchNorm follows, which has the bias). Hidden weights are multiplied by
    ``weight_scale`` or, when that is null, by the Python float ``gain / sqrt(fan_in)``
    (one rounding; Kaiming, ``kaiming_scale``); hidden biases by ``bias_scale``; the
    output weight by ``out_weight_scale`` and its bias by ``out_bias_scale``.
    BatchNorm gamma 1, beta 0 (not drawn). At depth 1 this is the lecture's C, W1, b1,
    W2, b2 (DESIGN.md, "The recipe"): naive is all scales 1, Kaiming gain 5/3, b1 x
    0.01, W2 x 0.01, b2 x 0.
    """
    p = {"C": torch.randn(model.C.shape[1:], generator=g)}
    linears = _linears(model)
    out_index = linears[-1][0]
    for i, layer in linears:
        fan_in, fan_out = layer.weight.shape[1:]
        W = torch.randn((fan_in, fan_out), generator=g)
        if i == out_index:
            w_scale, b_scale = variant.out_weight_scale, variant.out_bias_scale
        else:
            w_scale = variant.weight_scale
            if w_scale is None:
                w_scale = kaiming_scale(variant.gain_value, fan_in)
            b_scale = variant.bias_scale
        p[f"layers.{i}.weight"] = W * w_scale
        if layer.bias is not None:
            p[f"layers.{i}.bias"] = torch.randn(fan_out, generator=g) * b_scale
    return {**p, **_norms(model)}


def second_half(model: MLP, variant: VariantConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """makemore part 3, second half ("PyTorch-ifying"): the lecture's Linear init.

    C = randn(V, E); then each Linear in layer order:
    ``weight = randn(fan_in, fan_out) / fan_in**0.5`` (biases zero, BatchNorm gamma 1
    and beta 0: nothing else is drawn). Then, as the lecture's ``torch.no_grad`` block:
    the last layer is made less confident, ``gamma *= last_scale`` when it is a
    BatchNorm, else ``weight *= last_scale``; then ``weight *= gain`` for every Linear
    before the last layer (with a normalised output, all Linear weights get the gain).
    Each multiplication rounds to float32 separately, in this order. At depth 1
    without BatchNorm: 6,097 parameters with 100 hidden units.
    """
    p = {"C": torch.randn(model.C.shape[1:], generator=g)}
    for i, layer in _linears(model):
        fan_in, fan_out = layer.weight.shape[1:]
        p[f"layers.{i}.weight"] = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5
        if layer.bias is not None:
            p[f"layers.{i}.bias"] = torch.zeros(fan_out)
    p.update(_norms(model))
    last = len(model.layers) - 1
    key = "gamma" if isinstance(model.layers[last], BatchNorm1d) else "weight"
    p[f"layers.{last}.{key}"] *= variant.last_scale
    gain = variant.gain_value
    for i, _ in _linears(model):
        if i < last:
            p[f"layers.{i}.weight"] *= gain
    return p


Recipe = Callable[[MLP, VariantConfig, torch.Generator], dict[str, torch.Tensor]]
RECIPES: dict[str, Recipe] = {"first_half": first_half, "second_half": second_half}


def build_mlp(
    model_cfg: ModelConfig,
    variant: VariantConfig,
    vocab_size: int,
    block_size: int,
    generators: list[torch.Generator],
) -> MLP:
    """Models of ``len(generators)`` seeds, model s initialised from ``generators[s]``
    by the variant's recipe (``RECIPES[variant.init]``).

    Each generator is used for model s alone, so a seed gives the same initial model
    whether it is trained alone or inside a batch of seeds (or of gains). The
    generators are left positioned after the initial draws, ready to draw the
    minibatch indices.
    """
    model = new_model(model_cfg, variant, vocab_size, block_size, len(generators))
    recipe = RECIPES[variant.init]
    draws = [recipe(model, variant, g) for g in generators]
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.stack([d[name] for d in draws]))
    return model
