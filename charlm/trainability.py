"""Trainability: short runs of batched models over gains and seeds, classified as
trained, stalled or diverged (the depth atlas's heatmaps; He et al. 2015's analogue).

The baseline a stalled model fails to beat is the model that ignores its input: it can
only predict the unigram distribution of the next character, whose best cross-entropy
is the entropy of the training targets (``unigram_entropy``, computed from the data).
No file I/O.
"""

from __future__ import annotations

import math

import torch

from charlm import engine
from charlm.atlas import batched_model
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from charlm.evaluate import split_loss

# A model within this many nats of the unigram baseline counts as stalled. Why 0.05:
# the unigram model's own val cross-entropy differs from the train entropy by ~0.003
# nats (measured on the names split), so noise alone never moves a model 0.05 below
# it; and the step from the unigram (~2.91 nats) to a bigram model (~2.45) is ~0.45
# nats, so a model that has learnt anything from its context, even a tenth of the last
# character's information, is below the margin. Not tuned on any atlas result.
STALL_MARGIN = 0.05
# Models are compared on this many validation windows, drawn once without replacement
# from torch.Generator().manual_seed(VAL_SEED) (``val_subset``): the whole val split
# (22,8k windows) cost 3x the 300 training steps of a depth-16 cell. Per-window
# cross-entropy has a std of about 1.1 nats at these losses, so the mean over 4,096
# windows has a standard error near 0.017 nats, a third of STALL_MARGIN; and all models
# share the windows, so their differences are tighter still.
VAL_WINDOWS = 4096
VAL_SEED = 20150206  # He et al. 2015's arXiv date; any fixed value would do
CURVE_WINDOW = 10  # steps averaged per point of the stored training-loss curves


def unigram_entropy(Y: torch.Tensor, V: int) -> float:
    """Entropy in nats of the empirical distribution of the targets Y (N,) int64 over
    V classes: the cross-entropy of the best model that ignores its input."""
    p = torch.bincount(Y, minlength=V).double() / Y.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def classify(
    val_loss: float, train_losses: torch.Tensor, baseline: float, margin: float = STALL_MARGIN
) -> str:
    """'diverged' if the val loss or any training-step loss is non-finite; 'stalled' if
    the val loss is no better than ``baseline - margin`` nats (``STALL_MARGIN``: why);
    else 'trained'. train_losses: one model's per-step losses (steps,)."""
    if not math.isfinite(val_loss) or not bool(torch.isfinite(train_losses).all()):
        return "diverged"
    if val_loss >= baseline - margin:
        return "stalled"
    return "trained"


def val_subset(
    X: torch.Tensor, Y: torch.Tensor, n: int = VAL_WINDOWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows (all if fewer) of a validation split (X int64 (N, T), Y (N,)),
    drawn without replacement by ``torch.Generator().manual_seed(VAL_SEED)``."""
    if X.shape[0] <= n:
        return X, Y
    ix = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(VAL_SEED))[:n]
    return X[ix].clone(), Y[ix].clone()


def _rounded(values: list[float]) -> list[float | None]:
    return [float(f"{c:.5g}") if math.isfinite(c) else None for c in values]


def train_cell(
    model_cfg: ModelConfig,
    variant: VariantConfig,
    gains: list[float],
    seeds: list[int],
    split: dict[str, torch.Tensor],
    cfg: TrainConfig,
    V: int,
    T: int,
    progress=None,
    workers: int | None = None,
) -> dict:
    """Train every (gain, seed) model of one architecture in one ``engine.train`` call
    (``batched_model``; each bitwise the model trained alone) and classify each.

    Args:
        split: 'X', 'Y' (training windows), 'Xval', 'Yval' (validation windows: the
            val loss is their mean; ``val_subset`` draws the atlas's).
        cfg: steps, batch size, lr (``seeds`` is ignored: ``seeds`` here is used).
        workers: ``engine.train``'s CPU threads (default: every usable CPU).
    Returns:
        dict with 'gains', 'seeds', 'baseline' (nats), 'margin', 'val_loss' and
        'final_train_loss' (mean of the last 50 steps) as lists (G) of lists (S) in
        nats (None for non-finite), 'status' likewise, 'curve' (G, S, steps // 10):
        the training loss averaged over windows of 'curve_window' steps, and
        'seconds' (training loop).
    """
    model, generators = batched_model(model_cfg, variant, gains, seeds, V, T)
    result = engine.train(
        model, split["X"], split["Y"], generators, cfg, progress=progress, workers=workers
    )
    for p in model.parameters():  # a model whose last update overflowed
        bad = ~torch.isfinite(p.detach().reshape(p.shape[0], -1)).all(1)
        result.loss[-1, bad] = torch.nan
    val = split_loss(model, split["Xval"], split["Yval"])  # float64 (S,)
    baseline = unigram_entropy(split["Y"], V)
    tail = result.loss[-min(50, cfg.max_steps) :].double().mean(0)
    w = CURVE_WINDOW if cfg.max_steps >= CURVE_WINDOW else 1
    n_win = cfg.max_steps // w
    curve = result.loss[: n_win * w].double().view(n_win, w, -1).mean(1)  # (n_win, S)
    G, n = len(gains), len(seeds)
    status, vals, tails, curves = [], [], [], []
    for gi in range(G):
        row_s, row_v, row_t = [], [], []
        for si in range(n):
            k = gi * n + si
            v = float(val[k])
            row_s.append(classify(v, result.loss[:, k], baseline))
            row_v.append(v if math.isfinite(v) else None)
            t = float(tail[k])
            row_t.append(t if math.isfinite(t) else None)
        status.append(row_s)
        curves.append([_rounded(curve[:, gi * n + si].tolist()) for si in range(n)])
        vals.append(row_v)
        tails.append(row_t)
    return {
        "gains": [float(g) for g in gains],
        "seeds": list(seeds),
        "baseline": baseline,
        "margin": STALL_MARGIN,
        "val_loss": vals,
        "final_train_loss": tails,
        "status": status,
        "curve_window": w,
        "curve": curves,
        "seconds": result.seconds,
    }
