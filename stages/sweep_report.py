"""Plot each variant's loss against every parameter swept by the DVC experiments.

Reads ``dvc exp show --json`` run in the current repository (or a saved copy, ``--json``);
writes ``--out``: one self-contained HTML page (PNG figures embedded, nothing fetched) with
the val loss (mean ± std over seeds) against each swept parameter, per variant, the
baseline commit's value marked, and a table of every experiment. Not a DVC stage.
Run: python -m stages.sweep_report --out reports/sweep.html   (or: make sweep-report)
"""

from __future__ import annotations

import argparse
import base64
import html
import io as bytes_io
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from charlm.config import NONLINEARITIES
from stages import io

PARAMS_FILE = "params.yaml"
METRICS_FILE = "reports/metrics.json"
GLOBAL_SECTIONS = ("data", "split", "model", "train", "evaluate")  # affect every variant
FINISHED = ("baseline", "success")  # states whose metrics are final
TIMEOUT = 300  # seconds for `dvc exp show`


@dataclass
class Run:
    """One row of ``dvc exp show``: the baseline commit or one experiment."""

    name: str
    rev: str
    baseline: bool
    state: str
    params: dict[str, Any] = field(default_factory=dict)  # flat: 'variants.kaiming.gain'
    metrics: dict[str, dict] = field(default_factory=dict)  # variant -> metrics.json entry
    error: str | None = None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _file_data(files: dict | None, name: str) -> tuple[dict, str | None]:
    """The ``data`` of ``name`` in a ``{path: {data, error}}`` mapping, and its error."""
    entry = (files or {}).get(name) or {}
    err = entry.get("error")
    return (entry.get("data") or {}), (json.dumps(err) if err else None)


def _run(state: dict, baseline: bool, exec_state: str | None) -> Run:
    data = state.get("data") or {}
    params, perr = _file_data(data.get("params"), PARAMS_FILE)
    metrics, merr = _file_data(data.get("metrics"), METRICS_FILE)
    err = state.get("error") or data.get("error") or perr or merr
    return Run(
        name=state.get("name") or str(state.get("rev", ""))[:7],
        rev=str(state.get("rev", "")),
        baseline=baseline,
        state="baseline" if baseline else (exec_state or "success"),
        params=flatten(params),
        metrics={v: m for v, m in metrics.items() if isinstance(m, dict)},
        error=json.dumps(err) if isinstance(err, dict) else err,
    )


def parse_exp_show(doc: list[dict]) -> list[Run]:
    """Runs from ``dvc exp show --json`` (DVC 3: rev -> data -> params/metrics per file).

    The top level lists the workspace (skipped: it repeats the baseline or an applied
    experiment) and one entry per commit; each commit's ``experiments`` list ranges whose
    ``revs`` are the experiments, with the ``executor`` state while queued or running.
    """
    runs = []
    for commit in doc:
        if commit.get("rev") == "workspace":
            continue
        runs.append(_run(commit, True, None))
        for exp_range in commit.get("experiments") or []:
            executor = exp_range.get("executor") or {}
            for state in exp_range.get("revs") or []:
                run = _run(state, False, executor.get("state"))
                run.name = exp_range.get("name") or run.name
                runs.append(run)
    return runs


def numeric(key: str, value: Any) -> float | None:
    """``value`` as a number for an axis, or None.

    Strings in scientific notation (``'1e-3'``, as YAML 1.1 and ``dvc exp run -S`` leave
    them) are numbers; a named gain becomes its value (``'tanh'``: 5/3).
    """
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        if key.endswith(".gain") and value in NONLINEARITIES:
            return float(torch.nn.init.calculate_gain(value))  # old runs named the gain
    return None


def _same(value: Any) -> str:
    """A comparison key: 1, 1.0 and '1e0' are one value; 'tanh' stays a name."""
    x = numeric("", value)
    return repr(x) if x is not None else json.dumps(value, sort_keys=True)


def swept_keys(runs: list[Run]) -> list[str]:
    """Keys present in two or more runs that take two or more values among them."""
    seen: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for run in runs:
        for k, v in run.params.items():
            seen.setdefault(k, set()).add(_same(v))
            count[k] = count.get(k, 0) + 1
    return sorted(k for k, vals in seen.items() if len(vals) > 1 and count[k] > 1)


def affected(key: str, variants: list[str]) -> list[str]:
    """The variants whose losses ``key`` can change."""
    parts = key.split(".")
    if parts[0] == "variants" and len(parts) > 2:
        return [parts[1]] if parts[1] in variants else []
    return list(variants) if parts[0] in GLOBAL_SECTIONS else []


def loss_table(runs: list[Run], metric: str = "val") -> pd.DataFrame:
    """One row per finished run and variant: the loss, its mean and std over seeds."""
    rows = []
    for run in runs:
        if run.state not in FINISHED or run.error:
            continue
        for variant, m in run.metrics.items():
            mean = (m.get("mean") or {}).get(metric)
            std = (m.get("std") or {}).get(metric)
            canonical = m.get(metric)
            y = mean if mean is not None else canonical
            if y is None or not math.isfinite(y):
                continue
            rows.append(
                {
                    "experiment": run.name,
                    "rev": run.rev[:7],
                    "baseline": run.baseline,
                    "variant": variant,
                    "loss": y,
                    "std": std,
                    "canonical": canonical,
                    "n_seeds": m.get("n_seeds"),
                    **run.params,
                }
            )
    return pd.DataFrame(rows)


def _png(fig: plt.Figure) -> str:
    buf = bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def group_of(params: dict[str, Any], others: list[str]) -> tuple[str, ...]:
    """The comparison key of ``params``' values of ``others`` (missing: null)."""
    return tuple(_same(params.get(o)) for o in others)


def solo_keys(runs: list[Run], keys: list[str]) -> list[str]:
    """The scalar ``keys`` swept on their own: >= 2 values among the ``runs`` that share
    the values of every other key of ``keys`` (a group). List values are never x-axes."""
    out = []
    for key in keys:
        if any(isinstance(r.params.get(key), (list, tuple, dict)) for r in runs):
            continue
        others = [k for k in keys if k != key]
        seen: dict[tuple[str, ...], set[str]] = {}
        for r in runs:
            if key in r.params:
                seen.setdefault(group_of(r.params, others), set()).add(_same(r.params[key]))
        if any(len(vals) > 1 for vals in seen.values()):
            out.append(key)
    return out


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
            shown = default if x0 == default else f"{default} = {x0:.4g}"
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


def changes(base: dict[str, Any], params: dict[str, Any]) -> str:
    """The ``-S`` overrides (Hydra syntax) that turn flat ``base`` into flat ``params``."""

    def names(p: dict) -> set[str]:
        return {k.split(".")[1] for k in p if k.startswith("variants.") and k.count(".") > 1}

    def owned(key: str, which: set[str]) -> bool:
        parts = key.split(".")
        return parts[0] == "variants" and len(parts) > 2 and parts[1] in which

    new, gone = names(params) - names(base), names(base) - names(params)
    out = [f"{k}={v}" for k, v in params.items() if k in base and base[k] != v]
    out += [f"+{k}={v}" for k, v in params.items() if k not in base and not owned(k, new)]
    out += [f"~{k}" for k in base if k not in params and not owned(k, gone)]
    for name in sorted(new):
        entry = {k.split(".", 2)[2]: v for k, v in params.items() if owned(k, {name})}
        out.append(f"+variants.{name}={{{', '.join(f'{k}: {v}' for k, v in entry.items())}}}")
    out += [f"~variants.{name}" for name in sorted(gone)]
    return ", ".join(out)


def _cell(m: dict | None, metric: str) -> str:
    if not m:
        return ""
    mean, std = (m.get("mean") or {}).get(metric), (m.get("std") or {}).get(metric)
    if mean is None:
        return "" if m.get(metric) is None else f"{m[metric]:.4f}"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def experiments_frame(runs: list[Run], variants: list[str], metric: str) -> pd.DataFrame:
    """Every run: its state, the overrides from the baseline, the losses, any error."""
    base = next((r.params for r in runs if r.baseline), {})
    rows = []
    for run in runs:
        shown = run.state in FINISHED
        rows.append(
            {
                "experiment": run.name,
                "rev": run.rev[:7],
                "state": run.state,
                "changed": "(baseline)" if run.baseline else changes(base, run.params),
                **{v: _cell(run.metrics.get(v), metric) if shown else "" for v in variants},
                "error": run.error or "",
            }
        )
    frame = pd.DataFrame(rows)
    return frame.drop(columns="error") if "error" in frame and not frame["error"].any() else frame


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}
img{{max-width:100%}}</style></head><body>
<h1>{title}</h1>
{body}
</body></html>
"""


def render(runs: list[Run], metric: str = "val") -> str:
    """The HTML page for ``runs`` (see the module docstring)."""
    sns.set_theme(style="whitegrid", context="notebook")
    table = loss_table(runs, metric)
    variants = list(dict.fromkeys(table["variant"])) if not table.empty else []
    done = [r for r in runs if r.state in FINISHED and not r.error]
    differing = swept_keys(done)
    keys = [k for k in solo_keys(done, differing) if affected(k, variants)]
    held = [k for k in differing if k not in keys]
    base = next((r.params for r in runs if r.baseline), {})
    parts = [
        f"<p>{len(done) - sum(r.baseline for r in done)} finished experiment(s) on "
        f"{sum(r.baseline for r in done)} baseline commit(s); {metric} loss in nats, "
        "mean ± std over the seeds of each run (the canonical seed's value when only one "
        "seed ran). The star is the baseline commit; the dashed line the baseline's "
        "value of the parameter. A parameter is plotted when it varies on its own; one "
        "line per group of experiments sharing the values of every other differing "
        "parameter.</p>"
    ]
    if held:
        parts.append(
            "<p>Not plotted, never varied alone, held fixed per group: "
            f"<code>{html.escape(', '.join(held))}</code>.</p>"
        )
    if not keys and held:
        parts.append("<p>No parameter varied on its own: nothing to plot.</p>")
    elif not keys:
        parts.append(
            "<p>No swept parameter: every finished experiment has the baseline's "
            "parameters. Queue some with <code>dvc exp run --queue -S ...</code>.</p>"
        )
    for key in keys:
        panel = affected(key, variants)
        others = [k for k in differing if k != key]
        png = figure(table, key, panel, base.get(key), others, metric)
        parts.append(
            f"<h2>{html.escape(key)}</h2>\n"
            f'<img alt="{html.escape(metric)} loss against {html.escape(key)}" '
            f'src="data:image/png;base64,{png}">'
        )
    frame = experiments_frame(runs, variants, metric)
    parts.append(f"<h2>Experiments</h2>\n{frame.to_html(index=False, escape=True)}")
    return PAGE.format(
        title=f"Sweeps: {metric} loss against swept parameters", body="\n".join(parts)
    )


def exp_show(extra: list[str]) -> list[dict]:
    """``dvc exp show --json`` in the current directory, parsed.

    Raises:
        OSError: dvc failed or printed no JSON (its stderr is in the message).
    """
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    out = proc.stdout
    start = min((i for i in (out.find("["), out.find("{")) if i >= 0), default=-1)
    if proc.returncode != 0 or start < 0:
        raise OSError(f"{' '.join(cmd[2:])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(out[start:])  # from the first bracket: skip any line printed before


def sweep_report(doc: list[dict], out: Path, metric: str = "val") -> list[Run]:
    """Do the work; returns the parsed runs."""
    runs = parse_exp_show(doc)
    io.write_text(out, render(runs, metric))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="a saved `dvc exp show --json` output")
    parser.add_argument("--metric", default="val", choices=("train", "val", "test", "init_loss"))
    parser.add_argument(
        "-A",
        "--all-commits",
        action="store_true",
        help="experiments of every commit, not only HEAD's",
    )
    args = parser.parse_args()
    if args.json:
        doc = json.loads(args.json.read_text(encoding="utf-8"))
    else:
        doc = exp_show(["--all-commits"] if args.all_commits else [])
    runs = sweep_report(doc, args.out, args.metric)
    n = sum(r.state == "success" for r in runs)
    print(
        f"wrote {args.out}: {n} finished experiment(s), {sum(r.baseline for r in runs)} baseline(s)"
    )


if __name__ == "__main__":
    io.run(main)
