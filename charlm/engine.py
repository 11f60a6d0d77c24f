"""Training engine: S models (one per seed) trained at once by minibatch SGD.

Why a hand-written backward pass: the model is tiny (about 1.1 M multiply-adds per
model-step), so eager autograd spends most of each step on per-op overhead (graph
construction, ~40 small kernels forward and back for a single model). Batching the S
seeds into ``torch.bmm`` calls and writing the backward pass out (about 30 ops per
step whatever S is) removes that overhead; the benchmark (``make bench``) measures it
against the lecture's loop, and ``tests/test_engine.py`` checks these gradients against
autograd. torch.func.vmap(grad(...)) was the alternative: it still pays autograd's
per-op cost on every step.

Randomness: model s draws its minibatch indices from its own ``generators[s]``, one
``randint(0, n, (batch_size,))`` per step as in the lecture (drawn ``CHUNK`` steps at a
time, which yields the identical sequence), so a seed trained inside a batch of seeds
follows the same trajectory as the seed trained alone.
"""

from __future__ import annotations


import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from charlm.config import TrainConfig
from charlm.model import MLP

CHUNK = 1000  # steps of minibatch indices drawn at once per generator

WEIGHTS = ("C", "W1", "W2")  # matrices whose update:data ratio is recorded


@dataclass
class TrainResult:
    """What a run leaves besides the trained model.

    Attributes:
        loss: float32 (max_steps, S), the minibatch loss of every step in nats
            (before that step's update; row 0 is the loss at initialisation).
        diverged_at: per model, the first step whose loss was not finite, or None.
        record_steps: int64 (R,), the steps at which ``update_ratio`` was recorded.
        update_ratio: name -> float32 (R, S), log10(std(lr * grad) / std(param)) of
            each weight matrix at those steps (makemore part 3's update:data ratio).
        seconds: wall time of the training loop in seconds.
    """

    loss: torch.Tensor
    diverged_at: list[int | None]
    record_steps: torch.Tensor
    update_ratio: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


class _Grads:
    """Preallocated gradient buffers, one per parameter, same shapes."""

    def __init__(self, model: MLP):
        self.by_name = {n: torch.zeros_like(p) for n, p in model.named_parameters()}


def forward_backward(
    model: MLP, idx: torch.Tensor, targets: torch.Tensor, grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One training-mode forward and hand-written backward pass for all S models.

    Args:
        model: the models; in-place updates its BatchNorm running buffers.
        idx: int64 (S, B, T) contexts; targets: int64 (S, B) next characters.
        grads: name -> tensor of the parameter's shape, overwritten with dloss/dparam
            where loss is each model's own mean cross-entropy.

    Returns:
        float32 (S,), each model's mean cross-entropy on its minibatch, in nats.

    Formulas: softmax cross-entropy dlogits = (softmax(logits) - onehot) / B;
    tanh' = 1 - tanh^2; BatchNorm with unbiased std sigma (n = B):
    dx = (dxhat - mean(dxhat) - xhat * sum(dxhat * xhat) / (n - 1)) / sigma
    (makemore part 4, "becoming a backprop ninja", adapted to the n - 1 estimator).
    """
    S, B, T = idx.shape
    V = model.vocab_size
    C, W1, W2, b2 = model.C.data, model.W1.data, model.W2.data, model.b2.data
    E = C.shape[2]
    # forward
    flat = (idx + V * torch.arange(S, device=idx.device).view(S, 1, 1)).view(-1)  # (S*B*T,)
    embcat = C.view(S * V, E)[flat].view(S, B, T * E)  # (S, B, T*E)
    hpre = torch.bmm(embcat, W1)  # (S, B, H)
    bn = model.bn
    if bn is not None:
        mean = hpre.mean(1, keepdim=True)  # (S, 1, H)
        std = hpre.std(1, keepdim=True)  # (S, 1, H), unbiased as in the lecture
        xhat = (hpre - mean) / std
        hpreact = bn.gain.data.unsqueeze(1) * xhat + bn.bias.data.unsqueeze(1)
        m = bn.momentum
        bn.running_mean.mul_(1 - m).add_(m * mean.squeeze(1))
        bn.running_std.mul_(1 - m).add_(m * std.squeeze(1))
    else:
        hpreact = hpre + model.b1.data.unsqueeze(1)
    h = torch.tanh(hpreact)  # (S, B, H)
    logits = torch.baddbmm(b2.unsqueeze(1), h, W2)  # (S, B, V)
    logprobs = torch.log_softmax(logits, dim=2)
    tgt = targets.unsqueeze(2)  # (S, B, 1)
    loss = -logprobs.gather(2, tgt).squeeze(2).mean(1)  # (S,)
    # backward
    dlogits = logprobs.exp_()  # softmax, reusing the buffer
    dlogits.scatter_add_(2, tgt, torch.full_like(tgt, -1, dtype=dlogits.dtype))
    dlogits.div_(B)
    torch.bmm(h.transpose(1, 2), dlogits, out=grads["W2"])
    torch.sum(dlogits, 1, out=grads["b2"])
    dh = torch.bmm(dlogits, W2.transpose(1, 2))  # (S, B, H)
    dhpreact = torch.ops.aten.tanh_backward(dh, h)  # dh * (1 - h^2), autograd's kernel
    if bn is not None:
        torch.sum(dhpreact * xhat, 1, out=grads["bn.gain"])
        torch.sum(dhpreact, 1, out=grads["bn.bias"])
        dxhat = dhpreact.mul_(bn.gain.data.unsqueeze(1))
        dhpre = (
            dxhat
            - dxhat.mean(1, keepdim=True)
            - xhat * ((dxhat * xhat).sum(1, keepdim=True) / (B - 1))
        ) / std
    else:
        torch.sum(dhpreact, 1, out=grads["b1"])
        dhpre = dhpreact
    torch.bmm(embcat.transpose(1, 2), dhpre, out=grads["W1"])
    dembcat = torch.bmm(dhpre, W1.transpose(1, 2))  # (S, B, T*E)
    dC = grads["C"].view(S * V, E)
    dC.zero_()
    dC.index_add_(0, flat, dembcat.view(S * B * T, E))
    return loss


def sgd_update_(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
    """p = p - lr * grad for every parameter (the lecture's ``p.data += -lr * p.grad``)."""
    torch._foreach_add_(params, grads, alpha=-lr)


def _update_ratio(p: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
    """log10(std(lr * grad) / std(p)) per model: (S, ...) -> (S,)."""
    S = p.shape[0]
    return ((lr * g).reshape(S, -1).std(1) / p.reshape(S, -1).std(1)).log10()


def train(
    model: MLP,
    X: torch.Tensor,
    Y: torch.Tensor,
    generators: list[torch.Generator],
    cfg: TrainConfig,
    lr_scale: float = 1.0,
    progress: Callable[[int, torch.Tensor], None] | None = None,
) -> TrainResult:
    """Train ``model`` (S models) in place with minibatch SGD, as in makemore part 3.

    Args:
        model: S = ``len(generators)`` models on the device where training runs.
        X, Y: int64 (N, T) contexts and (N,) targets of the training split (any device).
        generators: one CPU ``torch.Generator`` per model, already advanced past the
            initial draws (``build_mlp`` leaves them so).
        cfg: steps, batch size, learning-rate schedule, recording interval.
        lr_scale: multiplies the schedule (a variant's ``lr_scale``).
        progress: called as ``progress(steps_done, last_loss)`` after each chunk.

    Returns:
        TrainResult; models whose loss became non-finite keep running harmlessly on
        NaNs and are reported in ``diverged_at``.

    Raises:
        ValueError: on mismatched sizes, or a BatchNorm model with batch_size < 2.
    """
    S = model.n_models
    if len(generators) != S:
        raise ValueError(f"{len(generators)} generators for {S} models")
    if model.bn is not None and cfg.batch_size < 2:
        raise ValueError("BatchNorm needs batch_size >= 2 (the unbiased std divides by B - 1)")
    device = model.C.device
    X, Y = X.to(device), Y.to(device)
    n, B = X.shape[0], cfg.batch_size
    grads = _Grads(model).by_name
    names = list(grads)
    param_list = [p.data for _, p in model.named_parameters()]
    grad_list = [grads[n] for n in names]
    losses = torch.empty(cfg.max_steps, S, device=device)
    record_steps = list(range(0, cfg.max_steps, cfg.record_every))
    ratios = {w: torch.empty(len(record_steps), S, device=device) for w in WEIGHTS}
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, cfg.max_steps, CHUNK):
            k = min(CHUNK, cfg.max_steps - start)
            ix = torch.stack([torch.randint(0, n, (k, B), generator=g) for g in generators], 1)
            ix = ix.to(device)  # (k, S, B)
            for j in range(k):
                i = start + j
                lr = cfg.lr_at(i, lr_scale)
                loss = forward_backward(model, X[ix[j]], Y[ix[j]], grads)
                losses[i] = loss
                if i % cfg.record_every == 0:
                    r = i // cfg.record_every
                    for w in WEIGHTS:
                        ratios[w][r] = _update_ratio(getattr(model, w).data, grads[w], lr)
                sgd_update_(param_list, grad_list, lr)
            if progress is not None:
                progress(start + k, losses[start + k - 1])
    seconds = time.perf_counter() - t0
    losses = losses.cpu()
    finite = torch.isfinite(losses)
    diverged_at = [
        None if bool(finite[:, s].all()) else int((~finite[:, s]).nonzero()[0, 0])
        for s in range(S)
    ]
    return TrainResult(
        loss=losses,
        diverged_at=diverged_at,
        record_steps=torch.tensor(record_steps, dtype=torch.int64),
        update_ratio={w: v.cpu() for w, v in ratios.items()},
        seconds=seconds,
    )


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto'")
    return torch.device(name)
