"""The ``torch.func`` ensemble: what a PyTorch user would pick to train S seeds at once.

PyTorch's model-ensembling tutorial (``torch.func.stack_module_state``, then
``torch.func.vmap`` over ``torch.func.functional_call`` of one model) applied to the
lecture's networks: each seed is the lecture's model written as a plain single-model
``torch.nn.Module`` (``LectureNet`` for the one-layer variants, ``LectureDeepNet`` for
the deep ones), initialised from its own ``torch.Generator`` by the lecture's own code
(``reference.lecture.init_params`` / ``deep_layers``), so seed s starts from the
lecture's parameters for seed s. One training step for all S models is
``vmap(grad(loss))`` over the stacked parameters, buffers and per-seed minibatches,
then SGD on the stacked parameters (``p += (-lr) * grad``, the lecture's two roundings).

BatchNorm's running statistics: ``functional_call`` treats buffers as inputs, and an
in-place update inside ``vmap(grad(...))`` would write a batched, traced value into
them. So each BatchNorm returns its detached batch statistics next to the logits (the
``has_aux`` output of ``grad``) and the running buffers are updated outside, on the
stacked buffers, with the lecture's formula under ``no_grad``.

``func_check`` compares an ensemble with the lecture's loop run seed by seed.
``func_train_models`` trains given modules (the atlas row of ``make bench``: 32 deep
nets of any depth, ``LectureDeepNet`` of the lecture's layer objects holding tensors
copied out of the atlas's batched model).

Minibatch indices: seed s draws ``randint(0, N, (k * B,))`` from its generator for k
steps at a time (the same sequence as one draw per step, as in the engine).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from reference.lecture import (
    BatchNorm1d,
    Linear,
    deep_layers,
    init_params,
    lecture_deep_train,
    lecture_train,
)

CHUNK = 100  # steps of minibatch indices drawn at a time


class LectureNet(nn.Module):
    """The lecture's one-hidden-layer MLP, one model: idx (B, T) -> logits (B, V).

    Parameters as ``init_params(variant, g)`` (C, W1, [b1], W2, b2, [bngain, bnbias]);
    the BatchNorm variant normalises with the batch mean and unbiased std (no eps) and
    keeps buffers ``bnmean_running`` / ``bnstd_running`` (1, H), momentum 0.001.
    ``forward`` returns (logits, batch statistics): () or (mean (1, H), std (1, H)).
    """

    momentum = 0.001

    def __init__(self, variant: str, g: torch.Generator):
        super().__init__()
        p = init_params(variant, g)
        self.batchnorm = variant == "batchnorm"
        for name, t in p.items():
            setattr(self, name, nn.Parameter(t))
        if self.batchnorm:
            H = p["W1"].shape[1]
            self.register_buffer("bnmean_running", torch.zeros((1, H)))
            self.register_buffer("bnstd_running", torch.ones((1, H)))

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        embcat = self.C[idx].reshape(idx.shape[0], -1)
        stats: tuple[torch.Tensor, ...] = ()
        if self.batchnorm:
            hpreact = embcat @ self.W1
            mean, std = hpreact.mean(0, keepdim=True), hpreact.std(0, keepdim=True)
            hpreact = self.bngain * (hpreact - mean) / std + self.bnbias
            stats = (mean.detach(), std.detach())
        else:
            hpreact = embcat @ self.W1 + self.b1
        logits = torch.tanh(hpreact) @ self.W2 + self.b2
        return logits, stats

    def running_buffers(self) -> list[str]:
        """Buffer names in the order of ``forward``'s statistics."""
        return ["bnmean_running", "bnstd_running"] if self.batchnorm else []


class _BatchNorm(nn.Module):
    """The lecture's deep ``BatchNorm1d`` (unbiased var, eps 1e-5) as a module; returns
    (out, mean (dim,), var (dim,)) with the statistics detached."""

    def __init__(self, ref: BatchNorm1d):
        super().__init__()
        self.eps = ref.eps
        self.gamma, self.beta = nn.Parameter(ref.gamma), nn.Parameter(ref.beta)
        self.register_buffer("running_mean", ref.running_mean.clone())
        self.register_buffer("running_var", ref.running_var.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)
        out = self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta
        return out, mean.detach().squeeze(0), var.detach().squeeze(0)


class _Linear(nn.Module):
    def __init__(self, ref: Linear):
        super().__init__()
        self.weight = nn.Parameter(ref.weight)
        self.bias = None if ref.bias is None else nn.Parameter(ref.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


class LectureDeepNet(nn.Module):
    """A deep MLP of the lecture's layer objects, one model: idx (B, T) -> logits (B, V).

    ``C`` (V, E) and ``layers``, a list of the lecture's ``Linear``, ``BatchNorm1d`` and
    ``Tanh`` (``from_seed``: the lecture's own ``deep_layers``; the atlas bench: any
    depth), whose tensors become this module's parameters and buffers, named as
    ``charlm.model.MLP`` (``layers.i.weight``, ``layers.i.gamma``,
    ``layers.i.running_mean`` ...). ``forward`` returns (logits, (mean, var) of every
    BatchNorm in order), statistics (dim,) and detached.
    """

    momentum = 0.1

    @classmethod
    def from_seed(cls, batchnorm: bool, g: torch.Generator) -> LectureDeepNet:
        """The lecture's deep net: C (27, 10) then ``deep_layers(g, batchnorm)``, drawn
        from ``g`` in the lecture's order."""
        C = torch.randn((27, 10), generator=g)
        return cls(C, deep_layers(g, batchnorm))

    def __init__(self, C: torch.Tensor, layers: list):
        super().__init__()
        self.C = nn.Parameter(C)
        mods: list[nn.Module] = []
        for layer in layers:
            if isinstance(layer, Linear):
                mods.append(_Linear(layer))
            elif isinstance(layer, BatchNorm1d):
                mods.append(_BatchNorm(layer))
            else:
                mods.append(nn.Tanh())
        self.layers = nn.ModuleList(mods)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = self.C[idx].reshape(idx.shape[0], -1)
        stats: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, _BatchNorm):
                x, mean, var = layer(x)
                stats += [mean, var]
            else:
                x = layer(x)
        return x, tuple(stats)

    def running_buffers(self) -> list[str]:
        return [
            f"layers.{i}.{b}"
            for i, m in enumerate(self.layers)
            if isinstance(m, _BatchNorm)
            for b in ("running_mean", "running_var")
        ]


NETWORKS = ("naive", "kaiming", "batchnorm", "deep_bn", "deep_tanh")


def new_net(network: str, g: torch.Generator) -> LectureNet | LectureDeepNet:
    """One seed's model of ``network`` (one of ``NETWORKS``), drawn from ``g``."""
    if network.startswith("deep_"):
        return LectureDeepNet.from_seed(network == "deep_bn", g)
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; expected one of {NETWORKS}")
    return LectureNet(network, g)


def func_train(
    X: torch.Tensor,
    Y: torch.Tensor,
    network: str,
    seeds: list[int],
    max_steps: int,
    batch_size: int = 32,
    decay_step: int | None = None,
) -> dict:
    """Train one model per seed with the ``torch.func`` ensemble.

    Args:
        X, Y: int64 (N, T) contexts and (N,) targets of the training split.
        network: 'naive', 'kaiming', 'batchnorm', 'deep_bn' or 'deep_tanh'.
        seeds: one ``torch.Generator`` seed per model (initial draws, then minibatches).
        decay_step: lr 0.1 before it, 0.01 from it (default: the lecture's 100,000 for
            the one-layer networks, 150,000 for the deep ones).

    Returns:
        ``func_train_models``'s dict.
    """
    if decay_step is None:
        decay_step = 150_000 if network.startswith("deep_") else 100_000
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    models = [new_net(network, g) for g in gens]
    return func_train_models(X, Y, models, gens, max_steps, batch_size, decay_step)


def func_train_models(
    X: torch.Tensor,
    Y: torch.Tensor,
    models: list[LectureNet] | list[LectureDeepNet],
    gens: list[torch.Generator],
    max_steps: int,
    batch_size: int,
    decay_step: int,
) -> dict:
    """Train S single-model modules of one architecture as one ``torch.func`` ensemble.

    Args:
        X, Y: int64 (N, T) contexts and (N,) targets of the training split.
        models: S modules with the same parameter names and shapes (their tensors are
            copied by ``stack_module_state``; the modules are not changed).
        gens: model s draws its minibatch indices from ``gens[s]`` (advanced).
        decay_step: lr 0.1 for steps before it, 0.01 from it on.

    Returns:
        dict: 'loss' float32 (max_steps, S) in nats; 'seconds' (training loop only,
        wall time); 'params' and 'buffers': name -> stacked (S, ...) tensors.
    """
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")  # the tutorial's stateless skeleton
    names = models[0].running_buffers()
    momentum = models[0].momentum

    def loss_fn(p, b, xb, yb):
        logits, stats = functional_call(base, (p, b), (xb,))
        loss = F.cross_entropy(logits, yb)
        return loss, (loss.detach(), stats)

    step = vmap(grad(loss_fn, has_aux=True))  # over params, buffers, Xb, Yb (dim 0)
    plist = list(params.values())
    S, N = len(gens), X.shape[0]
    losses = torch.empty(max_steps, S)
    t0 = time.perf_counter()
    for start in range(0, max_steps, CHUNK):
        k = min(CHUNK, max_steps - start)
        ix = torch.stack([torch.randint(0, N, (k * batch_size,), generator=g) for g in gens])
        ix = ix.view(S, k, batch_size)
        for j in range(k):
            i = start + j
            Xb, Yb = X[ix[:, j]], Y[ix[:, j]]  # (S, B, T), (S, B)
            grads, (loss, stats) = step(params, buffers, Xb, Yb)
            lr = 0.1 if i < decay_step else 0.01
            glist = [grads[n] for n in params]
            torch._foreach_mul_(glist, -lr)  # the lecture's -lr * p.grad, then p += it
            torch._foreach_add_(plist, glist)
            with torch.no_grad():
                for name, stat in zip(names, stats, strict=True):
                    buffers[name] = (1 - momentum) * buffers[name] + momentum * stat
            losses[i] = loss
    seconds = time.perf_counter() - t0
    return {"loss": losses, "seconds": seconds, "params": params, "buffers": buffers}


def func_check(
    X: torch.Tensor, Y: torch.Tensor, variant: str, seeds: list[int], steps: int = 20
) -> dict:  # fmt: skip
    """The ensemble of ``seeds`` against the lecture's loop run with each seed, after
    ``steps`` steps. Returns the largest absolute difference of the losses (every step,
    'loss'), of the parameters ('params') and of the BatchNorm running buffers
    ('buffers'), in float32 units; AssertionError if the names differ."""
    ens = func_train(X, Y, variant, seeds, steps)
    diff = {"loss": 0.0, "params": 0.0, "buffers": 0.0}
    for j, seed in enumerate(seeds):
        if variant.startswith("deep_"):
            ref = lecture_deep_train(X, Y, steps, variant == "deep_bn", seed=seed, debug=False)
            loss, params, buffers = ref["loss"], ref["params"], ref["buffers"]
        else:
            params, loss = lecture_train(X, Y, variant, steps, seed=seed)
            buffers = {k: params.pop(k) for k in list(params) if k.endswith("_running")}
        for key, got, ref in (
            ("params", ens["params"], params),
            ("buffers", ens["buffers"], buffers),
        ):
            assert set(got) == set(ref), (key, sorted(got), sorted(ref))
            for name, t in ref.items():
                d = float((got[name][j].reshape(t.shape) - t).abs().max())
                diff[key] = max(diff[key], d)
        diff["loss"] = max(diff["loss"], float((ens["loss"][:, j] - loss).abs().max()))
    return diff
