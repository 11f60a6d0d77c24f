"""Numbers and sentences of the report: seed statistics, paired comparisons, summaries.

Used by reporting/template.ipynb; pure functions of what the evaluate stage wrote
(no plotting, no file access except ``load``), so every sentence in the report is
generated from the numbers and can be tested here. Missing values (``None``, NaN,
infinity: a diverged seed) are skipped everywhere and counted.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.stages.evaluate import DIAGNOSTICS_FORMAT

SPLITS = ("train", "val", "test")
LEVEL = 0.95  # confidence level of the paired intervals


@dataclass
class Inputs:
    """Everything the report reads, per variant: evaluate's outputs and the params."""

    params: dict
    counts: dict
    variants: list[str]
    metrics: dict[str, dict]
    samples: dict[str, dict]
    diagnostics: dict[str, dict]
    runs: dict[str, dict | None]  # stage name -> its run record (None: not recorded)


def load(
    params_path: str,
    eval_dir: str,
    data_dir: str,
    variants: list[str],
    runs_dir: str | None = None,
) -> Inputs:
    """Read params.yaml, data/processed/counts.json, each variant's evaluate outputs
    and the run records of the stages (``runs_dir``/<stage>.json, None if absent).

    Raises:
        ValueError: a diagnostics.pt written by an older evaluate stage (rerun it).
    """
    ev = Path(eval_dir)

    def read_json(path: Path) -> Any:
        return json.loads(path.read_text(encoding="utf-8"))

    def record(stage: str) -> dict | None:
        path = None if runs_dir is None else Path(runs_dir) / f"{stage}.json"
        return read_json(path) if path is not None and path.is_file() else None

    diagnostics = {}
    for v in variants:
        path = ev / v / "diagnostics.pt"
        diagnostics[v] = torch.load(path, weights_only=True)
        if diagnostics[v].get("format") != DIAGNOSTICS_FORMAT:
            raise ValueError(
                f"{path} was written by an older evaluate stage; rerun it (dvc repro evaluate@{v})"
            )
    return Inputs(
        params=yaml.safe_load(Path(params_path).read_text(encoding="utf-8")),
        counts=read_json(Path(data_dir) / "counts.json"),
        variants=list(variants),
        metrics={v: read_json(ev / v / "metrics.json") for v in variants},
        samples={v: read_json(ev / v / "samples.json") for v in variants},
        diagnostics=diagnostics,
        runs={stage: record(stage) for stage in pipeline_stages(variants)},
    )


def pipeline_stages(variants: list[str]) -> list[str]:
    """The stage names of dvc.yaml in pipeline order (report excluded)."""
    return [
        "download",
        "split",
        *(f"{stage}@{v}" for v in variants for stage in ("train", "evaluate")),
    ]


def finite(values: Any) -> list[float]:
    """The finite numbers among ``values`` (a list, possibly with None, NaN, inf)."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_std(values: Any) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (n - 1) and count of the finite values."""
    xs = finite(values)
    mean = statistics.fmean(xs) if xs else None
    sd = statistics.stdev(xs) if len(xs) >= 2 else None
    return mean, sd, len(xs)


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for a table or a sentence; '–' when missing or not finite."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def fmt_mean_std(values: Any, digits: int = 4) -> str:
    """'mean ± sd (n = k)', or what is missing."""
    mean, sd, n = mean_std(values)
    if mean is None:
        return "– (no finite value)"
    if sd is None:
        return f"{fmt(mean, digits)} (n = 1)"
    return f"{fmt(mean, digits)} ± {fmt(sd, digits)} (n = {n})"


# ---- Student-t quantile, without scipy -------------------------------------------------


def t_two_sided_mass(t: float, df: int) -> float:
    """P(-t < T < t) for Student's t with integer ``df`` >= 1, in closed form.

    Abramowitz & Stegun (1964), Handbook of Mathematical Functions, 26.7.3 (odd df) and
    26.7.4 (even df), with theta = atan(t / sqrt(df)).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term = total = 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    c = math.cos(theta)  # (2/pi)(theta + sin(theta) (c + 2/3 c^3 + ... up to c^(df-2)))
    term = total = c
    for k in range(1, (df - 3) // 2 + 1):
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with integer ``df``, by bisection.

    Inverts ``t_two_sided_mass`` (A&S 26.7.3-4): the p quantile is the t whose
    two-sided mass is 2p - 1. Accurate to about 1e-12; tests check it against the
    printed table (t_0.975: 12.706 at df 1, 2.365 at df 7, 2.042 at df 30).
    """
    if not 0.5 < p < 1:
        raise ValueError(f"p must lie in (0.5, 1), got {p}")
    mass = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < mass:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_mass(mid, df) < mass:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return (lo + hi) / 2


T_SOURCE = (
    "the t quantile inverts the closed-form Student-t distribution for integer degrees "
    "of freedom (Abramowitz & Stegun 1964, 26.7.3-26.7.4) by bisection"
)


# ---- paired comparisons ---------------------------------------------------------------


@dataclass
class Paired:
    """Mean of a - b over seeds paired by index, with a t interval."""

    a: str
    b: str
    n: int
    mean: float | None
    sd: float | None
    lo: float | None
    hi: float | None
    t: float | None


def paired_difference(
    a_vals: list, b_vals: list, a: str = "a", b: str = "b", level: float = LEVEL
) -> Paired:
    """d_i = a_i - b_i over the seeds where both are finite; t interval on mean(d).

    interval = mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n) (the paired t interval).
    """
    d = [
        x - y
        for x, y in zip(a_vals, b_vals, strict=False)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    n = len(d)
    if n == 0:
        return Paired(a, b, 0, None, None, None, None, None)
    mean = statistics.fmean(d)
    if n < 2:
        return Paired(a, b, n, mean, None, None, None, None)
    sd = statistics.stdev(d)
    t = t_quantile((1 + level) / 2, n - 1)
    half = t * sd / math.sqrt(n)
    return Paired(a, b, n, mean, sd, mean - half, mean + half, t)


def comparisons(inputs: Inputs, split: str = "val") -> list[Paired]:
    """Every pair of variants (in params order) on ``split``, seeds paired by index."""
    ps = {v: inputs.metrics[v]["per_seed"][split] for v in inputs.variants}
    return [paired_difference(ps[a], ps[b], a, b) for a, b in combinations(inputs.variants, 2)]


def spread(inputs: Inputs, v: str, split: str = "val") -> float | None:
    """Seed-to-seed standard deviation of a variant's loss on ``split``."""
    return mean_std(inputs.metrics[v]["per_seed"][split])[1]


def verdict(c: Paired, spread_a: float | None, spread_b: float | None) -> str:
    """One sentence on a paired comparison (val loss, nats; lower is better)."""
    if c.mean is None:
        return f"{c.a} vs {c.b}: no seed has a finite loss for both, so no comparison."
    if c.lo is None:
        return (
            f"{c.a} vs {c.b}: only {c.n} paired seed, difference {c.mean:+.4f}; "
            f"an interval needs at least two."
        )
    better, worse = (c.a, c.b) if c.mean < 0 else (c.b, c.a)
    gap = abs(c.mean)
    spreads = [s for s in (spread_a, spread_b) if s is not None]
    if spreads:
        sd = max(spreads)
        beyond = "larger" if gap > sd else "smaller"
        spread_words = f"; the gap is {beyond} than the seed-to-seed sd ({sd:.4f})"
    else:
        spread_words = ""
    if c.lo > 0 or c.hi < 0:
        # state the interval of worse - better, so every verdict reads as a positive gap
        lo, hi = (-c.hi, -c.lo) if better == c.a else (c.lo, c.hi)
        ci = f"95% CI of {worse} - {better}: [{lo:+.4f}, {hi:+.4f}], {c.n} pairs"
        return f"{better} beats {worse} by {gap:.4f} nats ({ci}){spread_words}."
    ci = f"95% CI of {c.a} - {c.b}: [{c.lo:+.4f}, {c.hi:+.4f}], {c.n} pairs"
    return (
        f"no clear difference between {c.a} and {c.b}: mean {c.mean:+.4f} nats, "
        f"and the interval includes 0 ({ci}){spread_words}."
    )


# ---- tables -----------------------------------------------------------------------------


def reference_rows(inputs: Inputs) -> list[dict]:
    """Canonical seed's step-0 and split losses beside the published ones, with deltas."""
    reference = (inputs.params.get("report") or {}).get("reference") or {}
    rows = []
    for v in inputs.variants:
        ours = inputs.metrics[v]["canonical"]
        ref = reference.get(v) or {}
        tol = ref.get("tol")
        for split in ("init_loss", *SPLITS):
            r, o = ref.get(split), ours.get(split)
            delta = None if r is None or o is None else o - r
            if delta is None:
                check = "no published value" if r is None else "no value (diverged)"
            else:
                check = ("within" if abs(delta) <= tol else "OUTSIDE") + f" ±{tol:g}"
            rows.append(
                {
                    "variant": v,
                    "quantity": split,
                    "ours": o,
                    "published": r,
                    # shown to 4 decimals: round so that -0.00001 reads 0.0000, not -0.0000
                    "delta": None if delta is None else round(delta, 4) + 0.0,
                    "check": check,
                }
            )
    return rows


def seed_rows(inputs: Inputs) -> list[dict]:
    """mean ± sd over seeds for every variant and split (and the step-0 loss)."""
    rows = []
    for v in inputs.variants:
        m = inputs.metrics[v]
        row = {"variant": v, "seeds": len(m["seeds"]), "diverged": m["n_diverged"]}
        for k in ("init_loss", *SPLITS):
            row[k] = fmt_mean_std(m["per_seed"][k])
        rows.append(row)
    return rows


def diverged(inputs: Inputs, v: str) -> list[bool]:
    """Per seed, whether it diverged (non-finite training loss or split losses)."""
    return [bool(d) for d in inputs.metrics[v]["per_seed"]["diverged"]]


def first_good_seed(inputs: Inputs, v: str) -> int | None:
    """Index of the first seed that did not diverge (0, the canonical one, normally)."""
    return next((i for i, bad in enumerate(diverged(inputs, v)) if not bad), None)


# ---- sentences --------------------------------------------------------------------------


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


def summary_paragraph(inputs: Inputs) -> str:
    """The report's opening paragraph (markdown), generated from the numbers."""
    vs = inputs.variants
    n_seeds = max(len(inputs.metrics[v]["seeds"]) for v in vs)
    means = {v: mean_std(inputs.metrics[v]["per_seed"]["val"]) for v in vs}
    ranked = sorted((m[0], v) for v, m in means.items() if m[0] is not None)
    parts = []
    if not ranked:
        parts.append("No variant has a finite validation loss: every seed diverged.")
    else:
        best_mean, best = ranked[0]
        sd = means[best][1]
        sd_words = f" ± {sd:.4f}" if sd is not None else ""
        parts.append(
            f"Over {n_seeds} seed{'s' if n_seeds != 1 else ''} per variant, "
            f"**{best}** reaches the lowest mean validation loss, "
            f"{best_mean:.4f}{sd_words} nats (mean ± sd over seeds)."
        )
        if len(ranked) > 1:
            runner_mean, runner = ranked[1]
            c = paired_difference(
                inputs.metrics[best]["per_seed"]["val"],
                inputs.metrics[runner]["per_seed"]["val"],
                best,
                runner,
            )
            gap = runner_mean - best_mean
            s = [x for x in (means[best][1], means[runner][1]) if x is not None]
            if c.lo is not None:
                excludes = c.hi < 0 or c.lo > 0
                parts.append(
                    f"The runner-up, {runner}, is {gap:.4f} nats behind; paired by seed, "
                    f"{runner} - {best} = {-c.mean:+.4f} (95% CI [{-c.hi:+.4f}, {-c.lo:+.4f}], "
                    f"{c.n} pairs), which {'excludes' if excludes else 'includes'} zero."
                )
            else:
                parts.append(
                    f"The runner-up, {runner}, is {gap:.4f} nats behind "
                    f"(too few paired seeds for an interval)."
                )
            if s:
                verb = "exceeds" if gap > max(s) else "does not exceed"
                parts.append(f"That gap {verb} the seed-to-seed spread (largest sd {max(s):.4f}).")
        missing = [v for v in vs if means[v][0] is None]
        if missing:
            parts.append(
                f"No finite validation loss for {', '.join(missing)} (every seed diverged)."
            )
    rows = [r for r in reference_rows(inputs) if r["delta"] is not None]
    if rows:
        ok = sum(r["check"].startswith("within") for r in rows)
        parts.append(
            f"The canonical seed matches {ok} of {len(rows)} published numbers "
            f"within their tolerance."
        )
        missed = [
            v
            for v in vs
            if any(r["variant"] == v and not r["check"].startswith("within") for r in rows)
        ]
        if missed:
            parts.append(
                f"Outside the tolerance: {', '.join(missed)}. The published numbers are "
                "those of the lecture's parameters (the defaults in params.yaml), so a run "
                "with other parameters, such as a `dvc exp run -S` experiment, is expected "
                "to miss them."
            )
    init = {v: inputs.metrics[v]["canonical"]["init_loss"] for v in vs}
    uniform = math.log(inputs.counts["vocab_size"])
    far = [v for v, x in init.items() if x is not None and x > uniform + 1]
    if far:
        parts.append(
            ", ".join(f"{v} starts at {init[v]:.2f}" for v in far)
            + f" nats instead of -ln(1/{inputs.counts['vocab_size']}) = {uniform:.4f}."
        )
    return " ".join(parts)


def init_loss_sentence(v: str, il: dict, seed: int = 0) -> str:
    """Why variant ``v`` starts where it does, from its step-0 logits (one seed)."""
    uniform = il["uniform"]
    V = round(math.exp(uniform))
    loss = il["step0"][seed]
    if loss is None or not math.isfinite(loss):
        return f"**{v}**: the step-0 loss is not finite."
    excess = loss - uniform
    head = (
        f"**{v}** (canonical seed) starts at {loss:.4f} nats, {excess:+.4f} from "
        f"-ln(1/{V}) = {uniform:.4f}"
    )
    std, pred = il["logits_std"][seed], il["logits_std_predicted"][seed]
    pt, pmax = il["p_target_median"][seed], il["p_max"][seed]
    if abs(excess) <= 0.1:
        return (
            head + f": its logits are small (sd {std:.3f}), so the softmax is close to "
            f"uniform (the correct character gets a median probability of {pt:.4f}; "
            f"1/{V} = {1 / V:.4f})."
        )
    return (
        head + f": its logits have a standard deviation of {std:.2f} on the probe batch "
        f"(predicted {pred:.2f} = std(W2) {il['w2_std'][seed]:.3f} × rms(h) "
        f"{il['h_rms'][seed]:.3f} × sqrt(H)), so the softmax is confidently wrong: the "
        f"most likely character takes {pmax:.1%} of the mass on average, and on half of "
        f"the examples the correct one gets less than {pt:.2g} instead of 1/{V} = "
        f"{1 / V:.4f}. Scaling W2 (and b2) down towards 0 fixes this."
    )


def dead_units_sentence(inputs: Inputs) -> str:
    """Dead units per variant at init and after training (the seeds the figures show)."""
    parts = []
    for v in inputs.variants:
        acts = inputs.diagnostics[v]["activations"]
        s = first_good_seed(inputs, v)
        final = "–" if s is None else str(int(acts["final"]["dead"][s]))
        parts.append(f"{v} {int(acts['init']['dead'][0])} → {final}")
    return (
        "**Dead units** (saturated on every probe example; at init → after training, "
        "seeds as in the figures): " + ", ".join(parts) + "."
    )


def params_text(params_path: str) -> str:
    """The parameters file verbatim, comments included."""
    return Path(params_path).read_text(encoding="utf-8")
