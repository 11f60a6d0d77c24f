"""Figures and HTML pieces of the report (seaborn on matplotlib's Agg backend).

Every figure function takes what the evaluate stage wrote and returns ``(figure or
None, notes)``: a panel that cannot be drawn (no finite value, an all-zero gradient, a
diverged seed) is left blank with a short text in it, and a ``Note`` under the figure
says why ("Not drawn: ..."), or which points were left out ("Note: ..."), so degenerate
inputs still give a complete page. Nothing here is
random except seaborn's strip-plot jitter, which is seeded.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reporting.stats import (
    SPLITS,
    Inputs,
    first_good_seed,
    fmt,
    fmt_mean_std,
    no_saturation,
    nonlinearity,
    saturation_rule,
    seed_name,
    variant,
    weight_labels,
)


@dataclass(frozen=True)
class Note:
    """Text shown under a figure: a panel not drawn, or points left out of one."""

    text: str
    drawn: bool = False  # True: the figure is there, only some points are missing


Drawn = tuple[Figure | None, list[Note]]
H_BINS = 50  # histogram bins of the activations; their range follows the data
# Up to this many hidden layers a variant gets the lecture's figures, one per hidden
# layer (the lecture's nets have 1 and 5); deeper ones get one figure of every layer
# (``activation_depth_figure``), so that the report's cost and length do not grow with
# hidden layers x variants.
PER_LAYER_MAX = 6
LEGEND_MAX = 10  # more series than this: a colour bar over layer index, no legend
LAYER_CMAP = "viridis"  # sequential: distinct layers never share a colour


def per_layer(inputs: Inputs, v: str) -> bool:
    """Whether variant ``v`` is drawn one figure per hidden layer (<= PER_LAYER_MAX)."""
    return len(inputs.diagnostics[v].layers) <= PER_LAYER_MAX


def layer_colors(n: int) -> list:
    """``n`` distinct colours of LAYER_CMAP, input side first."""
    cmap = plt.get_cmap(LAYER_CMAP)
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


# The colour bar's label for weight matrices (``layer_colorbar(..., start=0)``): W_k is
# the weight into hidden layer k (k = 1..L; W_{L+1} the output layer's), C is 0.
WEIGHT_INDEX = "weight matrix k = Wk (0: C)"


def layer_colorbar(fig: Figure, ax, n: int, label: str = "hidden layer", start: int = 1) -> None:
    """A colour bar numbering ``n`` series start..start + n - 1 (the colours of
    ``layer_colors``): hidden layers 1..L, or weight matrices 0 (C), 1 (W1), ..."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(start, start + max(n, 2) - 1), cmap=LAYER_CMAP)
    fig.colorbar(sm, ax=ax, label=label, pad=0.01, ticks=MaxNLocator(integer=True))


def legend_outside(ax, **kw) -> None:
    """The legend right of the axes, off the data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, **kw)


def hist(ax, values: np.ndarray, bins, **kw) -> None:
    """A density histogram (numpy + stairs: several times faster than seaborn's)."""
    density, edges = np.histogram(values, bins=bins, density=True)
    ax.stairs(density, edges, fill=True, alpha=0.6, **kw)
    ax.stairs(density, edges, color=kw.get("color", "C0"))


def setup() -> None:
    """Plot style and PNG output with fixed metadata (no timestamps in PNG anyway)."""
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "svg.hashsalt": "charlm"})


def note_html(note: Note | str) -> str:
    """A visible note where a figure or a panel could not be drawn (or is partial)."""
    note = Note(note) if isinstance(note, str) else note
    label = "Note:" if note.drawn else "Not drawn:"
    return f'<p class="figure-note"><strong>{label}</strong> {html.escape(note.text)}</p>'


def table_html(rows: list[dict] | pd.DataFrame, digits: int = 4) -> str:
    """An HTML table; floats with ``digits`` decimals, missing values as '–'."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return df.to_html(
        index=False,
        na_rep="–",
        border=0,
        classes="report-table",
        float_format=lambda x: f"{x:.{digits}f}",
    )


def _blank(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(
        0.5,
        0.5,
        "not drawn:\n" + text,
        ha="center",
        va="center",
        wrap=True,
        transform=ax.transAxes,
        fontsize=9,
        color="0.3",
    )


def _grid(n: int, width: float, height: float, ncols: int = 4):
    """A figure of ``n`` panels in rows of at most ``ncols``; unused panels hidden."""
    cols = min(n, ncols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def _finite_np(x: torch.Tensor | list) -> np.ndarray:
    a = np.asarray(x.detach().double().cpu() if isinstance(x, torch.Tensor) else x, float)
    return a[np.isfinite(a)]


# ---- training loss ------------------------------------------------------------------


def length_groups(inputs: Inputs) -> list[tuple[int, list[str]]]:
    """The variants grouped by run length (``max_steps``), shortest first, at most
    LEGEND_MAX a group (a longer group is split): one row of loss panels each, so that
    a 1,500-step run is not squeezed into the first pixels of a 200,000-step axis."""
    from reporting.stats import train_of

    by: dict[int, list[str]] = {}
    for v in inputs.variants:
        by.setdefault(train_of(inputs, v).max_steps, []).append(v)
    out = []
    for steps in sorted(by):
        vs = by[steps]
        out += [(steps, vs[i : i + LEGEND_MAX]) for i in range(0, len(vs), LEGEND_MAX)]
    return out


def loss_curves(inputs: Inputs) -> Drawn:
    """log10 training loss per window: canonical seed, and mean ± sd band across seeds;
    one row of panels per run length (``length_groups``), each with its own step axis."""
    frames, notes = [], []
    for v in inputs.variants:
        c = inputs.diagnostics[v].curve
        y = c.log10_loss.double().numpy()  # (W, S)
        W, S = y.shape
        frames.append(pd.DataFrame({
            "step": np.repeat(c.step.numpy(), S), "seed": np.tile(np.arange(S), W),
            "log10 loss": y.reshape(-1), "variant": v,
        }))  # fmt: skip
        if not np.isfinite(y).all():
            bad = int((~np.isfinite(y).all(0)).sum())
            notes.append(
                Note(
                    f"{v}: {bad} seed(s) have non-finite windows (divergence); "
                    f"those points are left out.",
                    drawn=True,
                )
            )
    df = pd.concat(frames, ignore_index=True).replace([np.inf, -np.inf], np.nan).dropna()
    if df.empty:
        return None, [*notes, Note("no finite training loss in any variant.")]
    window = inputs.diagnostics[inputs.variants[0]].curve.window
    groups = length_groups(inputs)
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 3.8 * len(groups)), squeeze=False)
    uniform = math.log10(math.log(inputs.counts["vocab_size"]))
    colors = dict(zip(inputs.variants, sns.color_palette("tab10", 10) * 10, strict=False))
    for row, (steps, vs) in zip(axes, groups, strict=True):
        sub = df[df["variant"].isin(vs)]
        marker = "o" if sub["step"].nunique() < 5 else None
        common = {"x": "step", "y": "log10 loss", "hue": "variant", "marker": marker,
                  "hue_order": vs, "palette": [colors[v] for v in vs]}  # fmt: skip
        canon = sub[sub["seed"] == 0]
        if canon.empty:
            _blank(row[0], "the canonical seed diverged everywhere")
        else:
            sns.lineplot(data=canon, ax=row[0], legend=False, **common)
            row[0].set_title(f"runs of {steps:,} steps: canonical seed", fontsize=10)
        if sub.empty:
            _blank(row[1], "no finite loss")
        else:
            sns.lineplot(data=sub, errorbar="sd", estimator="mean", ax=row[1], **common)
            row[1].set_title(f"runs of {steps:,} steps: mean, band ±1 sd over seeds", fontsize=10)
            legend_outside(row[1], title="variant")
        for ax in row:
            if ax.has_data():
                ax.axhline(uniform, ls=":", c="0.4", lw=1)
                ax.set_xlim(0, steps)
                ax.set_xlabel("step")
                ax.set_ylabel("log10 loss")
    fig.suptitle(
        f"training loss: mean of log10(minibatch loss) over windows of {window} steps "
        f"(dotted: log10 ln {inputs.counts['vocab_size']})",
        fontsize=11,
    )
    fig.tight_layout()
    return fig, notes


def seed_points(inputs: Inputs) -> Drawn:
    """Per-seed split losses as points (strip plot) with the published value marked."""
    reference = inputs.params.report.reference
    rows, notes = [], []
    for v in inputs.variants:
        ps = inputs.metrics[v]["per_seed"]
        for k in SPLITS:
            for i, x in enumerate(ps[k]):
                if x is not None and math.isfinite(x):
                    rows.append({"variant": v, "split": k, "seed": i, "loss": x})
        if inputs.metrics[v]["n_diverged"]:
            notes.append(
                Note(
                    f"{v}: {inputs.metrics[v]['n_diverged']} diverged seed(s) have "
                    f"no split losses and are not shown.",
                    drawn=True,
                )
            )
    if not rows:
        return None, [*notes, Note("no finite split loss in any variant.")]
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    np.random.seed(0)  # seaborn's jitter draws from numpy's global generator
    for ax, k in zip(axes, SPLITS, strict=True):
        sub = df[df["split"] == k]
        sns.stripplot(
            data=sub,
            x="variant",
            y="loss",
            hue="variant",
            order=inputs.variants,
            hue_order=inputs.variants,
            jitter=0.15,
            size=6,
            legend=False,
            ax=ax,
        )
        for j, v in enumerate(inputs.variants):
            ref = None if v not in reference else getattr(reference[v], k)
            if ref is not None:
                ax.plot(
                    [j - 0.35, j + 0.35],
                    [ref, ref],
                    c="crimson",
                    lw=2,
                    label="published" if j == 0 or not ax.get_legend_handles_labels()[0] else None,
                )
        ax.set_title(f"{k} loss per seed")
        ax.set_xlabel("variant")
        ax.set_ylabel(f"{k} loss (nats)")
        ax.tick_params(axis="x", labelrotation=30)  # five and more names would overlap
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig, notes


def knob_figure(inputs: Inputs, split: str = "val") -> Drawn:
    """One panel per family of ``reporting.stats.knob_families``: the ``split`` loss of
    every seed (small points) and its mean (large) against the knob's value (depth and
    width on a numeric axis), coloured by training schedule so that runs of different
    lengths or seed counts are not read as one curve."""
    from reporting.stats import knob_families, knob_value, schedule

    families = knob_families(inputs)
    if not families:
        return None, [Note("no variants differ in one architecture knob only.")]
    fig, flat = _grid(len(families), 6.5, 3.6, ncols=2)
    notes = []
    for ax, (knob, vs) in zip(flat, families, strict=True):
        numeric = knob in ("depth", "width")
        values = [knob_value(inputs, v, knob) for v in vs]
        order = sorted(set(values), key=lambda x: float(x) if numeric else values.index(x))
        pos = {x: (float(x) if numeric else i) for i, x in enumerate(order)}
        scheds = list(dict.fromkeys(schedule(inputs, v) for v in vs))
        for j, sched in enumerate(scheds):
            members = [v for v in vs if schedule(inputs, v) == sched]
            xs, means = [], []
            for v in members:
                x = pos[knob_value(inputs, v, knob)]
                ys = [y for y in inputs.metrics[v]["per_seed"][split]
                      if y is not None and math.isfinite(y)]  # fmt: skip
                if not ys:
                    notes.append(Note(f"{v}: no finite {split} loss (every seed diverged).", True))
                    continue
                ax.scatter([x] * len(ys), ys, s=10, alpha=0.5, color=f"C{j}")
                xs.append(x)
                means.append(float(np.mean(ys)))
            if xs:
                order_x = np.argsort(xs)
                ax.plot(np.array(xs)[order_x], np.array(means)[order_x], marker="o", ms=7,
                        color=f"C{j}", label=sched)  # fmt: skip
        for v in vs:  # name every point
            x = pos[knob_value(inputs, v, knob)]
            ys = [y for y in inputs.metrics[v]["per_seed"][split] if y is not None]
            if ys:
                ax.annotate(v, (x, max(ys)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if not numeric:
            ax.set_xticks(range(len(order)), order, fontsize=8)
        elif knob == "depth":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("hidden layers" if knob == "depth" else knob)
        ax.set_ylabel(f"{split} loss (nats)")
        ax.set_title(f"{split} loss by {knob} (seeds: small points)", fontsize=10)
        legend_outside(ax, title="training") if len(scheds) > 1 else None
    fig.tight_layout()
    return fig, notes


# ---- activations ----------------------------------------------------------------------


def activation_figure(inputs: Inputs, v: str, layer: int = 0) -> Drawn:
    """Histogram of h and the saturation image, at init and after training (one seed),
    of hidden layer ``layer`` (0: the first). Saturation follows the variant's
    nonlinearity (``reporting.stats.saturation_rule``: tanh |h| > t, sigmoid |2h - 1| > t,
    relu h = 0, the units that never fire); linear and gelu have none, and only the
    histograms are drawn. The histograms' range follows the data (shared by both)."""
    d = inputs.diagnostics[v].layers[layer].activations
    top = max(inputs.diagnostics[v].thresholds)
    kind = nonlinearity(inputs, v)
    rule = saturation_rule(kind, top)
    seed = first_good_seed(inputs, v)
    notes = []
    if rule is None:
        fig, axes = plt.subplots(1, 2, figsize=(15, 3.1))
        pairs = [(axes[0], None), (axes[1], None)]
    else:
        fig, axes = plt.subplots(
            1, 4, figsize=(15, 3.1), gridspec_kw={"width_ratios": [1, 1.5, 1, 1.5]}
        )
        pairs = [(axes[0], axes[1]), (axes[2], axes[3])]
    seeds = {"init": 0, "final": 0 if seed is None else seed}
    values = {when: _finite_np(d[when].h[s]) for when, s in seeds.items()}
    finite = [x for x in values.values() if x.size]
    edges = None
    if finite:
        both = np.concatenate(finite)
        lo, hi = float(both.min()), float(both.max())
        edges = np.linspace(lo, hi, H_BINS + 1) if hi > lo else np.linspace(lo - 1, hi + 1, 3)
    for (ax_h, ax_i), (when, s) in zip(pairs, seeds.items(), strict=True):
        vals = values[when]
        if vals.size == 0:
            msg = f"{v}, {when}: no finite activation (seed {s} diverged)"
            for ax in (ax_h, ax_i):
                if ax is not None:
                    _blank(ax, msg)
            notes.append(Note(msg + "."))
            continue
        hist(ax_h, vals, edges)
        ax_h.set_title(f"h at {when} ({seed_name(inputs, v, s)})", fontsize=10)
        ax_h.set_xlabel(f"h ({kind} output)")
        ax_h.set_ylabel("density")
        if ax_i is None:
            continue
        img = d[when].image[s].numpy()
        ax_i.imshow(img, cmap="gray", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
        dead = int(img.all(0).sum())
        units = "unit(s) never fire" if kind == "relu" else "dead unit(s)"
        ax_i.set_title(f"{rule} at {when}: {img.mean():.1%} white, {dead} {units}", fontsize=10)
        ax_i.set_xlabel("hidden unit")
        ax_i.set_ylabel("probe example")
        ax_i.grid(False)
    n_layers = len(inputs.diagnostics[v].layers)
    title = v if n_layers == 1 else f"{v}, hidden layer {layer + 1} of {n_layers}"
    if rule is None:
        title += f" ({no_saturation(kind)}: no saturation image)"
    fig.suptitle(title, x=0.01, ha="left", fontsize=12, fontweight="bold")
    fig.tight_layout()
    return fig, notes


# ---- gradients ------------------------------------------------------------------------


def gradient_hist(inputs: Inputs, layer: int = 0) -> Drawn:
    """Histogram of dloss/dh at init on the probe batch, one panel per variant, at the
    output of hidden layer ``layer`` (0: the first)."""
    vs = inputs.variants
    fig, flat = _grid(len(vs), 4.4, 3.2)
    notes = []
    for ax, v in zip(flat, vs, strict=False):
        dh = inputs.diagnostics[v].layers[layer].dh[0]
        vals = _finite_np(dh)
        if vals.size == 0:
            _blank(ax, f"{v}: no finite gradient")
            notes.append(Note(f"{v}: the gradient at h has no finite value."))
        elif not np.any(vals):
            _blank(ax, f"{v}: the gradient at h is exactly 0")
            notes.append(
                Note(
                    f"{v}: the gradient at h is exactly zero on every example and "
                    f"unit (e.g. a zero output weight blocks it), so there is no distribution to "
                    f"draw."
                )
            )
        else:
            hist(ax, vals, 50)
            ax.set_title(f"{v}: dloss/dh at init (std {vals.std():.2e})", fontsize=10)
            ax.set_xlabel(f"dloss/dh (hidden layer {layer + 1})")
            ax.set_ylabel("density")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    return fig, notes


def gradient_rows(inputs: Inputs) -> list[dict]:
    """Per variant and weight matrix (the model's parameter names): grad mean, std and
    grad:data std ratio at init."""
    rows = []
    for v in inputs.variants:
        labels = weight_labels(inputs.diagnostics[v].weights)
        for w, g in inputs.diagnostics[v].weights.items():
            ratio = g.grad_data_ratio.double()
            rows.append({
                "variant": v, "weight": labels[w], "parameter": w,
                "grad mean (canonical seed)": f"{float(g.grad_mean[0]):+.3e}",
                "grad std (canonical seed)": f"{float(g.grad_std[0]):.3e}",
                "grad:data (canonical seed)": fmt(float(ratio[0]), 4),
                "grad:data over seeds": fmt_mean_std(ratio.tolist(), 4),
            })  # fmt: skip
    return rows


def update_ratio_figure(inputs: Inputs) -> Drawn:
    """log10(std(lr*grad)/std(param)) per weight over training, mean ± sd over seeds,
    with the 1e-3 guide; one panel per variant (rows of 4). Weight matrices coloured
    along LAYER_CMAP with a colour bar when there are more than LEGEND_MAX."""
    vs = inputs.variants
    fig, flat = _grid(len(vs), 4.8, 3.4)
    notes = []
    for ax, v in zip(flat, vs, strict=True):
        d = inputs.diagnostics[v]
        labels = weight_labels(d.weights)
        steps = d.update_steps.numpy()
        series = [(labels[w], rec.update_ratio.double().numpy())
                  for w, rec in d.weights.items() if rec.update_ratio is not None]  # fmt: skip
        n_bad = sum(int((~np.isfinite(y)).sum()) for _, y in series)
        n_all = sum(y.size for _, y in series)
        colors = layer_colors(len(series)) if len(series) > LEGEND_MAX else [None] * len(series)
        drawn = 0
        for (label, y), color in zip(series, colors, strict=True):
            y = np.where(np.isfinite(y), y, np.nan)
            ok = np.isfinite(y).any(1)
            if not ok.any():
                continue
            m = np.nanmean(y[ok], 1)
            sd = np.nanstd(y[ok], 1, ddof=1) if y.shape[1] > 1 else np.zeros_like(m)
            (line,) = ax.plot(steps[ok], m, label=label, color=color,
                              marker="o" if ok.sum() < 5 else None)  # fmt: skip
            ax.fill_between(steps[ok], m - sd, m + sd, color=line.get_color(), alpha=0.15, lw=0)
            drawn += 1
        if not drawn:
            _blank(ax, f"{v}: no finite update ratio")
            notes.append(
                Note(
                    f"{v}: no update:data ratio is finite (a zero update gives "
                    f"log10 0 = -inf, a diverged seed NaN)."
                )
            )
            continue
        if n_bad:
            notes.append(
                Note(
                    f"{v}: {n_bad} of {n_all} records are not finite "
                    f"(a zero update gives log10 0 = -inf; a diverged seed gives "
                    f"NaN) and are left out.",
                    drawn=True,
                )
            )
        ax.axhline(-3, ls="--", c="k", lw=1, label="1e-3 guide")
        ax.set_xlabel("step")
        ax.set_ylabel("log10 update:data")
        ax.set_title(f"{v}: update:data (mean ± sd over seeds)", fontsize=10)
        if len(series) > LEGEND_MAX:
            layer_colorbar(fig, ax, len(series), WEIGHT_INDEX, start=0)
        else:
            ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return fig, notes


def activation_depth_figure(inputs: Inputs, v: str) -> Drawn:
    """Every hidden layer of a deep variant in one figure (instead of one figure per
    layer): the distribution of h per layer at init and after training as a heat-map
    (rows: hidden layers 1..L; colour: the share of the layer's values in each bin,
    range from the data), and per layer the std of h and the share that is flat in the
    nonlinearity's sense (``saturation_rule``; relu: zero), at init and after training."""
    layers = inputs.diagnostics[v].layers
    L = len(layers)
    kind = nonlinearity(inputs, v)
    top = max(inputs.diagnostics[v].thresholds)
    rule = saturation_rule(kind, top)
    seed = first_good_seed(inputs, v)
    seeds = {"init": 0, "final": 0 if seed is None else seed}
    values = {when: [_finite_np(layer.activations[when].h[s]) for layer in layers]
              for when, s in seeds.items()}  # fmt: skip
    finite = [x for xs in values.values() for x in xs if x.size]
    notes: list[Note] = []
    n_panels = 4 if rule is not None else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(16, 0.9 + 0.18 * L + 2.2), squeeze=False)
    axes = axes[0]
    if not finite:
        for ax in axes:
            _blank(ax, f"{v}: no finite activation")
        return fig, [Note(f"{v}: no finite activation in any layer.")]
    both = np.concatenate(finite)
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi, H_BINS + 1) if hi > lo else np.linspace(lo - 1, hi + 1, 3)
    for ax, (when, s) in zip(axes[:2], seeds.items(), strict=True):
        grid = np.full((L, len(edges) - 1), np.nan)
        for i, x in enumerate(values[when]):
            if x.size:
                grid[i] = np.histogram(x, bins=edges)[0] / x.size
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma",
                       extent=(edges[0], edges[-1], L + 0.5, 0.5))  # fmt: skip
        fig.colorbar(im, ax=ax, label="share of the layer's h", pad=0.01)
        ax.set_xlabel(f"h ({kind} output)")
        ax.set_ylabel("hidden layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"h per layer at {when} ({seed_name(inputs, v, s)})", fontsize=10)
        ax.grid(False)
        if any(x.size == 0 for x in values[when]):
            notes.append(Note(f"{v}, {when}: some layers have no finite h (blank rows).", True))
    idx = np.arange(1, L + 1)
    for ax in axes[2:]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for when, s in seeds.items():
        stds = [float(x.std()) if x.size else np.nan for x in values[when]]
        axes[2].plot(idx, stds, marker="o", ms=3, label=f"{when} ({seed_name(inputs, v, s)})")
    axes[2].set_xlabel("hidden layer")
    axes[2].set_ylabel("std of h")
    axes[2].set_title("spread of h per layer", fontsize=10)
    axes[2].legend(fontsize=8)
    if rule is not None:
        for when, s in seeds.items():
            share = [100 * float(a.activations[when].image[s].float().mean()) for a in layers]
            axes[3].plot(idx, share, marker="o", ms=3, label=f"{when} ({seed_name(inputs, v, s)})")
        axes[3].set_xlabel("hidden layer")
        axes[3].set_ylabel(f"% of h with {rule}")
        flat = "zero (off)" if kind == "relu" else "saturated"
        axes[3].set_title(f"% {flat} per layer", fontsize=10)
        axes[3].legend(fontsize=8)
    title = f"{v}: all {L} hidden layers"
    if rule is None:
        title += f" ({no_saturation(kind)})"
    fig.suptitle(title, x=0.01, ha="left", fontsize=12, fontweight="bold")
    fig.tight_layout()
    return fig, notes


# ---- BatchNorm ------------------------------------------------------------------------


def batchnorm_label(inputs: Inputs, v: str, index: int) -> str:
    """The BatchNorm module ``index`` (0-based, layer order) of variant ``v`` in words:
    'of hidden layer i' (numbered 1..L, as everywhere in the report; the BatchNorm sits
    between the layer's Linear and its nonlinearity) or 'of the output layer', from its
    VariantConfig (``batchnorm``: one per hidden layer; ``batchnorm_output``: one after
    the output Linear). Never the module's index in the model."""
    c = variant(inputs, v)
    hidden = c.layers if c.batchnorm else 0
    return f"of hidden layer {index + 1}" if index < hidden else "of the output layer"


def batchnorm_figure(inputs: Inputs, v: str) -> Drawn:
    """Running vs calibrated per-unit mean and std (every seed), with the y = x line,
    one row per BatchNorm module of the variant (layer order)."""
    layers = inputs.diagnostics[v].batchnorm.layers
    fig, axes = plt.subplots(len(layers), 2, figsize=(12, 3.4 * len(layers)), squeeze=False)
    notes = []
    for i, (row, bn) in enumerate(zip(axes, layers.values(), strict=True)):
        label = f"{v}, BatchNorm {batchnorm_label(inputs, v, i)}"
        for ax, stat in zip(row, ("mean", "std"), strict=True):
            run = getattr(bn, f"running_{stat}").double()
            cal = getattr(bn, f"calibrated_{stat}")
            if cal is None:
                _blank(ax, f"no calibrated {stat}")
                notes.append(Note(f"{label}: no calibrated statistics recorded."))
                continue
            cal = cal.double()
            S = run.shape[0]
            df = pd.DataFrame(
                {
                    f"calibrated {stat}": cal.reshape(-1).numpy(),
                    f"running {stat}": run.reshape(-1).numpy(),
                    "seed": np.repeat(np.arange(S), run.shape[1]).astype(str),
                }
            )
            df = df.replace([np.inf, -np.inf], np.nan).dropna()
            if df.empty:
                _blank(ax, f"no finite {stat}")
                notes.append(Note(f"{label}: no finite BatchNorm {stat} (diverged)."))
                continue
            sns.scatterplot(
                data=df, x=f"calibrated {stat}", y=f"running {stat}", hue="seed", s=12,
                alpha=0.7, legend=False, ax=ax,
            )  # fmt: skip
            lo = float(df.iloc[:, :2].min().min())
            hi = float(df.iloc[:, :2].max().max())
            ax.plot([lo, hi], [lo, hi], c="k", lw=1, ls=":")
            ax.set_title(f"{label}: per-unit {stat}, all seeds", fontsize=9)
    fig.tight_layout()
    return fig, notes
