"""Split losses and sampling for S stacked models (eval mode throughout)."""

from __future__ import annotations

import torch

from charlm.data import Vocabulary
from charlm.model import MLP


@torch.no_grad()
def split_loss(model: MLP, X: torch.Tensor, Y: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Mean cross-entropy of every model over a whole split, in nats.

    Eval mode: BatchNorm uses its running statistics (makemore part 3). The split is
    processed ``chunk`` rows at a time to bound memory; the per-chunk means are
    combined in float64.

    Args:
        X: int64 (N, T); Y: int64 (N,), on any device.
    Returns:
        float64 (S,) on the CPU; NaN for a model with non-finite parameters.
    """
    was_training = model.training
    model.eval()
    S, device = model.n_models, model.C.device
    total = torch.zeros(S, dtype=torch.float64, device=device)
    for i in range(0, X.shape[0], chunk):
        xb = X[i : i + chunk].to(device)
        yb = Y[i : i + chunk].to(device)
        n = xb.shape[0]
        _, loss = model(xb.expand(S, n, -1), yb.expand(S, n))  # (S,)
        total += loss.double() * n
    model.train(was_training)
    return (total / X.shape[0]).cpu()


@torch.no_grad()
def sample(
    model: MLP, vocab: Vocabulary, n: int, generator: torch.Generator, max_len: int = 64
) -> list[list[str]]:
    """Draw ``n`` names from each model, all in parallel, in eval mode.

    Each name starts from the all-boundary context and ends at the boundary token
    (or after ``max_len`` characters). ``generator`` (CPU) drives
    ``torch.multinomial``; use one that no training stream touches.

    Returns:
        S lists of ``n`` names.
    """
    was_training = model.training
    model.eval()
    S, T, device = model.n_models, model.block_size, model.C.device
    context = torch.zeros(S, n, T, dtype=torch.int64)  # (S, n, T)
    out = torch.zeros(S, n, max_len, dtype=torch.int64)
    done = torch.zeros(S, n, dtype=torch.bool)
    for t in range(max_len):
        logits, _ = model(context.to(device))  # (S, n, V)
        probs = torch.softmax(logits.float().cpu(), dim=2).nan_to_num(1.0 / logits.shape[2])
        ix = torch.multinomial(probs.view(S * n, -1), 1, generator=generator).view(S, n)
        ix[done] = 0
        out[:, :, t] = ix
        done |= ix == 0
        if bool(done.all()):
            break
        context = torch.cat([context[:, :, 1:], ix.unsqueeze(2)], dim=2)
    model.train(was_training)
    itos = vocab.itos
    return [
        ["".join(itos[i] for i in seq[: seq.index(0) if 0 in seq else max_len]) for seq in rows]
        for rows in out.tolist()
    ]
