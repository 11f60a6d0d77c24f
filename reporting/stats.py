"""Numbers and sentences of the report: seed statistics, tables, summaries.

Used by reporting/template.ipynb; pure functions of what the evaluate stage wrote
(no plotting, no file access except ``load``), so every sentence in the report is
generated from the numbers and can be tested here. Missing values (``None``, NaN,
infinity: a diverged seed) are skipped everywhere and counted. The paired intervals
live in reporting/intervals.py.
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

from charlm.artefacts import Diagnostics, InitLoss, from_state
from charlm.config import Params, VariantConfig
from pipeline import params as params_file
from reporting.intervals import Paired, oriented, paired_difference

SPLITS = ("train", "val", "test")
UNSEEN = ("val_unseen", "test_unseen")  # val/test windows of names absent from train


@dataclass
class Inputs:
    """Everything the report reads, per variant: evaluate's outputs and the params
    (validated by ``pipeline.params``, the one reader of params.yaml)."""

    params: Params
    counts: dict
    variants: list[str]
    metrics: dict[str, dict]
    samples: dict[str, dict]
    diagnostics: dict[str, Diagnostics]
    runs: dict[str, dict | None]  # stage name -> its run record (None: not recorded)


def load(
    params_path: str,
    eval_dir: str,
    data_dir: str,
    variants: list[str],
    runs_dir: str | None = None,
) -> Inputs:
    """Read params.yaml (``pipeline.params.validate``: as every stage reads it),
    data/processed/counts.json, each variant's evaluate outputs and the run records of
    the stages (``runs_dir``/<stage>.json, None if absent).

    Raises:
        pipeline.params.ParamsError: params.yaml is not valid.
        ValueError: a diagnostics.pt of another format (written by another version of
            the evaluate stage: rerun it) or not matching ``charlm.artefacts``.
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
        try:
            diagnostics[v] = from_state(torch.load(path, weights_only=True), str(path))
        except ValueError as e:
            raise ValueError(f"{e} (dvc repro evaluate@{v})") from e
    return Inputs(
        params=params_file.validate(params_path),
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


def fmt_mean_std(
    values: Any,
    digits: int = 4,
    spec: str | None = None,
    sd_spec: str | None = None,
    unit: str = "",
) -> str:
    """'mean ± sd (n = k)', or what is missing. ``spec``/``sd_spec``: format specs of the
    mean and the sd (default ``fmt`` with ``digits``); ``unit`` follows both ('%')."""
    mean, sd, n = mean_std(values)
    if mean is None:
        return "– (no finite value)"
    m = fmt(mean, digits) if spec is None else format(mean, spec)
    if sd is None:
        return f"{m}{unit} (n = 1)"
    s = fmt(sd, digits) if sd_spec is None else format(sd, sd_spec)
    return f"{m} ± {s}{unit} (n = {n})"


# ---- paired comparisons (reporting.intervals) -----------------------------------


def variant(inputs: Inputs, v: str) -> VariantConfig:
    """Variant ``v``'s validated configuration (``variants.<v>`` of params.yaml)."""
    return inputs.params.variants[v]


def nonlinearity(inputs: Inputs, v: str) -> str:
    """The hidden layers' nonlinearity of variant ``v``."""
    return variant(inputs, v).nonlinearity


# The architecture knobs a comparison may differ in (``architecture``), in words.
KNOBS = ("depth", "width", "nonlinearity", "BatchNorm")


def architecture(inputs: Inputs, v: str) -> dict[str, Any]:
    """Variant ``v``'s network, knob by knob (``KNOBS``): hidden layers, units per hidden
    layer, nonlinearity and where and how it normalises (None without BatchNorm); from
    its ``VariantConfig`` and the global ``model`` section."""
    c = variant(inputs, v)
    bn = (c.batchnorm, c.batchnorm_output, c.batchnorm_form) if c.has_batchnorm else None
    return {
        "depth": c.layers,
        "width": c.hidden_size(inputs.params.model),
        "nonlinearity": c.nonlinearity,
        "BatchNorm": bn,
    }


def differing(inputs: Inputs, a: str, b: str) -> list[str]:
    """The knobs (``KNOBS``) in which the networks of ``a`` and ``b`` differ."""
    arch_a, arch_b = architecture(inputs, a), architecture(inputs, b)
    return [k for k in KNOBS if arch_a[k] != arch_b[k]]


def comparable(inputs: Inputs, a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` share an architecture except for at most one knob (the
    compared one; none: they differ in their init or training only)."""
    return len(differing(inputs, a, b)) <= 1


def same_init(inputs: Inputs, a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` use the same init recipe with the same settings as written
    (a null gain is the nonlinearity's own gain, so it follows a nonlinearity knob)."""

    def init(v: str) -> dict[str, Any]:
        return variant(inputs, v).model_dump(exclude={*ARCH_KEYS, "lr_scale"})

    return init(a) == init(b)


def compared_knob(inputs: Inputs, a: str, b: str) -> str:
    """What a comparison of ``a`` and ``b`` measures, in words: the knob they differ in,
    with ', init' when their init recipes or its settings differ too (or 'init /
    training' alone), and a warning when they trained differently."""
    knobs = differing(inputs, a, b)
    if not knobs:
        knobs = ["init / training"]
    elif not same_init(inputs, a, b):
        knobs.append("init")
    return ", ".join(knobs) + ("" if same_training(inputs, a, b) else " (and trained differently)")


def same_training(inputs: Inputs, a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` trained alike: the same ``train_of`` but for the seeds
    (which pair by value) and the same learning-rate scale."""
    ta, tb = (train_of(inputs, v).model_dump(exclude={"seeds"}) for v in (a, b))
    return ta == tb and variant(inputs, a).lr_scale == variant(inputs, b).lr_scale


def train_of(inputs: Inputs, v: str):
    """Variant ``v``'s training run (``charlm.config.TrainConfig``): the global ``train``
    with its own overrides (``VariantConfig.train_config``)."""
    return variant(inputs, v).train_config(inputs.params.train)


def paired_by_seed(inputs: Inputs, a: str, b: str, split: str = "val") -> Paired:
    """``a - b`` on ``split`` over the seeds both variants ran (in ``a``'s order): seed
    values pair, so a variant may train its own seeds (``variants.<v>.train.seeds``)."""
    va = dict(zip(inputs.metrics[a]["seeds"], inputs.metrics[a]["per_seed"][split], strict=True))
    vb = dict(zip(inputs.metrics[b]["seeds"], inputs.metrics[b]["per_seed"][split], strict=True))
    common = [s for s in va if s in vb]
    return paired_difference([va[s] for s in common], [vb[s] for s in common], a, b)


def comparisons(inputs: Inputs, split: str = "val") -> list[Paired]:
    """Every pair of ``comparable`` variants (pairs in params order) on ``split``, seeds
    paired by value (``paired_by_seed``), each ``oriented``: the variant of higher mean
    loss over the paired seeds first, so the difference first - second is >= 0 and reads
    as the verdicts do; ``compared_knob`` says what each pair measures."""
    return [
        oriented(paired_by_seed(inputs, a, b, split))
        for a, b in combinations(inputs.variants, 2)
        if comparable(inputs, a, b)
    ]


ARCH_KEYS = ("layers", "n_hidden", "nonlinearity", "batchnorm", "batchnorm_output",
             "batchnorm_form", "momentum", "eps", "train")  # fmt: skip


def knob_families(inputs: Inputs) -> list[tuple[str, list[str]]]:
    """Per knob (``KNOBS``), the groups of variants (params order, at least two, with at
    least two values of the knob) whose networks and init recipes are the same but for
    that knob: a depth curve (tanh1, deep_tanh, tanh10, tanh20), a width, nonlinearity
    or BatchNorm comparison. Their training may differ (``schedule``: the figure and
    table mark it)."""
    out = []
    for knob in KNOBS:
        groups: dict[str, list[str]] = {}
        for v in inputs.variants:
            arch = {k: x for k, x in architecture(inputs, v).items() if k != knob}
            init = variant(inputs, v).model_dump(exclude=set(ARCH_KEYS))
            if knob == "nonlinearity" and init.get("gain") is None:
                init["gain"] = "calculate_gain"  # the default gain follows the nonlinearity
            groups.setdefault(repr((arch, init)), []).append(v)
        for vs in groups.values():
            if len({repr(architecture(inputs, v)[knob]) for v in vs}) >= 2:
                out.append((knob, vs))
    return out


def knob_value(inputs: Inputs, v: str, knob: str) -> str:
    """The value of ``knob`` for ``v`` in words (BatchNorm: 'no', 'hidden', ...)."""
    x = architecture(inputs, v)[knob]
    if knob == "BatchNorm":
        if x is None:
            return "no"
        where = [w for w, on in zip(("hidden", "output"), x[:2], strict=True) if on]
        return f"{' + '.join(where)} ({x[2]})"
    return str(x)


def schedule(inputs: Inputs, v: str) -> str:
    """How long and with how many seeds ``v`` trained, short: '1,500 steps × 1 seed'."""
    t = train_of(inputs, v)
    n = len(t.seeds)
    return f"{t.max_steps:,} steps × {n} seed{'s' if n != 1 else ''}"


def knob_rows(inputs: Inputs, split: str = "val") -> list[dict]:
    """The by-architecture table: every family of ``knob_families``, one row per
    variant with the knob's value, its training and its loss over seeds."""
    rows = []
    for knob, vs in knob_families(inputs):
        alike = len({schedule(inputs, v) for v in vs}) == 1 and all(
            same_training(inputs, vs[0], v) for v in vs
        )
        for v in vs:
            rows.append({
                "varies": knob, "value": knob_value(inputs, v, knob), "variant": v,
                "training": schedule(inputs, v) + ("" if alike else " (differs)"),
                f"{split} loss over seeds": fmt_mean_std(inputs.metrics[v]["per_seed"][split]),
            })  # fmt: skip
    return rows


def spread(inputs: Inputs, v: str, split: str = "val") -> float | None:
    """Seed-to-seed standard deviation of a variant's loss on ``split``."""
    return mean_std(inputs.metrics[v]["per_seed"][split])[1]


# ---- the published numbers, and seeds ---------------------------------------------


def reference_rows(inputs: Inputs) -> list[dict]:
    """Canonical seed's step-0 and split losses beside the published ones, with deltas."""
    reference = inputs.params.report.reference
    rows = []
    for v in inputs.variants:
        ours = inputs.metrics[v]["canonical"]
        ref = reference.get(v)
        tol = None if ref is None else ref.tol
        for split in ("init_loss", *SPLITS):
            r, o = None if ref is None else getattr(ref, split), ours.get(split)
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


def diverged(inputs: Inputs, v: str) -> list[bool]:
    """Per seed, whether it diverged (non-finite training loss or split losses)."""
    return [bool(d) for d in inputs.metrics[v]["per_seed"]["diverged"]]


def first_good_seed(inputs: Inputs, v: str) -> int | None:
    """Index of the first seed that did not diverge (0, the canonical one, normally)."""
    return next((i for i, bad in enumerate(diverged(inputs, v)) if not bad), None)


CANONICAL = "canonical seed"  # what the report calls a variant's first seed, everywhere


def seed_name(inputs: Inputs, v: str, index: int) -> str:
    """How the report names seed ``index`` (0-based) of variant ``v`` in figures and
    tables: 'canonical seed' for the first (``CANONICAL``: the first of the variant's
    ``train.seeds``, the lecture's generator seed unless the variant sets its own
    seeds), else 'seed <its generator seed>' (shown when the canonical one diverged)."""
    if index == 0:
        return CANONICAL
    return f"seed {inputs.metrics[v]['seeds'][index]}"


# ---- sentences --------------------------------------------------------------------------


def summary_paragraph(inputs: Inputs) -> str:
    """The report's opening paragraph (markdown), generated from the numbers; the
    variants ranked are the first one and those ``comparable`` with it that trained
    as it did (the lecture's one-layer variants in the default params); the depth
    verdict is ``reporting.verdict``'s."""
    first = inputs.variants[0]
    vs = [
        v
        for v in inputs.variants
        if v == first or (comparable(inputs, first, v) and same_training(inputs, first, v))
    ]
    counts = sorted({len(inputs.metrics[v]["seeds"]) for v in vs})
    means = {v: mean_std(inputs.metrics[v]["per_seed"]["val"]) for v in vs}
    ranked = sorted((m[0], v) for v, m in means.items() if m[0] is not None)
    parts = []
    if not ranked:
        parts.append("No variant has a finite validation loss: every seed diverged.")
    else:
        best_mean, best = ranked[0]
        sd = means[best][1]
        sd_words = f" ± {sd:.4f}" if sd is not None else ""
        n = counts[0] if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        parts.append(
            f"Over {n} seed{'s' if counts[-1] != 1 else ''} per variant, "
            f"**{best}** reaches the lowest mean validation loss, "
            f"{best_mean:.4f}{sd_words} nats (mean ± sd over seeds)."
        )
        if len(ranked) > 1:
            runner_mean, runner = ranked[1]
            # runner - best, seeds paired by value as in the paired table (which lists
            # the pair in this direction when the paired mean is >= 0, as it is but for
            # diverged or unshared seeds)
            c = paired_by_seed(inputs, runner, best)
            gap = runner_mean - best_mean
            s = [x for x in (means[best][1], means[runner][1]) if x is not None]
            if c.lo is not None:
                excludes = c.hi < 0 or c.lo > 0
                parts.append(
                    f"The runner-up, {runner}, is {gap:.4f} nats behind; paired by seed, "
                    f"{runner} - {best} = {c.mean:+.4f} (95% CI [{c.lo:+.4f}, {c.hi:+.4f}], "
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
            for v in inputs.variants
            if any(r["variant"] == v and not r["check"].startswith("within") for r in rows)
        ]
        if missed:
            parts.append(
                f"Outside the tolerance: {', '.join(missed)}. The published numbers are "
                "those of the lecture's parameters (the defaults in params.yaml), so a run "
                "with other parameters, such as a `dvc exp run -S` experiment, is expected "
                "to miss them."
            )
    init = {v: inputs.metrics[v]["canonical"]["init_loss"] for v in inputs.variants}
    uniform = math.log(inputs.counts["vocab_size"])
    far = [v for v, x in init.items() if x is not None and x > uniform + 1]
    if far:
        parts.append(
            ", ".join(f"{v} starts at {init[v]:.2f}" for v in far)
            + f" nats instead of -ln(1/{inputs.counts['vocab_size']}) = {uniform:.4f}."
        )
    return " ".join(parts)


def init_loss_sentence(
    v: str, il: InitLoss, seed: int = 0, labels: dict[str, str] | None = None
) -> str:
    """Why variant ``v`` starts where it does, from its step-0 logits (one seed);
    ``labels``: the weight matrices' short names (``weight_labels``)."""
    uniform = il.uniform
    V = round(math.exp(uniform))
    loss = il.step0[seed]
    if loss is None or not math.isfinite(loss):
        return f"**{v}**: the step-0 loss is not finite."
    excess = loss - uniform
    head = (
        f"**{v}** (canonical seed) starts at {loss:.4f} nats, {excess:+.4f} from "
        f"-ln(1/{V}) = {uniform:.4f}"
    )
    std, pred = il.logits_std[seed], il.logits_std_predicted[seed]
    pt, pmax = il.p_target_median[seed], il.p_max[seed]
    w = (labels or {}).get(il.output_weight, il.output_weight)
    if abs(excess) <= 0.1:
        return (
            head + f": its logits are small (sd {std:.3f}), so the softmax is close to "
            f"uniform (the correct character gets a median probability of {pt:.4f}; "
            f"1/{V} = {1 / V:.4f})."
        )
    return (
        head + f": its logits have a standard deviation of {std:.2f} on the probe batch "
        f"(predicted {pred:.2f} = std({w}) {il.output_weight_std[seed]:.3f} × rms(h) "
        f"{il.h_rms[seed]:.3f} × sqrt(H)), so the softmax is confidently wrong: the "
        f"most likely character takes {pmax:.1%} of the mass on average, and on half of "
        f"the examples the correct one gets less than {pt:.2g} instead of 1/{V} = "
        f"{1 / V:.4f}. Scaling {w} (and its bias) down towards 0 fixes this."
    )


def duplicates_sentence(counts: dict) -> str:
    """The repeated names of the data and what the *unseen* losses measure (markdown)."""
    d, words = counts["duplicates"], counts["words"]
    held_out = " and ".join(
        f"{d['also_in_train'][k]:,} of the {words[k]:,} {k} names" for k in d["also_in_train"]
    )
    windows = ", ".join(f"{k}_unseen {n:,}" for k, n in d["unseen_windows"].items())
    return (
        f"**Repeated names:** the names file repeats {d['repeated_lines']:,} lines "
        f"({d['distinct_names']:,} distinct names in {counts['names']:,} lines), and the "
        f"lecture's split cuts the shuffled lines, so {held_out} also occur in train. The "
        f"*unseen* losses (val_unseen, test_unseen) are measured on the windows of the "
        f"val and test names that never occur in train (windows: {windows})."
    )


def training_words(inputs: Inputs) -> str:
    """The run header's seeds and length (markdown): one statement when every variant
    trained alike, else each group of variants with its own seeds and steps (the global
    ``train`` section with the variant's own ``train`` keys), so that the header never
    claims a length or seed count that a variant did not have."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for v in inputs.variants:
        t = train_of(inputs, v)
        groups.setdefault((len(t.seeds), t.max_steps, t.batch_size), []).append(v)
    lecture = inputs.params.train.seeds[0]
    if len(groups) == 1:
        ((n, steps, batch),) = groups
        return (
            f"**Seeds per variant:** {n} (the first, {lecture}, is the lecture's). "
            f"**Training:** {steps:,} steps of batch {batch}."
        )
    parts = [
        f"{', '.join(vs)}: {n} seed{'s' if n != 1 else ''} × {steps:,} steps of batch {batch}"
        for (n, steps, batch), vs in groups.items()
    ]
    return (
        "**Seeds and training per variant** (the global `train` section with each "
        "variant's own `train` keys): " + "; ".join(parts) + f". The seed {lecture} is the "
        "lecture's."
    )


# ---- what saturation means per nonlinearity (charlm.diagnostics.saturated) ------------


def saturation_rule(kind: str, threshold: float | str | None = None, x: str = "h") -> str | None:
    """The rule ``charlm.diagnostics.saturated`` counts for nonlinearity ``kind``, in
    symbols: tanh '|h| > 0.97', sigmoid '|2h − 1| > 0.97' (h near 0 or 1), relu 'h = 0'
    (off: the threshold plays no part); None for linear and gelu (no flat part)."""
    t = "t" if threshold is None else threshold
    t = f"{t:g}" if isinstance(t, float) else t
    if kind == "tanh":
        return f"|{x}| > {t}"
    if kind == "sigmoid":
        return f"|2{x} − 1| > {t}"
    if kind == "relu":
        return f"{x} = 0"
    return None


def no_saturation(kind: str) -> str:
    """What the report says instead of a 0 % saturated share for linear and gelu."""
    return f"no saturation for {kind}"


def dead_words(kind: str) -> str:
    """What a unit flat on every probe example is called: relu's 'never fire' (zero on
    every example, gradient exactly 0), the others' 'dead' (saturated on every one)."""
    return "never fire" if kind == "relu" else "dead"


def dead_units_sentence(inputs: Inputs) -> str:
    """Dead units per variant at init and after training (the seeds the figures show),
    in the words of each variant's nonlinearity (``saturation_rule``)."""
    parts, kinds = [], []
    for v in inputs.variants:
        kind = nonlinearity(inputs, v)
        layers = [layer.activations for layer in inputs.diagnostics[v].layers]
        if saturation_rule(kind) is None or layers[0]["init"].dead is None:
            parts.append(f"{v}: {no_saturation(kind)}")
            continue
        kinds.append(kind)
        s = first_good_seed(inputs, v)
        final = "–" if s is None else str(sum(a["final"].dead[s] for a in layers))
        never = " never fire" if kind == "relu" else ""
        parts.append(f"{v} {sum(a['init'].dead[0] for a in layers)} → {final}{never}")
    rules = []
    if any(k in ("tanh", "sigmoid") for k in kinds):
        rules.append("saturated on every probe example")
    if "relu" in kinds:
        rules.append("for relu, units that never fire: zero on every probe example")
    what = "; ".join(rules) + "; " if rules else ""
    return (
        f"**Dead units** ({what}at init → after training, seeds as in the figures): "
        + ", ".join(parts)
        + "."
    )


# ---- names of layers and weight matrices ----------------------------------------------


def hidden_label(index: int, kind: str) -> str:
    """'layer 1 (tanh)' for the first hidden layer: hidden layers are numbered 1..L
    everywhere in the report (``index`` 0-based, input side first)."""
    return f"layer {index + 1} ({kind})"


def weight_labels(names: Any) -> dict[str, str]:
    """The lecture's short names of the weight matrices ``names`` (``C`` and Linear
    weights ``layers.i.weight``): C, then W1, W2, ... in layer order, as
    ``charlm.model.MLP.weight_label`` gives them (the one-layer network's W1, W2)."""
    names = list(names)

    def index(name: str) -> int:
        parts = name.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1

    linear = sorted((n for n in names if n != "C"), key=index)
    return {n: "C" if n == "C" else f"W{linear.index(n) + 1}" for n in names}


def params_text(params_path: str) -> str:
    """The parameters file verbatim, comments included."""
    return Path(params_path).read_text(encoding="utf-8")
