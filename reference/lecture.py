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


# ------------------------------------------------- the deep network (second half)


class Linear:
    """The lecture's Linear: weight randn(fan_in, fan_out) / sqrt(fan_in), zero bias."""

    def __init__(self, fan_in: int, fan_out: int, g: torch.Generator, bias: bool = True):
        self.weight = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5
        self.bias = torch.zeros(fan_out) if bias else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.out = x @ self.weight
        if self.bias is not None:
            self.out += self.bias
        return self.out

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight] + ([] if self.bias is None else [self.bias])


class BatchNorm1d:
    """The lecture's BatchNorm1d: unbiased batch var, (x - mean) / sqrt(var + eps),
    gamma * xhat + beta; running mean/var with momentum 0.1, used in eval mode."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1):
        self.eps, self.momentum, self.training = eps, momentum, True
        self.gamma, self.beta = torch.ones(dim), torch.zeros(dim)
        self.running_mean, self.running_var = torch.zeros(dim), torch.ones(dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            xmean, xvar = x.mean(0, keepdim=True), x.var(0, keepdim=True)
        else:
            xmean, xvar = self.running_mean, self.running_var
        xhat = (x - xmean) / torch.sqrt(xvar + self.eps)
        self.out = self.gamma * xhat + self.beta
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.running_mean = (1 - m) * self.running_mean + m * xmean
                self.running_var = (1 - m) * self.running_var + m * xvar
        return self.out

    def parameters(self) -> list[torch.Tensor]:
        return [self.gamma, self.beta]


class Tanh:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.out = torch.tanh(x)
        return self.out

    def parameters(self) -> list[torch.Tensor]:
        return []


def deep_layers(
    g: torch.Generator, batchnorm: bool, n_hidden: int = 100, fan_in: int = 30, V: int = 27
) -> list:
    """Five Linear [-> BatchNorm1d] -> Tanh blocks and the output Linear [-> BatchNorm1d],
    initialised as the lecture: last gamma (or, without BatchNorm, last weight) x 0.1,
    then the other Linear weights x gain (1.0 with BatchNorm, 5/3 without)."""
    sizes = [fan_in] + [n_hidden] * 5 + [V]
    layers: list = []
    for i in range(6):
        layers.append(Linear(sizes[i], sizes[i + 1], g, bias=not batchnorm))
        if batchnorm:
            layers.append(BatchNorm1d(sizes[i + 1]))
        if i < 5:
            layers.append(Tanh())
    gain = 1.0 if batchnorm else 5 / 3
    with torch.no_grad():
        if batchnorm:
            layers[-1].gamma *= 0.1
        else:
            layers[-1].weight *= 0.1
        for layer in layers[:-1]:
            if isinstance(layer, Linear):
                layer.weight *= gain
    return layers


def _named(C: torch.Tensor, layers: list) -> dict[str, torch.Tensor]:
    """Parameters named as ``charlm.layers.DeepMLP.named_parameters()`` (no seed dim)."""
    out = {"C": C}
    for i, layer in enumerate(layers):
        if isinstance(layer, Linear):
            out[f"layers.{i}.weight"] = layer.weight
            if layer.bias is not None:
                out[f"layers.{i}.bias"] = layer.bias
        elif isinstance(layer, BatchNorm1d):
            out[f"layers.{i}.gamma"], out[f"layers.{i}.beta"] = layer.gamma, layer.beta
    return out


def lecture_deep_train(
    Xtr: torch.Tensor,
    Ytr: torch.Tensor,
    max_steps: int,
    batchnorm: bool = True,
    seed: int = 2147483647,
    batch_size: int = 32,
    decay_step: int = 150_000,
    debug: bool = True,
) -> dict:
    """The lecture's deep loop on one model: eager autograd, ``p.data += -lr * p.grad``.

    C (27, 10) from ``torch.Generator().manual_seed(seed)``, then ``deep_layers``, then
    one ``randint(0, n, (batch_size,))`` per step; lr 0.1 before ``decay_step``, 0.01
    from it on. With ``debug`` (the lecture's cell) every layer's output retains its
    grad and the update:data ratio is computed each step; ``debug=False`` is the
    training lines only (the benchmark).

    Returns a dict: 'params' and 'grads' (the last step's, before its update), name ->
    tensor named as DeepMLP; 'buffers': 'layers.i.running_mean' / 'running_var';
    'loss': float32 (max_steps,) in nats; 'out' and 'out_grad': layer index -> the last
    step's output (B, width) and its gradient (debug only); 'ud': per step, list of
    log10(std(lr * grad) / std(p)) per parameter (debug only); 'layers' and 'C' for
    ``lecture_deep_loss``.
    """
    g = torch.Generator().manual_seed(seed)
    C = torch.randn((27, 10), generator=g)
    layers = deep_layers(g, batchnorm)
    return lecture_layers_train(C, layers, g, Xtr, Ytr, max_steps, batch_size, decay_step, debug)


def lecture_layers_train(
    C: torch.Tensor,
    layers: list,
    g: torch.Generator,
    Xtr: torch.Tensor,
    Ytr: torch.Tensor,
    max_steps: int,
    batch_size: int = 32,
    decay_step: int = 150_000,
    debug: bool = True,
) -> dict:
    """``lecture_deep_train``'s loop on a given model: C (V, E) and ``layers`` (the
    lecture's ``Linear`` / ``BatchNorm1d`` / ``Tanh`` objects, any depth), trained in
    place; minibatch indices drawn from ``g``, one ``randint(0, n, (batch_size,))`` per
    step. Returns ``lecture_deep_train``'s dict."""
    parameters = [C] + [p for layer in layers for p in layer.parameters()]
    for p in parameters:
        p.requires_grad = True
    lossi, ud = torch.empty(max_steps), []
    for i in range(max_steps):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        Xb, Yb = Xtr[ix], Ytr[ix]
        emb = C[Xb]
        x = emb.view(emb.shape[0], -1)
        for layer in layers:
            x = layer(x)
        loss = F.cross_entropy(x, Yb)
        if debug:
            for layer in layers:
                layer.out.retain_grad()
        for p in parameters:
            p.grad = None
        loss.backward()
        lr = 0.1 if i < decay_step else 0.01
        if debug and i == max_steps - 1:
            before = [p.detach().clone() for p in parameters]
        for p in parameters:
            p.data += -lr * p.grad
        lossi[i] = loss.item()
        if debug:
            with torch.no_grad():
                ud.append([((lr * p.grad).std() / p.data.std()).log10().item() for p in parameters])
    named = _named(C, layers)
    buffers = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, BatchNorm1d):
            buffers[f"layers.{i}.running_mean"] = layer.running_mean.reshape(-1)
            buffers[f"layers.{i}.running_var"] = layer.running_var.reshape(-1)
    out = {
        "params": {k: v.detach() for k, v in named.items()},
        "grads": {k: v.grad for k, v in named.items()},
        "buffers": buffers,
        "loss": lossi,
        "ud": ud,
        "layers": layers,
        "C": C,
    }
    if debug:
        out["before"] = dict(zip(named, before, strict=True))
        out["out"] = {i: layer.out.detach() for i, layer in enumerate(layers)}
        out["out_grad"] = {i: layer.out.grad for i, layer in enumerate(layers)}
    return out


@torch.no_grad()
def lecture_deep_loss(run: dict, X: torch.Tensor, Y: torch.Tensor) -> float:
    """The lecture's ``split_loss``: eval mode (running statistics), whole split, nats."""
    for layer in run["layers"]:
        layer.training = False
    x = run["C"][X].view(X.shape[0], -1)
    for layer in run["layers"]:
        x = layer(x)
    for layer in run["layers"]:
        layer.training = True
    return F.cross_entropy(x, Y).item()
