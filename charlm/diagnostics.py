"""What happens inside the network: activations, gradients, BatchNorm statistics.

The pictures of makemore part 3 as numbers, for S stacked models. Every function
works on a copy of the model's state where it would otherwise change it (a
training-mode forward updates BatchNorm's running buffers), so calling them never
changes the model that is evaluated. Each function takes any ``charlm.model.MLP``
(depth 1 is the lecture's first network, depth 5 its second): hidden layers are
listed input side first, weight matrices by their ``named_parameters()`` names.
"""

from __future__ import annotations

import copy

import torch

from charlm.layers import BatchNorm1d
from charlm.model import MLP, cross_entropy_per_model

Model = MLP


def forward_hidden(
    model: Model, idx: torch.Tensor
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per hidden layer (pre-activation, activation), each (S, B, H), and logits (S, B, V).

    The pre-activation is the nonlinearity's input (after BatchNorm when there is one);
    the activations are the hidden nonlinearities' outputs (``hidden_indices``, the
    lecture's ``layer.out`` of each Tanh).
    """
    outs = model.trace(idx)
    return [(outs[i - 1], outs[i]) for i in model.hidden_indices], outs[-1]


def weight_matrices(model: Model) -> list[str]:
    """Names of the model's weight matrices, in ``named_parameters()`` order.

    A weight matrix is a parameter that is 2-d per model, i.e. (S, rows, cols) stacked:
    the embedding table and the Linear weights (C, W1, W2 for today's MLP), not the
    biases nor BatchNorm's gain and bias, which are (S, n). The last one maps the last
    hidden layer to the logits (W2, or the deep network's last Linear weight).
    """
    return [name for name, p in model.named_parameters() if p.dim() == 3]


def batchnorm_layers(model: Model) -> dict[str, BatchNorm1d]:
    """The model's BatchNorm modules by ``named_modules()`` name (``layers.i``; empty
    without any)."""
    return model.batchnorm_modules


def running_std(bn: BatchNorm1d) -> torch.Tensor:
    """A BatchNorm module's running std, float32 (S, H): the 'std' form keeps it; the
    'var' form keeps the variance, whose square root this is (without eps)."""
    return bn.running_stat.sqrt() if bn.form == "var" else bn.running_stat.clone()


def n_params(model: Model) -> int:
    """Parameters of one model (one seed): 11,897 for the one-layer MLP, 47,024 for the
    lecture's deep BatchNorm network."""
    return sum(p.numel() for p in model.parameters()) // model.n_models


def activations(model: Model, idx: torch.Tensor, train_mode: bool) -> list[dict[str, torch.Tensor]]:
    """Hidden pre-activations and tanh activations on a probe batch, per hidden layer.

    Args:
        idx: int64 (S, P, T) probe contexts.
        train_mode: BatchNorm normalises with the probe's own statistics when True
            (as at the step-0 forward pass), with the running ones when False.
    Returns:
        One dict per hidden layer (input side first) with 'hpreact' and 'h',
        float32 (S, P, H), on the CPU.
    """
    m = copy.deepcopy(model).train(train_mode)
    with torch.no_grad():
        hidden, _ = forward_hidden(m, idx)
    return [{"hpreact": hpreact.cpu(), "h": h.cpu()} for hpreact, h in hidden]


def saturated(h: torch.Tensor, nonlinearity: str, threshold: float) -> torch.Tensor | None:
    """Where an activation sits on a flat part of its nonlinearity, bool like ``h``.

    tanh: |h| > threshold (tanh' = 1 - h^2 is near 0; makemore part 3's 0.97);
    sigmoid: |2 h - 1| > threshold (h near 0 or 1, the same rule on sigmoid's range,
    since sigmoid(x) = (1 + tanh(x / 2)) / 2); relu: h == 0 exactly (the unit is off:
    relu' = 0); linear and gelu: None (no flat part, nothing to count).
    """
    if nonlinearity == "tanh":
        return h.abs() > threshold
    if nonlinearity == "sigmoid":
        return (2 * h - 1).abs() > threshold
    if nonlinearity == "relu":
        return h == 0
    return None


def activation_summary(
    h: torch.Tensor,
    hpreact: torch.Tensor,
    thresholds: tuple[float, ...] = (0.97, 0.99),
    nonlinearity: str = "tanh",
) -> dict:
    """Per model: saturated (or zero) share, dead units, pre-activation mean and std.

    Args:
        h, hpreact: float32 (S, P, H) activations and pre-activations on a probe batch.
        thresholds: for tanh and sigmoid, ``saturated`` above each; the largest one
            also defines dead units and the saturation image. relu counts exact zeros
            (one rule, reported under each threshold's key); linear and gelu nothing.
        nonlinearity: the hidden layers' nonlinearity (``saturated``).
    Returns:
        'saturated': {str(t): list of S fractions of saturated (relu: zero) values},
        empty for linear and gelu; 'dead': S counts of units saturated (relu: zero) on
        every probe example, whose gradient is then near 0 (exactly 0 for relu) for all
        of them, or None; 'hpreact_mean', 'hpreact_std': S floats (non-finite for a
        diverged model); 'image': bool (S, P, H), saturated at max(thresholds)
        (makemore part 3's white cells), or None.
    """
    S = h.shape[0]
    top = saturated(h, nonlinearity, max(thresholds))
    shares = {}
    for t in thresholds if top is not None else ():
        flat = saturated(h, nonlinearity, t).float().reshape(S, -1)
        shares[f"{t:g}"] = flat.mean(1).tolist()
    return {
        "saturated": shares,
        "dead": None if top is None else top.all(dim=1).sum(1).tolist(),
        "hpreact_mean": hpreact.reshape(S, -1).mean(1).tolist(),
        "hpreact_std": hpreact.reshape(S, -1).std(1).tolist(),
        "image": top,
    }


@torch.no_grad()
def initial_logits(
    model: Model, idx: torch.Tensor, targets: torch.Tensor
) -> dict[str, list[float]]:
    """Why a model's step-0 loss is what it is: its logits on a probe batch.

    Training mode, as at step 0. A model that knows nothing should predict the uniform
    distribution, loss -ln(1/V) = ln V (makemore part 3); large logits make the softmax
    confidently wrong instead. If W2 is N(0, s^2) and independent of h, each logit has
    standard deviation about s * sqrt(H * mean(h^2)), reported as 'logits_std_predicted'
    (h: the last hidden layer); when a BatchNorm normalises the logits (a deep network's
    ``batchnorm_output``) each has unit variance before its gamma, and the prediction is
    sqrt(mean(gamma^2)) instead.

    Args:
        idx: int64 (S, P, T); targets: int64 (S, P).
    Returns:
        Lists of S floats: 'loss' (nats), 'logits_std', 'logits_std_predicted',
        'p_target_median' (median over the probe batch of the probability given to
        the correct character: 1/V for a uniform softmax; its mean would be no guide,
        since random logits of any scale give the correct character 1/V on average),
        'p_max' (mean largest probability), 'h_rms', 'output_weight_std'; and
        'output_weight', the name of the matrix behind the logits (W2).
    """
    m = copy.deepcopy(model).train(True)
    S = m.n_models
    hidden, logits = forward_hidden(m, idx)  # logits (S, P, V)
    h = hidden[-1][1]
    probs = torch.softmax(logits.double(), dim=2)
    p_target = probs.gather(2, targets.unsqueeze(2)).reshape(S, -1)  # (S, P)
    h_rms = h.double().pow(2).reshape(S, -1).mean(1).sqrt()
    output_weight = weight_matrices(m)[-1]
    w2_std = m.get_parameter(output_weight).double().reshape(S, -1).std(1)
    H = h.shape[2]
    predicted = w2_std * h_rms * H**0.5
    if isinstance(m.layers[-1], BatchNorm1d):
        predicted = m.layers[-1].gamma.detach().double().pow(2).mean(1).sqrt()
    return {
        "loss": cross_entropy_per_model(logits, targets).double().tolist(),
        "logits_std": logits.double().reshape(S, -1).std(1).tolist(),
        "logits_std_predicted": predicted.tolist(),
        "p_target_median": p_target.quantile(0.5, dim=1).tolist(),
        "p_max": probs.amax(2).mean(1).tolist(),
        "h_rms": h_rms.tolist(),
        "output_weight": output_weight,
        "output_weight_std": w2_std.tolist(),
    }


def loss_curve(loss: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of log10(loss) over consecutive windows of steps, per model.

    The lecture's ``torch.tensor(lossi).view(-1, 1000).mean(1)`` on log10 losses.
    Args:
        loss: (N, S) per-step minibatch loss in nats.
        window: steps per point; a run shorter than one window gives a single point.
    Returns:
        steps int64 (W,), the first step of each window, and float64 (W, S) means
        (non-finite where a model diverged inside the window).
    """
    N = loss.shape[0]
    w = window if N >= window else N
    n = N // w * w
    means = loss[:n].double().log10().reshape(n // w, w, -1).mean(1)  # (W, S)
    return torch.arange(0, n, w), means


def gradients(model: Model, idx: torch.Tensor, targets: torch.Tensor) -> dict:
    """Gradients of each model's loss on the probe batch, in training mode, by autograd.

    Returns, on the CPU: 'dh', a list with one float32 (S, P, H) per hidden layer, the
    gradient at its tanh outputs; 'weights', for each name of ``weight_matrices``,
    'grad_mean', 'grad_std' and 'grad_data_ratio' = std(grad) / std(weight), each
    float32 (S,) -- makemore part 3's gradient distribution and grad:data ratio.
    """
    m = copy.deepcopy(model).train(True)
    for p in m.parameters():
        p.grad = None
    hidden, logits = forward_hidden(m, idx)  # logits (S, P, V)
    for _, h in hidden:
        h.retain_grad()
    loss = cross_entropy_per_model(logits, targets)
    loss.sum().backward()  # models are independent: d(sum)/dp_s = dloss_s/dp_s
    S = model.n_models
    weights = {}
    for name in weight_matrices(m):
        p = m.get_parameter(name)
        g = p.grad.reshape(S, -1)
        weights[name] = {
            "grad_mean": g.mean(1).cpu(),
            "grad_std": g.std(1).cpu(),
            "grad_data_ratio": (g.std(1) / p.detach().reshape(S, -1).std(1)).cpu(),
        }
    return {"dh": [h.grad.detach().cpu() for _, h in hidden], "weights": weights}


@torch.no_grad()
def calibrate_batchnorm(model: MLP, X: torch.Tensor, chunk: int = 16384) -> dict[str, dict]:
    """Per-unit mean and unbiased std of every BatchNorm's input over a whole split.

    The lecture's "calibrate the batch norm at the end of training" (makemore part 3),
    for any depth: BatchNorm modules in layer order, each from the split's forward pass
    in eval mode with the ones before it already calibrated (for the first, the
    lecture's emb @ W1), in float64 sums. X int64 (N, T) with N >= 2. Returns
    ``layers.i`` -> 'mean' and 'std', float32 (S, H) on the CPU.
    """
    S, device, n = model.n_models, model.C.device, X.shape[0]
    m = copy.deepcopy(model).eval()
    out = {}
    for name, bn in m.batchnorm_modules.items():
        index = int(name.split(".")[1])
        total = torch.zeros(S, bn.gamma.shape[1], dtype=torch.float64, device=device)
        total_sq = torch.zeros_like(total)
        for i in range(0, n, chunk):
            x = m.embed(X[i : i + chunk].to(device).expand(S, -1, -1))
            for layer in m.layers[:index]:
                x = layer(x)
            pre = x.double()  # (S, b, H), this BatchNorm's input
            total += pre.sum(1)
            total_sq += (pre * pre).sum(1)
        mean = total / n
        std = ((total_sq - n * mean * mean) / (n - 1)).clamp_min(0).sqrt()
        out[name] = {"mean": mean.float().cpu(), "std": std.float().cpu()}
        _set_stats(bn, out[name]["mean"].to(device), out[name]["std"].to(device))
    return out


def _set_stats(bn: BatchNorm1d, mean: torch.Tensor, std: torch.Tensor) -> None:
    bn.running_mean.copy_(mean)
    bn.running_stat.copy_(std * std if bn.form == "var" else std)


def with_batchnorm_stats(model: MLP, stats: dict[str, dict]) -> MLP:
    """A copy of ``model`` whose BatchNorm running buffers are ``stats`` (as
    ``calibrate_batchnorm`` returns: name -> 'mean', 'std'; a 'var' form gets std^2)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, bn in m.batchnorm_modules.items():
            _set_stats(bn, stats[name]["mean"], stats[name]["std"])
    return m


def snapshot(model: MLP, capture: dict, threshold: float = 0.97) -> dict:
    """One captured training step as the lecture prints it (makemore part 3, "diagnostic
    tools"): the fields of ``charlm.artefacts.Snapshot``.

    Args:
        model: the models the step belongs to (names and nonlinearity).
        capture: the step's 0-based 'step' and ``engine.TrainResult.captures[step]``:
            'out' and 'out_grad' (hidden index -> (S, B, H)), 'grad' and 'param'
            (parameter name -> (S, ...), 'param' after that step's update).
        threshold: saturation threshold (the lecture's 0.97; ``saturated``: relu counts
            zeros, linear and gelu nothing, their share reads 0).
    Returns:
        Per hidden nonlinearity (input side first) mean, std, saturated share, and mean
        and std of its gradient; per weight matrix (``model.weight_names``) the gradient,
        its mean and std, the std of the weight after the update and their ratio. Stds
        are unbiased (``Tensor.std``), lists hold S floats.
    """
    S = model.n_models
    flat = lambda t: t.detach().double().reshape(S, -1)  # noqa: E731
    hidden = []
    for i in model.hidden_indices:
        out, grad = capture["out"][i], capture["out_grad"][i]
        sat = saturated(out, model.nonlinearity, threshold)
        hidden.append(
            {
                "name": f"layers.{i}",
                "kind": model.nonlinearity,
                "out": out,
                "out_grad": grad,
                "mean": flat(out).mean(1).tolist(),
                "std": flat(out).std(1).tolist(),
                "saturated": (torch.zeros(S) if sat is None else flat(sat).mean(1)).tolist(),
                "grad_mean": flat(grad).mean(1).tolist(),
                "grad_std": flat(grad).std(1).tolist(),
            }
        )
    weights = {}
    for name in model.weight_names:
        g, p = capture["grad"][name], capture["param"][name]
        grad_std, data_std = flat(g).std(1), flat(p).std(1)
        weights[name] = {
            "grad": g,
            "grad_mean": flat(g).mean(1).tolist(),
            "grad_std": grad_std.tolist(),
            "data_std": data_std.tolist(),
            "grad_data_ratio": (grad_std / data_std).tolist(),
        }
    return {"step": capture["step"], "threshold": threshold, "layers": hidden, "weights": weights}
