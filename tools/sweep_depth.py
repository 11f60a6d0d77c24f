"""The sweep report's gain sensitivity: loss and activation health against the gain.

Every variant's metrics (reports/metrics.json) carry ``depth.final.{std_first,
std_last, saturated_max, ...}``: the std of the first and of the last hidden layer's
output at the last training step and the largest saturated share (%, in the sense of
the variant's nonlinearity: tanh |out| > 0.97, sigmoid |2 out - 1| > 0.97, relu the
share of zeros; none for linear and gelu), means over seeds. Against the variant's
gain they show where activations vanish (small gain: the std shrinks layer by layer,
std_last << std_first) or saturate (large gain) without BatchNorm, and whether
BatchNorm holds. A run counts for a variant when every parameter that can change that
variant's numbers (its own entry and the global sections) is the baseline's but the
gain, so a grid or two separate sweeps both work. Runs carry their validated params
(``tools.sweep_report.Run.config``): the nonlinearity is read there. No DVC, no file I/O.
"""

from __future__ import annotations

import html
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from tools.sweep_figures import _png, affected, numeric, same_value

MOMENT = "final"  # metrics depth.<moment>.*: the last training step
HEALTH = ("std_first", "std_last", "saturated_max")
NO_SATURATION = ("linear", "gelu")  # charlm.diagnostics.saturated counts nothing for them
# what saturated_max counts, per nonlinearity (charlm.diagnostics.saturated)
SATURATED = {"tanh": "|out| > 0.97", "sigmoid": "|2 out - 1| > 0.97", "relu": "out = 0"}


def is_training_key(key: str, v: str) -> bool:
    """Whether flat ``key`` changes only how variant ``v`` trains (its length, seeds,
    learning rate): the global ``train`` section or the variant's own ``train`` keys."""
    return key.startswith("train.") or key.startswith(f"variants.{v}.train.")


def training_label(run, v: str) -> str:
    """How variant ``v`` trained in ``run``: '1,500 steps × 1 seed, lr 0.1' (with the
    decay when it happens within the run)."""
    t = run.config.variants[v].train_config(run.config.train)
    n = len(t.seeds)
    lr = f"lr {t.lr * run.config.variants[v].lr_scale:g}"
    if t.lr_decay_step < t.max_steps:
        lr += f" then {t.lr_decayed * run.config.variants[v].lr_scale:g} from {t.lr_decay_step:,}"
    return f"{t.max_steps:,} steps × {n} seed{'s' if n != 1 else ''}, {lr}"


def gain_table(runs: list, metric: str = "val", left_out: list | None = None) -> pd.DataFrame:
    """One row per variant, training and gain: ``metric`` loss (mean, std over seeds)
    and the activation health ``depth.final.*``, from the finished ``runs``
    (tools.sweep_report.Run) whose parameters differ from the (first) baseline's for
    that variant by the gain and at most by training keys (``is_training_key``: a
    shortened run is kept, on a series of its own, never on the baseline's line);
    the baseline's row first, one row per gain and training. Columns: variant,
    nonlinearity, training, gain, loss, std, std_first, std_last, saturated_max (%; None
    for a nonlinearity without saturation, linear and gelu), experiment, baseline.
    ``left_out``, when given, receives one sentence per run whose gain of a variant
    differs from the baseline's but which changes other keys of that variant too."""
    done = [
        r
        for r in runs
        if r.state in ("baseline", "success") and not r.error and r.config is not None
    ]
    base = next((r for r in done if r.baseline), None)
    if base is None:
        return pd.DataFrame()
    rows = []
    for run in sorted(done, key=lambda r: not r.baseline):
        for v, m in run.metrics.items():
            health = ((m.get("depth") or {}).get(MOMENT)) or {}
            key = f"variants.{v}.gain"
            keys = {k for k in (*base.params, *run.params) if affected(k, [v]) and k != key}
            other = sorted(
                k for k in keys if same_value(base.params.get(k)) != same_value(run.params.get(k))
            )
            if any(not is_training_key(k, v) for k in other):
                moved = same_value(base.params.get(key)) != same_value(run.params.get(key))
                if left_out is not None and moved:
                    shown = [k for k in other if not is_training_key(k, v)]
                    more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
                    left_out.append(
                        f"{run.name} for {v}: it changes {', '.join(shown[:3])}{more} "
                        "besides the gain (not a point of a gain curve)"
                    )
                continue
            if not health:
                continue
            gain = numeric(key, run.params.get(key))
            loss = (m.get("mean") or {}).get(metric, m.get(metric))
            if gain is None or loss is None or not math.isfinite(loss):
                continue
            config = run.config.variants.get(v)
            if config is None:
                continue
            kind = config.nonlinearity
            rows.append({
                "variant": v, "nonlinearity": kind, "training": training_label(run, v),
                "gain": gain, "loss": loss, "std": (m.get("std") or {}).get(metric),
                **{h: health.get(h) for h in HEALTH},
                **({"saturated_max": None} if kind in NO_SATURATION else {}),
                "experiment": run.name, "baseline": run.baseline,
            })  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.drop_duplicates(["variant", "training", "gain"])  # the baseline's row kept
    return table.sort_values(["variant", "training", "gain"], kind="stable").reset_index(drop=True)


def series(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(variant, training) with two or more gains in ``table``: one curve each."""
    if table.empty:
        return []
    n = table.groupby(["variant", "training"], sort=False)["gain"].nunique()
    return [key for key in n.index if n[key] > 1]


def swept(table: pd.DataFrame) -> list[str]:
    """The variants with two or more gains of one training in ``table``."""
    return list(dict.fromkeys(v for v, _ in series(table)))


def figure(table: pd.DataFrame, metric: str = "val") -> str:
    """PNG (base64): ``metric`` loss, activation std of the first and last hidden layer,
    and the largest saturated share (in its nonlinearity's sense, none for linear and
    gelu), each against the gain, one colour per variant (only variants with two or
    more gains); the baseline's gain starred."""
    sns.set_theme(style="whitegrid", context="notebook")
    curves = series(table)
    variants = swept(table)
    several = len({t for _, t in curves}) > 1  # name the training in the legend
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    colours = dict(zip(curves, sns.color_palette(n_colors=len(curves)), strict=True))
    for v, training in curves:
        d = table[(table["variant"] == v) & (table["training"] == training)]
        c = colours[(v, training)]
        name = v
        v = f"{v} ({training})" if several else v
        axes[0].errorbar(d["gain"], d["loss"], yerr=d["std"].fillna(0).astype(float),
                         marker="o", capsize=3, color=c, label=v)  # fmt: skip
        axes[1].plot(d["gain"], d["std_last"], marker="o", color=c, label=f"{v}: last layer")
        axes[1].plot(d["gain"], d["std_first"], marker="s", ls=":", color=c,
                     label=f"{v}: first layer")  # fmt: skip
        kind = d["nonlinearity"].iloc[0]
        sat = d["saturated_max"].astype(float)
        if sat.notna().any():
            axes[2].plot(d["gain"], sat, marker="o", color=c, label=f"{name}: {SATURATED[kind]}")
        b = d[d["baseline"]]
        for ax, y in zip(axes, ("loss", "std_last", "saturated_max"), strict=True):
            yb = b[y].astype(float)
            if yb.notna().any():
                ax.scatter(b["gain"], yb, marker="*", s=220, color=c, edgecolor="black", zorder=5)
    flat = sorted(
        {k for k in table["nonlinearity"] if k in NO_SATURATION}
        & set(table.loc[table["variant"].isin(variants), "nonlinearity"])
    )
    if flat:
        axes[2].text(0.02, 0.98, "; ".join(f"no saturation for {k}" for k in flat),
                     transform=axes[2].transAxes, va="top", fontsize=9, color="0.3")  # fmt: skip
    titles = (
        f"{metric} loss (mean ± std over seeds)",
        "std of hidden activations (final step)",
        "largest % saturated in a hidden layer (final step)",
    )
    ylabels = (f"{metric} loss (nats)", "std of output", "% saturated (relu: % zero)")
    for ax, title, ylabel in zip(axes, titles, ylabels, strict=True):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("gain")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.18), ncols=2)
    return _png(fig)


def section(runs: list, metric: str = "val") -> str:
    """The page's gain-sensitivity section (HTML), or '' when no variant's gain was
    swept and no run was left out of it; a run left out is named with the reason."""
    left_out: list[str] = []
    table = gain_table(runs, metric, left_out)
    variants = swept(table)
    why = (
        "<p><b>Left out of this section:</b> " + html.escape("; ".join(left_out)) + ".</p>\n"
        if left_out
        else ""
    )
    if not variants:
        if not left_out:
            return ""
        return (
            "<h2>Gain sensitivity at depth</h2>\n<p>No variant has two gains that differ "
            "from the baseline by the gain (and its training) alone.</p>\n" + why
        )
    shown = table[table["variant"].isin(variants)]
    cols = ["variant", "nonlinearity", "training", "gain", "loss", "std", *HEALTH, "experiment"]
    return (
        "<h2>Gain sensitivity at depth</h2>\n"
        f"<p>Variants against their gain ({', '.join(variants)}), every other "
        "parameter at the baseline's but their training: runs of another length, seed "
        "count or learning rate are a curve of their own (<i>training</i>), never joined "
        "to the baseline's. Shown: the loss, the std of the first and last hidden "
        "layers' outputs and the largest share of saturated units at the last training "
        "step (means over seeds, metrics <code>depth.final.*</code>; saturated means "
        "|out| &gt; 0.97 for tanh, |2 out - 1| &gt; 0.97 for sigmoid, out = 0 for relu, "
        "and linear and gelu have no saturation). Without BatchNorm a "
        "small gain makes the activations shrink layer by layer (last-layer std below the "
        "first's) and a large one saturates them; with BatchNorm they should hold.</p>\n"
        + why
        + f'<img alt="loss and activation health against the gain" '
        f'src="data:image/png;base64,{figure(table, metric)}">\n'
        + shown[cols].to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–")
    )
