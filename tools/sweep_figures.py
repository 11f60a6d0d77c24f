"""The sweep report's figures: which parameters were swept, and loss against each of them.

Works on flat params (``{'variants.kaiming.gain': 0.5, ...}``) and a loss table (one row
per finished run and variant, see ``tools.sweep_report.loss_table``); draws with
matplotlib/seaborn into base64 PNGs that the page inlines. No DVC and no file I/O here.
"""

from __future__ import annotations

import base64
import io as bytes_io
import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

GLOBAL_SECTIONS = ("data", "split", "model", "train", "evaluate")  # affect every variant


def numeric(key: str, value: Any) -> float | None:
    """``value`` as a number for an axis, or None.

    The runs' params are validated (``tools.sweep_report.flat_params``), so a number
    is a number; a string is not (a name such as 'tanh' is a category). ``key`` is kept
    for the callers (every key is read the same way).
    """
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


def same_value(value: Any) -> str:
    """A comparison key: 1, 1.0 and '1e0' are one value; 'tanh' stays a name."""
    x = numeric("", value)
    return repr(x) if x is not None else json.dumps(value, sort_keys=True)


def swept_keys(params: list[dict[str, Any]]) -> list[str]:
    """Keys present in two or more of the flat ``params`` that take two or more values."""
    seen: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for p in params:
        for k, v in p.items():
            seen.setdefault(k, set()).add(same_value(v))
            count[k] = count.get(k, 0) + 1
    return sorted(k for k, vals in seen.items() if len(vals) > 1 and count[k] > 1)


def affected(key: str, variants: list[str]) -> list[str]:
    """The variants whose losses ``key`` can change."""
    parts = key.split(".")
    if parts[0] == "variants" and len(parts) > 2:
        return [parts[1]] if parts[1] in variants else []
    return list(variants) if parts[0] in GLOBAL_SECTIONS else []


def group_of(params: dict[str, Any], others: list[str]) -> tuple[str, ...]:
    """The comparison key of ``params``' values of ``others`` (missing: null)."""
    return tuple(same_value(params.get(o)) for o in others)


def solo_keys(params: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The scalar ``keys`` swept on their own: >= 2 values among the flat ``params`` that
    share the values of every other key of ``keys`` (a group). Lists are never x-axes."""
    out = []
    for key in keys:
        if any(isinstance(p.get(key), (list, tuple, dict)) for p in params):
            continue
        others = [k for k in keys if k != key]
        seen: dict[tuple[str, ...], set[str]] = {}
        for p in params:
            if key in p:
                seen.setdefault(group_of(p, others), set()).add(same_value(p[key]))
        if any(len(vals) > 1 for vals in seen.values()):
            out.append(key)
    return out


def _png(fig: plt.Figure) -> str:
    buf = bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _short(keys: list[str]) -> dict[str, str]:
    """Each key's last part, or the whole key where two last parts collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _label(row: pd.Series, varying: list[str], names: dict[str, str], baseline: bool) -> str:
    if baseline:
        return "baseline settings"
    text = ", ".join(f"{names[o]}={row[o]}" for o in varying)
    return text if len(text) <= 60 else text[:57] + "..."


def figure(
    table: pd.DataFrame, key: str, variants: list[str], default: Any, others: list[str], metric: str
) -> str:
    """PNG (base64) of ``metric`` against ``key``: one panel per variant, one line per group
    of runs sharing every other differing parameter (``others``), the baseline starred."""
    sns.set_theme(style="whitegrid", context="notebook")
    ncols = min(len(variants), 3)
    nrows = math.ceil(len(variants) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(5.2 * ncols, 3.8 * nrows + 0.8),
        squeeze=False,
        layout="constrained",
    )
    d_all = table[table[key].notna()].copy()
    d_all["group"] = [group_of(row, others) for _, row in d_all.iterrows()]
    is_num = all(numeric(key, v) is not None for v in d_all[key])
    d_all["x"] = [numeric(key, v) if is_num else str(v) for v in d_all[key]]
    # groups drawn: those sweeping the key, and the baseline commit's
    base_groups = set(d_all.loc[d_all["baseline"], "group"])
    n_x = d_all.groupby("group")["x"].nunique()
    drawn = sorted(g for g in n_x.index if n_x[g] > 1 or g in base_groups)
    firsts = d_all.drop_duplicates("group").set_index("group")
    varying = [o for o in others if firsts.loc[drawn, o].astype(str).nunique() > 1]
    names = _short(varying)
    palette = dict(zip(drawn, sns.color_palette(n_colors=max(1, len(drawn))), strict=False))
    handles: dict[str, Any] = {}
    for ax, variant in zip(axes.flat, variants, strict=False):
        d = d_all[d_all["variant"] == variant]
        for group in drawn:
            g = d[d["group"] == group]
            if g.empty:
                continue
            g = g.sort_values("x") if is_num else g
            label = _label(firsts.loc[[group]].iloc[0], varying, names, group in base_groups)
            line = ax.errorbar(
                g["x"],
                g["loss"],
                yerr=g["std"].fillna(0).astype(float),
                marker="o",
                capsize=3,
                color=palette[group],
                linestyle="-" if is_num else "none",
            )
            handles.setdefault(label if len(drawn) > 1 else f"{metric} loss", line)
            b = g[g["baseline"]]
            if not b.empty:
                star = ax.scatter(
                    b["x"], b["loss"], marker="*", s=220, color=palette[group], zorder=5,
                    edgecolor="black",
                )  # fmt: skip
                handles.setdefault("baseline commit", star)
        if default is not None and is_num:
            x0 = numeric(key, default)
            shown = f"{x0:.4g}" if x0 == default else f"{default} = {x0:.4g}"
            handles.setdefault(
                f"baseline value: {shown}", ax.axvline(x0, color="grey", linestyle="--")
            )
        ax.set_title(f"{variant}")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} loss (nats)")
        if not is_num:
            ax.tick_params(axis="x", labelrotation=30)
    for ax in list(axes.flat)[len(variants) :]:
        ax.set_visible(False)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(len(handles), 3),
            fontsize="small",
        )
    return _png(fig)
