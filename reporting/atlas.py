"""The depth atlas page: matplotlib figures embedded as PNG in one self-contained HTML
file (no notebook kernel: the atlas has dozens of cells and the page only draws), with a
table of contents. Hidden layers are numbered 1..L everywhere. Reads nothing itself.
"""

from __future__ import annotations

import base64
import html
import io
import math

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
        val = np.array([[np.nanmedian(arr(r)) for r in c["val_loss"]] for c in cells])
        fig, ax = plt.subplots(figsize=(6, 3))
        im = ax.imshow(val, aspect="auto", origin="lower", cmap="viridis", vmin=2.0, vmax=3.3)
        for i, c in enumerate(cells):
            for j, row in enumerate(c["status"]):
                top = max(set(row), key=row.count)
                ax.text(j, i, STATUS_LETTER[top], ha="center", va="center", color="w")
        ax.set_xticks(range(len(gains)), [f"{g:.2f}" for g in gains])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("gain")
        ax.set_ylabel("hidden layers L")
        ax.set_title(f"{nl}, BatchNorm {'on' if bn else 'off'}: median val loss (nats)")
        fig.colorbar(im, ax=ax, label="val loss (nats)")
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


def profiles(cells: list[dict]) -> str:
    """Deepest cell per nonlinearity, no BatchNorm: pre-activation std, saturated/zero
    share and gradient std per layer, median and 10-90% band per gain, theory dashed."""
    parts = []
    for nl in theory.NONLINEARITIES:
        c = deepest(cells, nl, False)
        if c is None:
            continue
        L = c["depth"]
        layers = np.arange(1, L + 1)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
        colours = _colours(len(c["gains"]))
        for gi, (g, col) in enumerate(zip(c["gains"], colours, strict=True)):
            p = predict(nl, g, L, input_ms(c, gi), threshold=c["threshold"])
            for ax, stat, pred in (
                (axes[0], "pre_std", p["pre_std"]),
                (axes[1], "saturated", p["saturated"]),
                (axes[2], "grad_std", None),
            ):
                s = c["stats"][stat]
                med, lo, hi = (arr(s[k])[gi] for k in ("median", "q10", "q90"))
                ax.plot(layers, med, color=col, label=f"gain {g:.2f}")
                ax.fill_between(layers, lo, hi, color=col, alpha=0.2)
                if pred is not None:
                    ax.plot(layers, pred, color=col, ls="--", lw=1)
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")
        axes[0].set_ylabel("pre-activation std")
        share = {"relu": "share of zeros", "tanh": "saturated share", "sigmoid": "saturated share"}
        axes[1].set_ylabel(share.get(nl, "saturated share (n/a)"))
        axes[2].set_ylabel("std of d loss / d x (nats)")
        for ax in axes:
            ax.set_xlabel("hidden layer l")
        axes[0].set_title(f"{nl}, L={L}: measured (band 10-90%), theory dashed")
        axes[2].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
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


def he_figure(he: dict) -> tuple[str, str]:
    """Training-loss curves of the He et al. analogue's arms (median over seeds), one
    panel per lr, and the sentence that says what they show."""
    runs = he["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.2), squeeze=False)
    words = []
    for ax, r in zip(axes[0], runs, strict=True):
        w = r["curve_window"]
        for gi, (g, col) in enumerate(zip(r["gains"], _colours(len(r["gains"])), strict=True)):
            curve = np.nanmedian(arr(r["curve"][gi]), axis=0)
            ax.plot(np.arange(len(curve)) * w, curve, color=col, label=f"gain {g:.3g}")
            v = np.nanmedian(arr(r["val_loss"][gi]))
            words.append(
                f"gain {g:.3g} at lr {r['lr']:g}: val {v:.3f} nats ({', '.join(r['status'][gi])})"
            )
        ax.axhline(r["baseline"], color="k", ls=":", label="unigram baseline")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats)")
        ax.set_title(f"relu, {r['depth']} hidden layers, no BN, lr {r['lr']:g}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    note = " (an arm diverged at the first lr, so both ran again at the lower lr)" if he[
        "diverged_at_lr"] else ""  # fmt: skip
    sentence = (f"He et al.'s analogue, {runs[0]['steps']} steps, median over "
                f"{len(runs[0]['seeds'])} seeds{note}: " + "; ".join(words) + ".")  # fmt: skip
    return png(fig), sentence


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
