"""The lecture's training loop as written (makemore part 3), the benchmark's baseline.

Eager autograd on one model: one ``torch.Generator`` seeded once draws C, W1, b1 (not
in the BatchNorm variant), W2, b2, then ``randint(0, n, (batch_size,))`` each step;
``loss.backward()``; ``p.data += -lr * p.grad``. Variants: 'naive' (unscaled N(0, 1)
draws), 'kaiming' (W1 * (5/3) / sqrt(30), b1 * 0.01, W2 * 0.01, b2 * 0) and
'batchnorm' (Kaiming W1 and the lecture's BatchNorm on the hidden pre-activations).
Also the yardstick of the fidelity checks: ``lecture_train`` returns every step's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("naive", "kaiming", "batchnorm")


def init_params(
    variant: str, g: torch.Generator, V: int = 27, T: int = 3, E: int = 10, H: int = 200
) -> dict[str, torch.Tensor]:
    """The lecture's initial parameters for ``variant``, drawn from ``g`` in its order."""
    kaiming = variant != "naive"
    C = torch.randn((V, E), generator=g)
    W1 = torch.randn((T * E, H), generator=g) * ((5 / 3) / (T * E) ** 0.5 if kaiming else 1)
    p = {"C": C, "W1": W1}
    if variant != "batchnorm":
        p["b1"] = torch.randn(H, generator=g) * (0.01 if kaiming else 1)
    p["W2"] = torch.randn((H, V), generator=g) * (0.01 if kaiming else 1)
    p["b2"] = torch.randn(V, generator=g) * (0 if kaiming else 1)
    if variant == "batchnorm":
        p["bngain"] = torch.ones((1, H))
        p["bnbias"] = torch.zeros((1, H))
    return p


def lecture_train(
    Xtr: torch.Tensor,
    Ytr: torch.Tensor,
    variant: str,
    max_steps: int,
    seed: int = 2147483647,
    batch_size: int = 32,
    decay_step: int = 100_000,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Train one model exactly as the lecture does; returns (parameters, loss per step).

    The learning rate is 0.1 before step ``decay_step`` and 0.01 from it on (the
    lecture's 100,000).

    Parameters include the BatchNorm running buffers 'bnmean_running' and
    'bnstd_running' in the BatchNorm variant. Losses: float32 (max_steps,), in nats.
    """
    g = torch.Generator().manual_seed(seed)
    p = init_params(variant, g)
    parameters = list(p.values())
    for t in parameters:
        t.requires_grad = True
    H = p["W1"].shape[1]
    bnmean_running = torch.zeros((1, H))
    bnstd_running = torch.ones((1, H))
    lossi = torch.empty(max_steps)
    for i in range(max_steps):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[ix], Ytr[ix]
        emb = p["C"][Xb]
        embcat = emb.view(emb.shape[0], -1)
        if variant == "batchnorm":
            hpreact = embcat @ p["W1"]
            bnmeani = hpreact.mean(0, keepdim=True)
            bnstdi = hpreact.std(0, keepdim=True)
            hpreact = p["bngain"] * (hpreact - bnmeani) / bnstdi + p["bnbias"]
            with torch.no_grad():
                bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
                bnstd_running = 0.999 * bnstd_running + 0.001 * bnstdi
        else:
            hpreact = embcat @ p["W1"] + p["b1"]
        h = torch.tanh(hpreact)
        logits = h @ p["W2"] + p["b2"]
        loss = F.cross_entropy(logits, Yb)
        for t in parameters:
            t.grad = None
        loss.backward()
        lr = 0.1 if i < decay_step else 0.01
        for t in parameters:
            t.data += -lr * t.grad
        lossi[i] = loss.item()
    out = {k: v.detach() for k, v in p.items()}
    if variant == "batchnorm":
        out["bnmean_running"] = bnmean_running
        out["bnstd_running"] = bnstd_running
    return out, lossi
