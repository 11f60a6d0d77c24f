"""The depth atlas page: matplotlib figures embedded as PNG in one self-contained HTML
file (no notebook kernel: the atlas has dozens of cells and the page only draws), with a
table of contents. Hidden layers are numbered 1..L everywhere. Reads nothing itself.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from charlm import theory
from charlm.atlas_theory import arr, deepest, input_ms, predict

STATUS_CODE = {"trained": 0, "stalled": 1, "diverged": 2}
STATUS_LETTER = {"trained": "T", "stalled": "S", "diverged": "D"}


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i) for i in range(n)]


def heatmaps(train_cells: list[dict]) -> str:
    """Per family (nonlinearity, BatchNorm): median val loss over depth x gain, each
    square labelled T / S / D by its majority class; tanh maps carry 6 xi_c."""
    fams = sorted({(c["nonlinearity"], c["batchnorm"]) for c in train_cells})
    parts = []
    for nl, bn in fams:
        cells = sorted(
            (c for c in train_cells if c["nonlinearity"] == nl and c["batchnorm"] == bn),
            key=lambda c: c["depth"],
        )
        gains, depths = cells[0]["gains"], [c["depth"] for c in cells]
        with warnings.catch_warnings():  # every seed diverged: no val loss, NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            val = np.array([[np.nanmedian(arr(r)) for r in c["val_loss"]] for c in cells])
        fig, ax = plt.subplots(figsize=(6, 3))
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # no val loss: diverged
        im = ax.imshow(val, aspect="auto", origin="lower", cmap=cmap, vmin=2.0, vmax=3.3)
        for i, c in enumerate(cells):
            for j, row in enumerate(c["status"]):
                top = max(set(row), key=row.count)
                colour = "k" if not np.isfinite(val[i, j]) else "w"
                ax.text(j, i, STATUS_LETTER[top], ha="center", va="center", color=colour)
        ax.set_xticks(range(len(gains)), [f"{g:.2f}" for g in gains])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("gain")
        ax.set_ylabel("hidden layers L")
        ax.set_title(f"{nl}, BatchNorm {'on' if bn else 'off'}: median val loss (nats)")
        fig.colorbar(im, ax=ax, label="val loss (nats); grey: none (diverged)")
        if nl == "tanh" and not bn:
            logd = np.log2(depths)
            ys = []
            for g in gains:
                d = theory.trainable_depth(g, "tanh") if g > 0 else math.nan
                y = np.interp(np.log2(d), logd, range(len(depths))) if 0 < d < 1e9 else np.nan
                ys.append(y if np.isfinite(d) else len(depths) - 0.5)
            ax.plot(range(len(gains)), ys, "r--", label="6 xi_c (Schoenholz et al.)")
            ax.set_ylim(-0.5, len(depths) - 0.5)
            ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=8)
        parts.append(png(fig))
    return "\n".join(parts)


def _grad_prediction(p: dict, c: dict, gi: int, bn: bool) -> np.ndarray | None:
    """Predicted std(d loss / d x^l), l = 1..L, anchored at the measured layer L (the
    theory gives ratios between layers; the output layer sets the scale)."""
    L = c["depth"]
    last = float(arr(c["stats"]["grad_std"]["median"])[gi, L - 1])
    if not math.isfinite(last) or L < 2:
        return None
    if bn:
        growth = p.get("grad_growth", math.nan)
        if not math.isfinite(growth):
            return None
        return last * growth ** ((L - np.arange(1, L + 1)) / 2.0)
    q = np.asarray(p["pre_std"], dtype=np.float64) ** 2
    if not np.isfinite(q).all():
        return None
    g = c["gains"][gi]
    return last * np.sqrt(theory.gradient_ratio(q, g, c["nonlinearity"]))


# Panels of a profile figure: (statistic, y label, log scale, has a theory curve).
PANELS = (
    ("pre_std", "pre-activation std", True),
    ("saturated", None, False),
    ("grad_std", "std of d loss / d x^l (nats)", True),
    ("act_std", "activation std", True),
    ("grad_data", "grad:data ratio of W^l", True),
    ("cosine", "cosine similarity, distinct contexts", False),
)
SHARE_LABEL = {"relu": "share of zeros", "tanh": "saturated share", "sigmoid": "saturated share"}


def profiles(cells: list[dict], batch_size: int = 32) -> str:
    """The deepest cell of every (nonlinearity, BatchNorm) family: per hidden layer
    l = 1..L, the median and 10-90% band over seeds of each PANELS statistic per gain,
    the theory's curve dashed where it has one (pre-activation and activation std,
    saturated / zero share; the gradient std anchored at layer L)."""
    parts = []
    for nl in theory.NONLINEARITIES:
        for bn in (False, True):
            c = deepest(cells, nl, bn)
            if c is None:
                continue
            L = c["depth"]
            layers = np.arange(1, L + 1)
            fig, axes = plt.subplots(2, 3, figsize=(13, 6.2))
            colours = _colours(len(c["gains"]))
            for gi, (g, col) in enumerate(zip(c["gains"], colours, strict=True)):
                p = predict(nl, g, L, input_ms(c, gi), bn, batch_size, threshold=c["threshold"])
                preds = {
                    "pre_std": p["pre_std"],
                    "saturated": p["saturated"],
                    "act_std": p["act_std"],
                    "grad_std": _grad_prediction(p, c, gi, bn),
                }
                for ax, (stat, _, _) in zip(axes.flat, PANELS, strict=True):
                    st = c["stats"][stat]
                    med, lo, hi = (arr(st[k])[gi] for k in ("median", "q10", "q90"))
                    ax.plot(layers, med, color=col, label=f"gain {g:.2f}")
                    ax.fill_between(layers, lo, hi, color=col, alpha=0.2)
                    pred = preds.get(stat)
                    if pred is not None and np.isfinite(np.asarray(pred, dtype=float)).any():
                        ax.plot(layers, pred, color=col, ls="--", lw=1)
            for ax, (stat, label, log) in zip(axes.flat, PANELS, strict=True):
                if log:
                    ax.set_yscale("log")
                ax.set_xlabel("hidden layer l")
                ax.set_ylabel(label or SHARE_LABEL.get(nl, "saturated share (none: no bound)"))
                if stat == "saturated" and nl not in SHARE_LABEL:
                    ax.text(0.5, 0.5, f"{nl} does not saturate", ha="center",
                            transform=ax.transAxes)  # fmt: skip
            fig.suptitle(f"{nl}, BatchNorm {'on' if bn else 'off'}, L={L}, width {c['width']}: "
                         "measured (median, band 10-90% over seeds), theory dashed")  # fmt: skip
            axes[0, 2].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
            fig.tight_layout()
            parts.append(png(fig))
    return "\n".join(parts)


def gradient_ratio_figure(cells: list[dict], batch_size: int) -> str:
    """std(d loss / d x^1) / std(d loss / d x^L) against depth at each nonlinearity's
    default gain, without and with BatchNorm: measured median and band, predicted."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=True)
    colours = dict(zip(theory.NONLINEARITIES, _colours(len(theory.NONLINEARITIES)), strict=True))
    for ax, bn in zip(axes, (False, True), strict=True):
        for nl in theory.NONLINEARITIES:
            mine = sorted(
                (c for c in cells if c["nonlinearity"] == nl and c["batchnorm"] == bn),
                key=lambda c: c["depth"],
            )
            if not mine:
                continue
            g0 = theory.default_gain(nl)
            gi = int(np.argmin([abs(g - g0) for g in mine[0]["gains"]]))
            ds = [c["depth"] for c in mine]
            s = [c["stats"]["grad_ratio"] for c in mine]
            med = [arr(x["median"])[gi] for x in s]
            lo, hi = [arr(x["q10"])[gi] for x in s], [arr(x["q90"])[gi] for x in s]
            col = colours[nl]
            ax.plot(ds, med, "o-", color=col, label=f"{nl} measured")
            ax.fill_between(ds, lo, hi, color=col, alpha=0.2)
            pred = [predict(nl, mine[0]["gains"][gi], c["depth"], input_ms(c, gi), bn,
                            batch_size)["grad_ratio"] for c in mine]  # fmt: skip
            ax.plot(ds, pred, "x--", color=col, label=f"{nl} predicted")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden layers L")
        ax.set_title(f"BatchNorm {'on' if bn else 'off'}, calculate_gain of each")
    axes[0].set_ylabel("grad std, layer 1 / layer L")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return png(fig)


def he_figure(runs: list[dict]) -> tuple[str, str]:
    """Training-loss curves of He et al.'s analogue (median over seeds), one panel per
    lr (``runs``: the atlas_he stage's cells, lr first, then lower_lr), and the sentence
    that says what they show. He et al.'s rule holds when gain sqrt 2 trains and gain 1
    does not (stalls) at the lr where no arm diverged."""
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.2), squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        w = r["curve_window"]
        for gi, (g, col) in enumerate(zip(r["gains"], _colours(len(r["gains"])), strict=True)):
            curve = np.nanmedian(arr(r["curve"][gi]), axis=0)
            ax.plot(np.arange(len(curve)) * w, curve, color=col, label=f"gain {g:.3g}")
        ax.axhline(r["baseline"], color="k", ls=":", label="unigram baseline")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats)")
        ax.set_title(f"relu, {r['depth']} hidden layers, no BN, lr {r['lr']:g}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)

    def arms(r: dict) -> str:
        return "; ".join(
            f"gain {g:.3g}: val {np.nanmedian(arr(r['val_loss'][gi])):.3f} nats "
            f"({', '.join(r['status'][gi])})"
            for gi, g in enumerate(r["gains"])
        )

    first = runs[0]
    diverged = any(x == "diverged" for row in first["status"] for x in row)
    why = (
        f"an arm diverged at lr {first['lr']:g}, so both arms ran again at a lower lr"
        if diverged
        else f"no arm diverged at lr {first['lr']:g}; both arms also ran at a lower lr"
    )
    sentence = (
        f"relu, {first['depth']} hidden layers of {first['width']}, no BatchNorm, "
        f"{first['steps']} steps, median over {len(first['seeds'])} seeds ({why}): "
        + " | ".join(f"lr {r['lr']:g}: {arms(r)}" for r in runs)
        + ". "
        + " ".join(_he_verdict(r) for r in runs)
    )
    return png(fig), sentence


def _he_verdict(r: dict) -> str:
    """Whether one lr's run shows He et al.'s finding (gain sqrt 2 trains, gain 1 does
    not), from its classes; every seed must agree."""
    by_gain = {round(g, 3): r["status"][gi] for gi, g in enumerate(r["gains"])}
    one, he = by_gain.get(1.0), by_gain.get(round(math.sqrt(2), 3))
    if one is None or he is None:
        return ""
    lr = f"At lr {r['lr']:g}"
    if all(x == "trained" for x in he) and all(x != "trained" for x in one):
        return f"{lr}, as in He et al.: gain sqrt 2 trains and gain 1 does not."
    if all(x != "trained" for x in he + one):
        return (f"{lr}, neither gain trains in {r['steps']} steps (gain 1: {', '.join(one)}; "
                f"sqrt 2: {', '.join(he)}): not He et al.'s contrast.")  # fmt: skip
    return (f"{lr}, not He et al.'s contrast: gain 1 is {', '.join(one)} and gain sqrt 2 "
            f"is {', '.join(he)} over the seeds.")  # fmt: skip


def trainability_intro(train_cells: list[dict]) -> str:
    """What the heatmaps' letters mean, and one generated sentence per family."""
    if not train_cells:
        return "<p>No trainability cells in the grid.</p>"
    c0 = train_cells[0]
    out = [
        f"<p>Each model trains {c0['steps']} steps of minibatch SGD (batch {c0['batch_size']}, "
        f"constant lr {c0['lr']:g}, {len(c0['seeds'])} seeds per gain, width {c0['width']}). "
        "T: trained (val loss below the unigram baseline by more than "
        f"{c0['margin']:g} nats; baseline {c0['baseline']:.3f} nats, the best model that "
        "ignores its input); S: stalled (no better than that); D: diverged (a non-finite "
        "loss). Letters show the majority over seeds; colour the median val loss.</p><ul>"
    ]
    fams = sorted({(c["nonlinearity"], c["batchnorm"]) for c in train_cells})
    for nl, bn in fams:
        cells = sorted((c for c in train_cells if (c["nonlinearity"], c["batchnorm"]) == (nl, bn)),
                       key=lambda c: c["depth"])  # fmt: skip
        bad = []
        for c in cells:
            for gi, g in enumerate(c["gains"]):
                st = c["status"][gi]
                if any(x != "trained" for x in st):
                    bad.append(f"L={c['depth']} gain {g:.3g} ({'/'.join(st)})")
        n = sum(len(c["gains"]) for c in cells)
        fam = f"{nl}, BatchNorm {'on' if bn else 'off'}"
        if not bad:
            out.append(f"<li>{fam}: every model of the {n} (depth, gain) points trained.</li>")
        else:
            out.append(f"<li>{fam}: {len(bad)} of {n} (depth, gain) points have a model that "
                       f"did not train: {'; '.join(bad)}.</li>")  # fmt: skip
    return "".join(out) + "</ul>"


# The full atlas that `make atlas-full` runs (docs/atlas.md): its trainability grid, for
# the cost estimate below.
FULL_ATLAS = {
    "depths": [1, 2, 4, 8, 16, 32, 64],
    "families": 10,  # 5 nonlinearities x BatchNorm off/on
    "gains": 9,  # 8 factors of calculate_gain + gain 1
    "seeds": 8,
    "steps": 20_000,
}


def cost(records: list[dict], cfg) -> str:
    """Where each atlas stage's cells ran (from the run records), and the full atlas's
    cost extrapolated from the measured training cells: CPU seconds per model x step x
    hidden layer (median over cells, width atlas.train.width) times the full grid's
    models x steps x layers. An upper estimate: each cell's time includes its fixed
    val-loss pass and the build of its models."""
    rows, rates = [], []
    for r in records:
        d = r.get("dask")
        if not d:
            continue
        rows.append({
            "stage": r["stage"], "cells": d["cells"], "workers": d["workers"],
            "scheduler": "embedded (in-process)" if d["embedded"] else d["scheduler"],
            "wall s": r["seconds"], "cells' CPU s": sum(d["cell_cpu_seconds"].values()),
        })  # fmt: skip
        if r["stage"].startswith("atlas_train@"):
            depth = int(r["stage"].split("@")[1])
            t = cfg.train
            for cid, cpu in d["cell_cpu_seconds"].items():
                nl = cid.split("-")[0]
                n_gains = len({round(f * theory.default_gain(nl), 12) for f in t.gain_factors}
                              | {round(float(g), 12) for g in cfg.extra_gains})  # fmt: skip
                rates.append(cpu / (n_gains * len(t.seeds) * t.steps * depth))
    html_ = table(rows, ["stage", "cells", "workers", "scheduler", "wall s", "cells' CPU s"])
    if rates:
        rate = float(np.median(rates))
        f = FULL_ATLAS
        total = rate * f["families"] * f["gains"] * f["seeds"] * f["steps"] * sum(f["depths"])
        html_ += (
            f"<p>Training costs {rate * 1e6:.0f} CPU-microseconds per model x step x hidden "
            f"layer at width {cfg.train.width} (median over {len(rates)} cells, val pass "
            "included). The full trainability atlas of <code>make atlas-full</code> (depths "
            f"{f['depths']}, 5 nonlinearities x BatchNorm off/on, {f['gains']} gains, "
            f"{f['seeds']} seeds, {f['steps']:,} steps) would take about "
            f"{total / 3600:,.0f} CPU-hours: at best {total / 3600 / 2:,.0f} hours on a "
            "2-core machine with both cores busy (2 local worker processes came to 1.7x "
            "here), or a few hours on a cluster (docs/cluster.md).</p>"
        )
    return html_


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def page(sections: list[tuple[str, str, str]], intro: str) -> str:
    """sections: (anchor, title, html body) -> one HTML document with a contents list."""
    toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t, _ in sections)
    body = "".join(f'<h2 id="{a}">{html.escape(t)}</h2>\n{b}\n' for a, t, b in sections)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:"
             "collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}")  # fmt: skip
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Depth atlas</title>"
            f"<style>{style}</style></head><body><h1>The depth atlas</h1><p>{intro}</p>"
            f"<h2>Contents</h2><ol>{toc}</ol>{body}</body></html>\n")  # fmt: skip
