"""Plot each variant's loss against every parameter swept by the DVC experiments.

Reads the experiments of the current repository through ``dvc.api``: ``exp_show()`` lists
them with their queue state, ``params_show()`` and ``metrics_show()`` give each one's
params.yaml and reports/metrics.json. Writes ``--out``: one self-contained HTML page (PNG
figures embedded, nothing fetched) with the val loss (mean ± std over seeds) against each
swept parameter, per variant, the baseline commit's value marked, the deep variants'
loss and activation health against their gain (tools/sweep_depth.py), and a table of
every experiment. Experiments still queued or running, and failed ones, have no final metrics:
the page and stdout say how many there are and which, instead of plotting fewer points.
Not a DVC stage. Run: python -m tools.sweep_report --out reports/sweep.html
(or: make sweep-report)
"""

from __future__ import annotations

import argparse
import html
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from dvc.exceptions import DvcException
from pydantic import ValidationError

from charlm.config import Params
from pipeline import outputs
from pipeline import params as params_file
from tools import sweep_depth
from tools.sweep_figures import affected, figure, solo_keys, swept_keys

PARAMS_FILE = "params.yaml"
FINISHED = ("baseline", "success")  # states whose metrics are final
PENDING = ("queued", "running")  # will have metrics once the queue has run them
Lookup = Callable[[str], dict]  # rev -> params or metrics (nested)


@dataclass
class Run:
    """One row of ``dvc exp show``: a baseline commit or one experiment."""

    name: str
    rev: str  # as dvc.api.exp_show gives it: a branch name, or a 7-digit sha
    baseline: bool
    state: str  # baseline, success, queued, running, failed
    params: dict[str, Any] = field(default_factory=dict)  # flat: 'variants.kaiming.gain'
    metrics: dict[str, dict] = field(default_factory=dict)  # variant -> metrics.json entry
    error: str | None = None
    config: Params | None = None  # the validated params (None: unreadable or invalid)
    left_out: str | None = None  # why its params do not validate (an older schema)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def invalid_reason(exc: ValidationError, limit: int = 2) -> str:
    """A short reason why a run's params do not validate: its first errors' keys."""
    errors = exc.errors()
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in errors[:limit]
    ]
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "params do not validate against the current schema: " + "; ".join(parts) + more


def flat_params(config: Params) -> dict[str, Any]:
    """The validated ``config`` as flat params: the keys the run's params.yaml gives
    (typed as the stages read them: ``1e-1`` a float, ``2e5`` an int where one is
    expected), and every variant's gain as its value (``VariantConfig.gain_value``: a
    null or absent gain is calculate_gain(nonlinearity), a point on the gain axis;
    null for gelu without a gain, which it then does not use)."""
    flat = flatten(config.model_dump(mode="json", exclude_unset=True))
    for name, v in config.variants.items():
        try:
            flat[f"variants.{name}.gain"] = v.gain_value
        except ValueError:
            flat[f"variants.{name}.gain"] = None
    return flat


def collect(rows: list[dict], params_of: Lookup, metrics_of: Lookup) -> list[Run]:
    """Runs from ``dvc.api.exp_show()`` rows, with their params and metrics looked up.

    ``rows`` are exp_show's flat table rows (keys ``Experiment``, ``rev``, ``typ``,
    ``State``, ...); the workspace row is skipped (it repeats the baseline or an applied
    experiment). An experiment run outside the queue has no state: it finished. Params are
    read for every run (a queued one's are those it will run with), metrics only for
    finished runs: a failed or queued experiment would show its baseline's. Params are
    validated as the stages validate them (``pipeline.params.parse``) and kept flat
    (``flat_params``); a run whose params do not validate (an older schema) is left out
    with the reason (``Run.left_out``) and without metrics. A lookup that raises leaves
    the run without those values and with the error.
    """
    runs = []
    for row in rows:
        if row.get("rev") == "workspace":
            continue
        baseline = row.get("typ") == "baseline"
        state = "baseline" if baseline else str(row.get("State") or "success").lower()
        run = Run(row.get("Experiment") or str(row["rev"]), str(row["rev"]), baseline, state)
        try:
            raw = params_of(run.rev)
            try:
                run.config = params_file.parse(raw)
            except ValidationError as exc:
                run.left_out = invalid_reason(exc)
                runs.append(run)
                continue
            run.params = flat_params(run.config)
            if state in FINISHED:
                metrics = metrics_of(run.rev)
                run.metrics = {v: m for v, m in metrics.items() if isinstance(m, dict)}
        except (DvcException, OSError, ValueError) as exc:  # shown in the table, not fatal
            run.error = f"{type(exc).__name__}: {exc}"
        runs.append(run)
    return runs


def dvc_runs(num: int = 1) -> list[Run]:
    """The baseline commits (``num`` first-parent commits from HEAD, -1: all) and their
    experiments in the current repository, through ``dvc.api``.

    Raises:
        OSError: dvc could not list the experiments (not a DVC repository, ...).
    """
    import dvc.api

    try:
        rows = dvc.api.exp_show(num=num)
    except DvcException as exc:
        raise OSError(f"cannot list DVC experiments in {Path.cwd()}: {exc}") from exc
    return collect(
        rows,
        lambda rev: dvc.api.params_show(PARAMS_FILE, rev=rev),
        lambda rev: dvc.api.metrics_show(rev=rev),
    )


def not_plotted(runs: list[Run]) -> str:
    """'' or the experiments without final metrics, counted by state, e.g. '2 queued,
    1 running, 1 failed (bad-gain)': failed and unreadable runs are also named."""
    counts = Counter(r.state for r in runs)
    parts = [f"{counts[s]} {s}" for s in PENDING if counts[s]]
    for state in sorted(set(counts) - {*FINISHED, *PENDING}):
        names = [r.name for r in runs if r.state == state]
        parts.append(f"{len(names)} {state} ({', '.join(names)})")
    unread = [r.name for r in runs if r.state in FINISHED and r.error]
    if unread:
        parts.append(f"{len(unread)} unreadable ({', '.join(unread)})")
    old = [r.name for r in runs if r.state in FINISHED and not r.error and r.left_out]
    if old:
        parts.append(f"{len(old)} left out, params of an older schema ({', '.join(old)})")
    return ", ".join(parts)


def loss_table(runs: list[Run], metric: str = "val") -> pd.DataFrame:
    """One row per finished run and variant: the loss, its mean and std over seeds."""
    rows = []
    for run in runs:
        if run.state not in FINISHED or run.error or run.left_out:
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


def changes(base: dict[str, Any], params: dict[str, Any]) -> str:
    """The ``-S`` overrides (Hydra syntax) that turn flat ``base`` into flat ``params``."""
    return ", ".join(change_list(base, params))


def change_list(base: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """``changes``, one override a string."""

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
    return out


def common_changes(runs: list[Run]) -> list[str]:
    """The overrides every experiment (two or more, not left out) makes from the
    baseline, e.g. a variant they all add: said once above the table, not per row."""
    base = next((r.params for r in runs if r.baseline and not r.left_out), None)
    exps = [r for r in runs if not r.baseline and not r.left_out and not r.error]
    if base is None or len(exps) < 2:
        return []
    lists = [change_list(base, r.params) for r in exps]
    return [c for c in lists[0] if all(c in other for other in lists[1:])]


def _cell(m: dict | None, metric: str) -> str:
    if not m:
        return ""
    mean, std = (m.get("mean") or {}).get(metric), (m.get("std") or {}).get(metric)
    if mean is None:
        return "" if m.get(metric) is None else f"{m[metric]:.4f}"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def experiments_frame(runs: list[Run], variants: list[str], metric: str) -> pd.DataFrame:
    """Every run: its state, the overrides from the baseline, the losses, any error."""
    base = next((r.params for r in runs if r.baseline and not r.left_out), {})
    common = set(common_changes(runs))
    rows = []
    for run in runs:
        shown = run.state in FINISHED and not run.left_out
        own = [c for c in change_list(base, run.params) if c not in common]
        changed = "(baseline)" if run.baseline else ", ".join(own) or "(only the common changes)"
        rows.append(
            {
                "experiment": run.name,
                "rev": run.rev[:7],
                "state": run.state,
                "changed": "(left out)" if run.left_out else changed,
                **{v: _cell(run.metrics.get(v), metric) if shown else "" for v in variants},
                "error": run.error or run.left_out or "",
            }
        )
    frame = pd.DataFrame(rows)
    return frame.drop(columns="error") if "error" in frame and not frame["error"].any() else frame


def architecture_frame(runs: list[Run], metric: str = "val") -> pd.DataFrame:
    """The by-architecture view of every finished run: per run, the families of variants
    that differ in one knob only (``reporting.stats.knob_families``: depth, width,
    nonlinearity or BatchNorm, init recipe alike), one row per variant with the knob's
    value, its training (length x seeds; '(differs)' when the family's do) and its
    ``metric`` loss, mean ± std over seeds, as in the report's *By architecture*."""
    from types import SimpleNamespace

    from reporting import stats as rs

    rows = []
    for run in runs:
        if run.state not in FINISHED or run.error or run.left_out or run.config is None:
            continue
        names = [v for v in run.config.variants if v in run.metrics]
        view = SimpleNamespace(params=run.config, variants=names, metrics=run.metrics)
        for knob, vs in rs.knob_families(view):
            alike = len({rs.schedule(view, v) for v in vs}) == 1 and all(
                rs.same_training(view, vs[0], v) for v in vs
            )
            for v in vs:
                rows.append({
                    "experiment": run.name, "varies": knob,
                    "value": rs.knob_value(view, v, knob), "variant": v,
                    "training": rs.schedule(view, v) + ("" if alike else " (differs)"),
                    f"{metric} loss": _cell(run.metrics.get(v), metric),
                })  # fmt: skip
    return pd.DataFrame(rows)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}
img{{max-width:100%}} .missing{{background:#fff3cd;padding:.5em}}</style></head><body>
<h1>{title}</h1>
{body}
</body></html>
"""


def render(runs: list[Run], metric: str = "val") -> str:
    """The HTML page for ``runs`` (see the module docstring)."""
    table = loss_table(runs, metric)
    variants = list(dict.fromkeys(table["variant"])) if not table.empty else []
    done = [r for r in runs if r.state in FINISHED and not r.error and not r.left_out]
    differing = swept_keys([r.params for r in done])
    keys = [k for k in solo_keys([r.params for r in done], differing) if affected(k, variants)]
    held = [k for k in differing if k not in keys]
    base = next((r.params for r in runs if r.baseline and not r.left_out), {})
    parts = [
        f"<p>{len(done) - sum(r.baseline for r in done)} finished experiment(s) on "
        f"{sum(r.baseline for r in done)} baseline commit(s); {metric} loss in nats, "
        "mean ± std over the seeds of each run (the canonical seed's value when only one "
        "seed ran). The star is the baseline commit; the dashed line the baseline's "
        "value of the parameter. A parameter is plotted when it varies on its own; one "
        "line per group of experiments sharing the values of every other differing "
        "parameter.</p>"
    ]
    missing = not_plotted(runs)
    if missing:
        parts.append(
            f'<p class="missing"><b>Not plotted: {html.escape(missing)}.</b> Queued and '
            "running experiments have no final metrics yet (<code>dvc queue status</code>; "
            "render this page again when the queue is empty); see why one failed with "
            "<code>dvc queue logs &lt;name&gt;</code>. Runs left out have params that no "
            "longer validate (the table's <i>error</i> column says why).</p>"
        )
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
    depth = sweep_depth.section(runs, metric)
    if depth:
        parts.append(depth)
    arch = architecture_frame(runs, metric)
    if not arch.empty:
        parts.append(
            "<h2>By architecture</h2>\n<p>Within each run, variants whose networks and "
            "init recipes are the same but for one knob (depth, width, nonlinearity or "
            "BatchNorm), as in the report's <i>By architecture</i>; <i>(differs)</i> marks "
            "a family whose runs differ in length or seeds, whose losses are not "
            "comparable as they stand.</p>\n" + arch.to_html(index=False, escape=True)
        )
    frame = experiments_frame(runs, variants, metric)
    parts.append("<h2>Experiments</h2>")
    common = common_changes(runs)
    if common:
        parts.append(
            "<p>Every experiment changes these from the baseline (the <i>changed</i> column "
            f"shows only the rest): <code>{html.escape(', '.join(common))}</code>.</p>"
        )
    parts.append(frame.to_html(index=False, escape=True))
    return PAGE.format(
        title=f"Sweeps: {metric} loss against swept parameters", body="\n".join(parts)
    )


def summary(runs: list[Run], out: Path) -> str:
    """The line printed after writing ``out``."""
    n = sum(r.state == "success" and not r.error and not r.left_out for r in runs)
    line = f"wrote {out}: {n} finished experiment(s), {sum(r.baseline for r in runs)} baseline(s)"
    missing = not_plotted(runs)
    return f"{line}; not plotted: {missing}" if missing else line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metric", default="val", choices=("train", "val", "test", "init_loss"))
    parser.add_argument(
        "-A",
        "--all-commits",
        action="store_true",
        help="experiments of every first-parent commit, not only HEAD's",
    )
    args = parser.parse_args()
    runs = dvc_runs(num=-1 if args.all_commits else 1)
    outputs.write_text(args.out, render(runs, args.metric))
    print(summary(runs, args.out))


if __name__ == "__main__":
    outputs.run(main)
