"""The depth atlas at initialisation: batched models over gains and seeds, and what
signals and gradients do in each hidden layer on real minibatches (no training).

One architecture (depth, width, nonlinearity, BatchNorm) is one batch of
S = len(gains) * len(seeds) models, model (g, s) at index ``g * len(seeds) + s``,
each drawn by the variant's init recipe from ``torch.Generator().manual_seed(seed)``
with that gain, exactly as ``charlm.init.build_mlp`` draws it alone. Measurements run
in float64 (DESIGN.md, "Signal propagation": at depth 64 a linear net at gain 4 leaves
float32's range), so a statistic is non-finite only where float64 itself overflows.
Hidden layers are numbered 1..L, input side first; arrays are (L, S). No file I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from charlm.config import ModelConfig, VariantConfig
from charlm.diagnostics import saturated
from charlm.init import RECIPES
from charlm.layers import Linear
from charlm.model import MLP, cross_entropy_per_model, new_model

# Per hidden layer and model, in the order ``measure_init`` returns them.
LAYER_STATS = (
    "pre_std",  # std of the nonlinearity's input (after BatchNorm when there is one)
    "act_std",  # std of the layer's output x^l
    "saturated",  # share of |x| past the threshold (tanh, sigmoid) or of exact zeros (relu)
    "dead",  # relu: share of units that are 0 for every example of the batch
    "grad_std",  # std of d loss / d x^l (loss: each model's mean cross-entropy, nats)
    "wgrad_std",  # std of d loss / d W^l, the Linear feeding layer l
    "grad_data",  # std(d loss / d W^l) / std(W^l): makemore part 3's grad:data ratio
    "cosine",  # mean cosine similarity of x^l between distinct contexts of the batch
)


def batched_model(
    model_cfg: ModelConfig,
    variant: VariantConfig,
    gains: list[float],
    seeds: list[int],
    V: int,
    T: int,
) -> tuple[MLP, list[torch.Generator]]:
    """S = len(gains) * len(seeds) models of the variant's architecture.

    Model (g, s), at index ``g * len(seeds) + s``, is initialised by
    ``RECIPES[variant.init]`` with ``variant.model_copy(update={'gain': gains[g]})``
    from ``torch.Generator().manual_seed(seeds[s])``, and equals
    ``build_mlp(model_cfg, that variant, V, T, [that generator])`` bit for bit.

    Returns:
        The models (float32, CPU) and their S generators, left positioned after the
        initial draws as ``build_mlp`` leaves them (ready for ``engine.train``).
    """
    S = len(gains) * len(seeds)
    model = new_model(model_cfg, variant, V, T, S)
    recipe = RECIPES[variant.init]
    generators, draws = [], []
    for gain in gains:
        v = variant.model_copy(update={"gain": float(gain)})
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            draws.append(recipe(model, v, g))
            generators.append(g)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.stack([d[name] for d in draws]))
    return model, generators


def _feeding_linear(model: MLP, index: int) -> Linear:
    """The Linear that feeds the hidden nonlinearity at ``layers[index]``."""
    for i in range(index - 1, -1, -1):
        if isinstance(model.layers[i], Linear):
            return model.layers[i]
    raise ValueError(f"no Linear before layer {index}")


def _std(x: torch.Tensor) -> torch.Tensor:
    """std over all but the first dim, (S, ...) -> (S,); inf where x is non-finite
    (float64 overflowed: the spread is then unbounded, not NaN)."""
    S = x.shape[0]
    flat = x.reshape(S, -1)
    centred = flat - flat.mean(1, keepdim=True)  # two passes: 10x faster than torch.std
    out = torch.linalg.vector_norm(centred, dim=1) / (flat.shape[1] - 1) ** 0.5
    return out.nan_to_num(nan=torch.inf)  # NaN only from inf - inf: an overflow


def _cosine(x: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of the rows of x (S, B, H) over the pairs in ``distinct``
    (bool (B, B), i < j, different contexts); NaN for a model whose rows are all 0."""
    norm = x.norm(dim=2, keepdim=True)  # (S, B, 1)
    unit = x / norm
    gram = unit @ unit.transpose(1, 2)  # (S, B, B)
    vals = gram[:, distinct]  # (S, pairs)
    return torch.nanmean(vals, dim=1)


def measure_init(
    model: MLP,
    minibatches: list[tuple[torch.Tensor, torch.Tensor]],
    threshold: float = 0.97,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Signal propagation at init of every model, on real minibatches.

    Every minibatch (xb int64 (B, T), yb int64 (B,)) goes to all S models. A float64
    copy of the model runs one training-mode forward (BatchNorm uses the batch's
    statistics, as at step 0) and autograd's backward of each model's mean
    cross-entropy; ``model`` is not changed. Statistics are computed per minibatch and
    averaged over the minibatches.

    Args:
        model: S models of one architecture.
        minibatches: at least one (xb, yb); ``pipeline.atlas.draw_minibatches`` draws
            them from a split.
        threshold: |x| (tanh) or |2x - 1| (sigmoid) above it counts as saturated
            (``charlm.diagnostics.saturated``, makemore part 3's 0.97).
        progress: called with the number of minibatches done after each one.
    Returns:
        float64 numpy arrays: each name of ``LAYER_STATS`` (L, S) (NaN where it does
        not apply: 'saturated' for linear and gelu, 'dead' except for relu, 'cosine'
        for an all-zero layer), 'input_ms' (S,) the mean square of the first layer's
        input (the concatenated embedding: theory's q^1 = gain^2 * input_ms), 'loss'
        (S,) the initial loss in nats.
    Raises:
        ValueError: no minibatch.
    """
    if not minibatches:
        raise ValueError("measure_init needs at least one minibatch")
    m = copy.deepcopy(model).double().train(True)
    S, L, nl = m.n_models, m.depth, m.nonlinearity
    hidden = m.hidden_indices
    weights = [_feeding_linear(m, i).weight for i in hidden]
    with torch.no_grad():
        weight_std = [_std(W) for W in weights]
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in (*LAYER_STATS, "input_ms", "loss")}
    for xb, yb in minibatches:
        distinct = (xb[:, None, :] != xb[None, :, :]).any(2).triu(1)  # (B, B)
        for p in m.parameters():
            p.grad = None
        emb = m.embed(xb.expand(S, -1, -1))  # (S, B, T*E)
        outs, x = [], emb
        for layer in m.layers:
            x = layer(x)
            outs.append(x)
        for i in hidden:
            outs[i].retain_grad()
        loss = cross_entropy_per_model(outs[-1], yb.expand(S, -1))  # (S,)
        loss.sum().backward()  # models are independent: d(sum)/dp_s = dloss_s/dp_s
        with torch.no_grad():
            per = {k: [] for k in LAYER_STATS}
            for i, W, w_std in zip(hidden, weights, weight_std, strict=True):
                h, pre = outs[i], outs[i - 1]
                sat = saturated(h, nl, threshold)
                nan = torch.full((S,), torch.nan, dtype=torch.float64)
                per["pre_std"].append(_std(pre))
                per["act_std"].append(_std(h))
                per["saturated"].append(nan if sat is None else sat.double().mean((1, 2)))
                dead = (h == 0).all(1).double().mean(1) if nl == "relu" else nan
                per["dead"].append(dead)
                per["grad_std"].append(_std(h.grad))
                wg = _std(W.grad)
                per["wgrad_std"].append(wg)
                per["grad_data"].append(wg / w_std)
                per["cosine"].append(_cosine(h, distinct))
            for k, v in per.items():
                acc[k].append(torch.stack(v))  # (L, S)
            acc["input_ms"].append((emb * emb).mean((1, 2)))
            acc["loss"].append(loss.detach())
        if progress is not None:
            progress(len(acc["loss"]))
    out = {k: torch.stack(v).mean(0).numpy() for k, v in acc.items()}
    assert out["pre_std"].shape == (L, S)
    return out


def derived(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-model summaries of the layer profiles, each (S,) float64:

    - 'grad_ratio': grad_std at layer 1 / at layer L (> 1: gradients grow toward the
      input);
    - 'grad_growth': the geometric mean per-layer factor of the mean *squared*
      gradient, (grad_ratio)^(2 / (L - 1)) (theory's chi per layer); NaN at L = 1;
    - 'pre_decay': the geometric mean per-layer factor of pre_std,
      (pre_std^L / pre_std^1)^(1 / (L - 1)); NaN at L = 1.
    """
    g, p = stats["grad_std"], stats["pre_std"]
    L = g.shape[0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = g[0] / g[-1]
        steps = L - 1 if L > 1 else np.nan
        return {
            "grad_ratio": ratio,
            "grad_growth": ratio ** (2.0 / steps),
            "pre_decay": (p[-1] / p[0]) ** (1.0 / steps),
        }


def summarise(values: np.ndarray, axis: int = -1) -> dict[str, np.ndarray]:
    """Median and 10% / 90% quantiles over seeds (``axis``), NaNs ignored.

    Quantiles by the 'nearest' rule (an observed value, never an interpolation), so an
    inf among the seeds stays inf instead of turning into NaN (inf - inf), and with 10
    seeds the band is the 2nd smallest to the 2nd largest (median: the 5th or 6th).
    An all-NaN slice gives NaN. Safe in worker threads: it leaves the process-wide
    ``warnings`` filters alone (``warnings.catch_warnings`` swaps them for the whole
    process, so two cells summarising at once could leave one's copy installed);
    NumPy's floating-point error state is per thread.
    """
    v = np.asarray(values, dtype=np.float64)
    all_nan = np.isnan(v).all(axis=axis)
    # nanquantile warns on an all-NaN slice: give it zeros there, then put the NaN back
    v = np.where(np.expand_dims(all_nan, axis), 0.0, v)
    with np.errstate(all="ignore"):
        q = np.nanquantile(v, [0.5, 0.1, 0.9], axis=axis, method="nearest")
    q = np.where(all_nan, np.nan, q)
    return {"median": q[0], "q10": q[1], "q90": q[2]}
