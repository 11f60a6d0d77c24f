"""Per-layer figures and tables of every variant, as makemore part 3 draws them.

The lecture's "diagnostic tools" (second half of makemore part 3): after a training step
it plots, as histogram lines, the output of every hidden nonlinearity (legend
"layer i (tanh)", hidden layers numbered 1..L here), the gradient at those outputs and
the gradient of every weight matrix (C, W1, W2, ...), and the log10 update:data ratio
of each weight matrix over training with a black guide line at -3. Every variant, of
any depth, has these records. Here the same, from ``Diagnostics.snapshots`` ('snapshot': the
lecture's step 1,000; 'final': the last step) and ``Diagnostics.weights[..].update_ratio``:
figures show one seed (the canonical one, or the first that did not diverge), tables
give mean ± sd across seeds. Figure functions return ``(figure or None, notes)`` like
reporting/figures.py; deterministic (no randomness).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from charlm.artefacts import Snapshot
from reporting.figures import (
    LEGEND_MAX,
    WEIGHT_INDEX,
    Drawn,
    Note,
    _blank,
    _finite_np,
    layer_colorbar,
    layer_colors,
    legend_outside,
)
from reporting.stats import (
    Inputs,
    first_good_seed,
    fmt_mean_std,
    hidden_label,
    no_saturation,
    saturation_rule,
    seed_name,
    weight_labels,
)

MOMENTS = ("snapshot", "final")  # keys of Diagnostics.snapshots, in display order
BINS = 100  # torch.histogram's default, as in the lecture's plots
GUIDE = -3.0  # the lecture's rule of thumb: update:data ratio about 1e-3


def snapshot_variants(inputs: Inputs) -> list[str]:
    """The variants (params order) whose diagnostics carry per-layer snapshots (every
    variant since diagnostics format 6)."""
    return [v for v in inputs.variants if inputs.diagnostics[v].snapshots]


def fmt_sci(values, digits: int = 3) -> str:
    """'mean ± sd (n = k)' in scientific notation, for gradients and ratios."""
    return fmt_mean_std(values, spec=f".{digits}e", sd_spec=f".{digits - 1}e")


def fmt_pct(values, digits: int = 2) -> str:
    """Shares (0..1) as 'mean ± sd % (n = k)'."""
    pct = [100 * x for x in values if x is not None]
    return fmt_mean_std(pct, spec=f".{digits}f", sd_spec=f".{digits}f", unit=" %")


def fmt_2(values, sign: str = "") -> str:
    """'mean ± sd (n = k)' with 2 decimals, the lecture's precision for activations."""
    return fmt_mean_std(values, spec=f"{sign}.2f", sd_spec=".2f")


def _moments(inputs: Inputs, v: str) -> list[tuple[str, Snapshot | None]]:
    snaps = inputs.diagnostics[v].snapshots or {}
    return [(when, snaps.get(when)) for when in MOMENTS]


def _step_words(when: str, snap: Snapshot) -> str:
    return f"{when}: step {snap.step:,} (after {snap.step + 1:,} steps)"


def _lines(ax, series: list[tuple[str, np.ndarray]], title: str, xlabel: str) -> list[str]:
    """Density histograms as lines on ``ax``, shared bins; returns the labels not drawn.

    Up to LEGEND_MAX series: the lecture's colours and a legend right of the panel;
    more (a deep net): colours along a sequential colormap in layer order and a colour
    bar over the series' index instead of a legend."""
    drawable = [(i, label, x) for i, (label, x) in enumerate(series) if x.size and np.ptp(x) > 0]
    skipped = [label for label, x in series if not (x.size and np.ptp(x) > 0)]
    if not drawable:
        return skipped
    many = len(series) > LEGEND_MAX
    colors = layer_colors(len(series)) if many else [None] * len(series)
    edges = np.histogram_bin_edges(np.concatenate([x for _, _, x in drawable]), bins=BINS)
    for i, label, x in drawable:
        hy, hx = np.histogram(x, bins=edges, density=True)
        ax.plot(hx[:-1], hy, label=label, color=colors[i], lw=1 if many else 1.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if many:
        label, start = _index_label(series)
        layer_colorbar(ax.figure, ax, len(series), label, start)
    else:
        legend_outside(ax)
    return skipped


def _index_label(series: list[tuple[str, np.ndarray]]) -> tuple[str, int]:
    """The colour bar's label and first number: hidden layers 1..L, or weight matrices
    numbered as named (0: C, k: Wk)."""
    first = series[0][0]
    return ("hidden layer", 1) if first.startswith("layer") else (WEIGHT_INDEX, 0)


def _per_moment(inputs: Inputs, v: str, what: str, series_of, xlabel: str) -> Drawn:
    """One panel per moment: ``series_of(snapshot, seed)`` gives the lines to draw;
    ``xlabel`` names the histogrammed value (the y axis is the density)."""
    seed = first_good_seed(inputs, v)
    fig, axes = plt.subplots(1, len(MOMENTS), figsize=(15, 3.6), squeeze=False)
    notes = []
    for ax, (when, snap) in zip(axes[0], _moments(inputs, v), strict=True):
        if snap is None:
            _blank(ax, f"no {when} record")
            notes.append(
                Note(f"{v}, {when}: not recorded (the run is shorter than the lecture's step).")
            )
            continue
        if seed is None:
            _blank(ax, "every seed diverged")
            notes.append(Note(f"{v}, {when}: every seed diverged; no {what} to draw."))
            continue
        series = series_of(snap, seed)
        if not series:
            _blank(ax, f"no {what}")
            notes.append(Note(f"{v}, {when}: no {what} recorded."))
            continue
        title = f"{v}, {what} ({_step_words(when, snap)}, {seed_name(inputs, v, seed)})"
        skipped = _lines(ax, series, title, xlabel)
        if len(skipped) == len(series):
            _blank(ax, f"no finite, non-constant {what}")
            notes.append(Note(f"{v}, {when}: every {what} is constant or not finite."))
        elif skipped:
            notes.append(
                Note(
                    f"{v}, {when}: {', '.join(skipped)} left out (constant or not finite, "
                    f"e.g. an all-zero gradient or a diverged seed).",
                    drawn=True,
                )
            )
    fig.tight_layout()
    return fig, notes


def activation_lines(inputs: Inputs, v: str) -> Drawn:
    """Histogram lines of every hidden nonlinearity's output, one panel per moment."""
    return _per_moment(
        inputs,
        v,
        "activation distribution",
        lambda snap, s: [
            (hidden_label(i, x.kind), _finite_np(x.out[s])) for i, x in enumerate(snap.layers)
        ],
        "output of the hidden nonlinearity",
    )


def gradient_lines(inputs: Inputs, v: str) -> Drawn:
    """Histogram lines of dloss/dout at every hidden nonlinearity, one panel per moment."""
    return _per_moment(
        inputs,
        v,
        "gradient distribution",
        lambda snap, s: [
            (hidden_label(i, x.kind), _finite_np(x.out_grad[s])) for i, x in enumerate(snap.layers)
        ],
        "dloss/dout at the hidden nonlinearity",
    )


def _weight_label(name: str, w, s: int) -> str:
    shape = "x".join(str(n) for n in w.grad.shape[1:])
    return f"{name} ({shape}), grad:data {w.grad_data_ratio[s]:.2e}"


def weight_gradient_lines(inputs: Inputs, v: str) -> Drawn:
    """Histogram lines of every weight matrix's gradient (2-d weights only), legend
    with the shape and the grad:data ratio std(grad) / std(weight)."""
    return _per_moment(
        inputs,
        v,
        "weights gradient distribution",
        lambda snap, s: [
            (_weight_label(weight_labels(snap.weights)[name], w, s), _finite_np(w.grad[s]))
            for name, w in snap.weights.items()
            if w.grad.dim() == 3  # (S, fan_in, fan_out): a matrix per seed
        ],
        "gradient of the weight matrix",
    )


def update_ratio_lines(inputs: Inputs, v: str) -> Drawn:
    """log10(std(lr * grad) / std(weight)) per weight matrix over training (one seed),
    with the lecture's -3 guide line (dashed black)."""
    d = inputs.diagnostics[v]
    seed = first_good_seed(inputs, v)
    steps = d.update_steps.numpy()
    fig, ax = plt.subplots(figsize=(15, 3.6))
    drawn, notes = 0, []
    labels = weight_labels(d.weights)
    named = [(n, w) for n, w in d.weights.items() if w.update_ratio is not None]
    many = len(named) > LEGEND_MAX
    colors = layer_colors(len(named)) if many else [None] * len(named)
    if seed is not None:
        for (name, w), color in zip(named, colors, strict=True):
            y = w.update_ratio[:, seed].double().numpy()  # (R,)
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(steps[ok], y[ok], label=None if many else labels[name], color=color,
                        marker="o" if ok.sum() < 5 else None)  # fmt: skip
                drawn += 1
    if not drawn:
        plt.close(fig)
        why = "every seed diverged" if seed is None else "no finite update:data ratio"
        return None, [Note(f"{v}: {why}; no update:data ratio to draw.")]
    ax.axhline(GUIDE, ls="--", c="k", lw=1, label="1e-3 guide")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 update:data")
    ax.set_title(f"{v}: update:data ratio over training ({seed_name(inputs, v, seed)})",
                 fontsize=10)  # fmt: skip
    if many:
        layer_colorbar(fig, ax, len(named), WEIGHT_INDEX, start=0)
    legend_outside(ax, ncols=1 if many else 2)
    fig.tight_layout()
    return fig, notes


# ---- tables (mean ± sd across seeds) ---------------------------------------------------


def activation_rows(inputs: Inputs, v: str) -> list[dict]:
    """Per moment and hidden layer: mean, std and % saturated in the sense of its
    nonlinearity (``reporting.stats.saturation_rule``: tanh |out| > threshold, sigmoid
    |2 out - 1| > threshold, relu out = 0; linear and gelu: 'no saturation for ...')."""
    rows = []
    for when, snap in _moments(inputs, v):
        for i, x in enumerate(snap.layers if snap else []):
            rule = saturation_rule(x.kind, snap.threshold, "out")
            rows.append({
                "when": f"{when} (step {snap.step:,})", "layer": hidden_label(i, x.kind),
                "mean": fmt_2(x.mean, "+"), "std": fmt_2(x.std),
                "saturated when": no_saturation(x.kind) if rule is None else rule,
                # relu's flat part is zero: its share of exact zeros, named as such
                ("% zero" if x.kind == "relu" else "% saturated"): (
                    "–" if rule is None else fmt_pct(x.saturated)
                ),
            })  # fmt: skip
    return rows


def gradient_rows(inputs: Inputs, v: str) -> list[dict]:
    """Per moment and hidden layer: mean and std of dloss/dout."""
    rows = []
    for when, snap in _moments(inputs, v):
        for i, x in enumerate(snap.layers if snap else []):
            rows.append({
                "when": f"{when} (step {snap.step:,})", "layer": hidden_label(i, x.kind),
                "grad mean": fmt_sci(x.grad_mean), "grad std": fmt_sci(x.grad_std),
            })  # fmt: skip
    return rows


def weight_rows(inputs: Inputs, v: str) -> list[dict]:
    """Per moment and weight matrix: shape, grad mean, grad std, grad:data ratio."""
    rows = []
    for when, snap in _moments(inputs, v):
        labels = weight_labels(snap.weights) if snap else {}
        for name, w in snap.weights.items() if snap else []:
            rows.append({
                "when": f"{when} (step {snap.step:,})", "weight": labels[name],
                "shape": " x ".join(str(n) for n in w.grad.shape[1:]),
                "grad mean": fmt_sci(w.grad_mean), "grad std": fmt_sci(w.grad_std),
                "grad:data": fmt_sci(w.grad_data_ratio),
            })  # fmt: skip
    return rows
