"""The sweep report's gain sensitivity of the deep variants: loss and activation health.

A deep variant's metrics (reports/metrics.json) carry ``depth.final.{std_first,
std_last, saturated_max, ...}``: the std of the first and of the last hidden layer's
output at the last training step and the largest share of saturated units (%), means
over seeds. Against the variant's gain they show where activations vanish (small gain:
the std shrinks layer by layer, std_last << std_first) or saturate (large gain) without
BatchNorm, and whether BatchNorm holds. A run counts for a variant when every parameter
that can change that variant's numbers (its own entry and the global sections) is the
baseline's but the gain, so a grid or two separate sweeps both work. No DVC, no file I/O.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from tools.sweep_figures import _png, affected, numeric, same_value

MOMENT = "final"  # metrics depth.<moment>.*: the last training step
HEALTH = ("std_first", "std_last", "saturated_max")


def resolve_gains(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat params with every ``variants.<v>.gain: null`` replaced by its value,
    ``torch.nn.init.calculate_gain(nonlinearity)`` (tanh when the key is absent: 5/3),
    so that a null baseline gain is a point on the gain axis."""
    out = dict(flat)
    for key, value in flat.items():
        parts = key.split(".")
        if value is None and len(parts) == 3 and parts[0] == "variants" and parts[2] == "gain":
            kind = flat.get(f"variants.{parts[1]}.nonlinearity") or "tanh"
            out[key] = float(torch.nn.init.calculate_gain(kind))
    return out


def gain_table(runs: list, metric: str = "val") -> pd.DataFrame:
    """One row per deep variant and gain: ``metric`` loss (mean, std over seeds) and the
    activation health ``depth.final.*``, from the finished ``runs`` (tools.sweep_report.Run)
    whose parameters differ from the (first) baseline's for that variant by the gain
    only; the baseline's row first, one row per gain. Columns: variant, gain, loss, std,
    std_first, std_last, saturated_max (%), experiment, baseline."""
    done = [r for r in runs if r.state in ("baseline", "success") and not r.error]
    base = next((r for r in done if r.baseline), None)
    if base is None:
        return pd.DataFrame()
    rows = []
    for run in sorted(done, key=lambda r: not r.baseline):
        for v, m in run.metrics.items():
            health = ((m.get("depth") or {}).get(MOMENT)) or {}
            key = f"variants.{v}.gain"
            keys = {k for k in (*base.params, *run.params) if affected(k, [v]) and k != key}
            if not health or any(
                same_value(base.params.get(k)) != same_value(run.params.get(k)) for k in keys
            ):
                continue
            gain = numeric(key, run.params.get(key))
            loss = (m.get("mean") or {}).get(metric, m.get(metric))
            if gain is None or loss is None or not math.isfinite(loss):
                continue
            rows.append({
                "variant": v, "gain": gain, "loss": loss,
                "std": (m.get("std") or {}).get(metric),
                **{h: health.get(h) for h in HEALTH},
                "experiment": run.name, "baseline": run.baseline,
            })  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.drop_duplicates(["variant", "gain"])  # the baseline's row kept
    return table.sort_values(["variant", "gain"], kind="stable").reset_index(drop=True)


def swept(table: pd.DataFrame) -> list[str]:
    """The deep variants with two or more gains in ``table``."""
    if table.empty:
        return []
    n = table.groupby("variant", sort=False)["gain"].nunique()
    return [v for v in n.index if n[v] > 1]


def figure(table: pd.DataFrame, metric: str = "val") -> str:
    """PNG (base64): ``metric`` loss, activation std of the first and last hidden layer,
    and the largest saturated share, each against the gain, one colour per deep variant
    (only variants with two or more gains); the baseline's gain starred."""
    sns.set_theme(style="whitegrid", context="notebook")
    variants = swept(table)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    colours = dict(zip(variants, sns.color_palette(n_colors=len(variants)), strict=True))
    for v in variants:
        d = table[table["variant"] == v]
        c = colours[v]
        axes[0].errorbar(d["gain"], d["loss"], yerr=d["std"].fillna(0).astype(float),
                         marker="o", capsize=3, color=c, label=v)  # fmt: skip
        axes[1].plot(d["gain"], d["std_last"], marker="o", color=c, label=f"{v}: last layer")
        axes[1].plot(d["gain"], d["std_first"], marker="s", ls=":", color=c,
                     label=f"{v}: first layer")  # fmt: skip
        axes[2].plot(d["gain"], d["saturated_max"], marker="o", color=c, label=v)
        b = d[d["baseline"]]
        for ax, y in zip(axes, ("loss", "std_last", "saturated_max"), strict=True):
            ax.scatter(b["gain"], b[y], marker="*", s=220, color=c, edgecolor="black", zorder=5)
    titles = (
        f"{metric} loss (mean ± std over seeds)",
        "std of hidden activations (final step)",
        "largest % saturated in a hidden layer (final step)",
    )
    ylabels = (f"{metric} loss (nats)", "std of output", "% |out| > threshold")
    for ax, title, ylabel in zip(axes, titles, ylabels, strict=True):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("gain")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    return _png(fig)


def section(runs: list, metric: str = "val") -> str:
    """The page's gain-sensitivity section (HTML), or '' when no deep variant's gain was
    swept."""
    table = gain_table(runs, metric)
    variants = swept(table)
    if not variants:
        return ""
    shown = table[table["variant"].isin(variants)]
    cols = ["variant", "gain", "loss", "std", *HEALTH, "experiment"]
    return (
        "<h2>Gain sensitivity at depth</h2>\n"
        f"<p>Deep variants against their gain ({', '.join(variants)}), every other "
        "parameter at the baseline's: the loss, the std of the first and last hidden "
        "layers' outputs and the largest share of saturated units at the last training "
        "step (means over seeds, metrics <code>depth.final.*</code>). Without BatchNorm a "
        "small gain makes the activations shrink layer by layer (last-layer std below the "
        "first's) and a large one saturates them; with BatchNorm they should hold.</p>\n"
        f'<img alt="loss and activation health against the gain" '
        f'src="data:image/png;base64,{figure(table, metric)}">\n'
        + shown[cols].to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–")
    )
