"""Tables of the report: one list of rows (dicts) per table, from the evaluate outputs.

Used by reporting/template.ipynb with ``reporting.figures.table_html``; values are
numbers, or text such as 'mean ± sd (n = k)' (reporting.stats.fmt_mean_std). The table
of published numbers is ``reporting.stats.reference_rows`` (the summary counts it).
"""

from __future__ import annotations

import math

from reporting.stats import (
    SPLITS,
    UNSEEN,
    Inputs,
    fmt_mean_std,
    no_saturation,
    nonlinearity,
    saturation_rule,
)


def by_moment(rows: list[dict], keys: tuple[str, ...], when: str = "when") -> list[dict]:
    """``rows`` with one row per ``keys`` (e.g. variant and layer) instead of one per
    moment: each other column once per moment, named 'column, moment' (the moment's
    first word: 'init', 'final', 'snapshot'). Halves the tables of a deep variant."""
    out: dict[tuple, dict] = {}
    for row in rows:
        k = tuple(row.get(key) for key in keys)
        moment = str(row[when]).split(" ")[0]
        target = out.setdefault(k, {key: row.get(key) for key in keys})
        for col, value in row.items():
            if col not in keys and col != when:
                target[f"{col}, {moment}"] = value
    return list(out.values())


def seed_rows(inputs: Inputs) -> list[dict]:
    """mean ± sd over seeds for every variant and split (and the step-0 loss)."""
    rows = []
    for v in inputs.variants:
        m = inputs.metrics[v]
        row = {"variant": v, "seeds": len(m["seeds"]), "diverged": m["n_diverged"]}
        for k in ("init_loss", *SPLITS, *UNSEEN):
            row[k] = fmt_mean_std(m["per_seed"][k])
        rows.append(row)
    return rows


def activation_rows(inputs: Inputs) -> list[dict]:
    """Per variant, hidden layer and moment (init, final): what counts as saturated for
    its nonlinearity (``reporting.stats.saturation_rule``), the saturated share at each
    threshold (tanh, sigmoid) or the share of zeros (relu), the dead units (relu: that
    never fire) and pre-activation statistics, each as mean ± sd over seeds; linear
    and gelu say 'no saturation for ...' (a 'layer' column, 1 for the first hidden
    layer, only when some variant has several)."""
    deep = any(len(inputs.diagnostics[v].layers) > 1 for v in inputs.variants)
    rows = []
    for v in inputs.variants:
        kind = nonlinearity(inputs, v)
        for i, layer in enumerate(inputs.diagnostics[v].layers):
            for when, a in layer.activations.items():
                row = {"variant": v, **({"layer": i + 1} if deep else {}), "when": when}
                rule = saturation_rule(kind)
                row["saturated when"] = no_saturation(kind) if rule is None else rule
                if kind == "relu":
                    share = next(iter(a.saturated.values()), None)
                    row["share zero (relu)"] = "–" if share is None else fmt_mean_std(share, 3)
                else:
                    for t, share in a.saturated.items():
                        row[f"share saturated, t = {t}"] = fmt_mean_std(share, 3)
                if a.dead is not None:
                    row["dead units (relu: never fire)"] = fmt_mean_std(a.dead, 1)
                row["pre-activation mean"] = fmt_mean_std(a.hpreact_mean, 3)
                row["pre-activation std"] = fmt_mean_std(a.hpreact_std, 3)
                rows.append(row)
    return rows


def revision(record: dict) -> str:
    """The git revision of a run record, in words."""
    rev = record.get("git_revision") or "unknown (not a git repository)"
    if record.get("git_dirty") == "yes":
        rev += " + uncommitted changes"
    return rev


def run_rows(inputs: Inputs) -> list[dict]:
    """One row per stage, in pipeline order: wall time (s), device, microseconds per
    model-step (train only), git revision, DVC experiment and versions, from the run
    records; a stage without a record says so."""
    rows = []
    for stage, rec in inputs.runs.items():
        if rec is None:
            rows.append({"stage": stage, "wall time (s)": None, "git revision": "not recorded"})
            continue
        row = {
            "stage": stage,
            "wall time (s)": rec.get("seconds"),
            "device": rec.get("device"),
            "µs per model-step": rec.get("us_per_model_step"),
            "git revision": revision(rec),
            "DVC experiment": rec.get("dvc_experiment"),
            "torch": rec.get("torch"),
            "DVC": rec.get("dvc"),
            "Python": rec.get("python"),
        }
        rows.append({k: math.nan if v is None else v for k, v in row.items()})  # NaN: '–'
    return rows
