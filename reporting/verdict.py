"""The verdict at depth: variants of the same depth > 1 with and without BatchNorm,
parameter counts, and the sentences the report's summary adds about them.

"Does BatchNorm win at depth?" is answered by the paired interval of
reporting/intervals.py between a variant of several hidden layers with BatchNorm and one
without that shares its architecture otherwise (``reporting.stats.differing``: depth,
width, nonlinearity), seeds paired by their value (a variant may train its own seeds,
``variants.<name>.train.seeds``). Every variant's semantics come from its validated
``charlm.config.VariantConfig``. Pure functions of ``reporting.stats.Inputs``; no plotting.
"""

from __future__ import annotations

from itertools import combinations

from charlm.config import TrainConfig
from reporting.intervals import Paired, oriented
from reporting.stats import (
    Inputs,
    architecture,
    compared_knob,
    differing,
    paired_by_seed,
    summary_paragraph,
    train_of,
    variant,
)

FULL_STEPS = 200_000  # the lecture's run
FULL_DECAY = 150_000  # its deep network's lr decay step (lr 0.1, then 0.01)
# The lecture's own deep networks (params.yaml's defaults): the only variants whose
# full-length command the report offers ("the lecture trains them for 200,000 steps").
LECTURE_DEEP = ("deep_bn", "deep_tanh")


def deep_variants(inputs: Inputs) -> list[str]:
    """The variants (params order) with more than one hidden layer (the lecture's
    second half)."""
    return [v for v in inputs.variants if variant(inputs, v).layers > 1]


def batchnorm_pairs(inputs: Inputs) -> list[tuple[str, str]]:
    """(with BatchNorm, without) for every pair of deep variants that differ in
    BatchNorm only (``reporting.stats.differing``), params order."""
    out = []
    for a, b in combinations(deep_variants(inputs), 2):
        if differing(inputs, a, b) == ["BatchNorm"]:
            out.append((a, b) if variant(inputs, a).has_batchnorm else (b, a))
    return out


def depth_comparisons(inputs: Inputs, split: str = "val") -> list[Paired]:
    """Every pair of deep variants that differ in BatchNorm only, ``oriented`` (higher
    loss first) as the report's paired table has them among all comparisons."""
    return [
        oriented(paired_by_seed(inputs, a, b, split))
        for a, b in combinations(deep_variants(inputs), 2)
        if differing(inputs, a, b) == ["BatchNorm"]
    ]


def batchnorm_pair(inputs: Inputs) -> tuple[str, str] | None:
    """(with BatchNorm, without) of the first of ``batchnorm_pairs``, else None."""
    pairs = batchnorm_pairs(inputs)
    return pairs[0] if pairs else None


def depth_sentence(inputs: Inputs, split: str = "val") -> str:
    """One sentence answering "does BatchNorm win at depth?" with its paired interval,
    in nats of ``split`` loss, of (higher loss) - (lower loss) as the paired table
    states it (``oriented``: without - with BatchNorm when BatchNorm wins);
    '' with no deep variant."""
    deep = deep_variants(inputs)
    if not deep:
        return ""
    pair = batchnorm_pair(inputs)
    if pair is None:
        return (
            f"At depth, there is no pair of deep variants with and without BatchNorm of the "
            f"same depth and width in this run ({', '.join(deep)}), so no verdict."
        )
    bn, plain = pair
    arch = architecture(inputs, bn)
    layers, width, kind = arch["depth"], arch["width"], arch["nonlinearity"]
    depths = {variant(inputs, v).layers for v in deep}
    where = (
        f"At depth ({layers} hidden {kind} layers of {width} units)"
        if len(depths) == 1  # several depths: name the pair, not "the" depth
        else f"For {bn} and {plain} ({layers} hidden {kind} layers of {width} units)"
    )
    schedule = {v: _schedule(train_of(inputs, v)) for v in (bn, plain)}
    if schedule[bn] != schedule[plain]:
        return (
            f"{where}, no verdict: {bn} and {plain} trained differently ({bn}: "
            f"{schedule[bn]}; {plain}: {schedule[plain]}), so their losses are not comparable; "
            "give both the same `train` keys."
        )
    c = paired_by_seed(inputs, plain, bn, split)  # > 0: BatchNorm is better
    seeds = f"over {c.n} paired seed{'s' if c.n != 1 else ''}"
    if c.mean is None:
        return f"{where}, {bn} and {plain} have no seed with a finite {split} loss in common."
    o = oriented(c)  # the paired table's direction: the difference is >= 0
    diff = f"{o.a} - {o.b} = {o.mean:+.4f}"
    if c.lo is None:
        return f"{where}, {diff} nats of {split} loss {seeds}: too few for an interval."
    ci = f"paired 95% CI [{o.lo:+.4f}, {o.hi:+.4f}]"
    if c.lo > 0:
        verb = f"BatchNorm (**{bn}**) beats no BatchNorm ({plain}) by {o.mean:.4f} nats"
    elif c.hi < 0:
        verb = f"BatchNorm (**{bn}**) loses to no BatchNorm ({plain}) by {o.mean:.4f} nats"
    else:
        return (
            f"{where}, BatchNorm ({bn}) does not clearly win: {diff} nats of {split} loss "
            f"({ci}, which includes zero) {seeds}."
        )
    return (
        f"{where}, {verb} of {split} loss ({diff}, {ci}) {seeds}, after "
        f"{schedule[bn]}. (These are the lecture's two networks: besides BatchNorm they "
        f"differ in the gain, the biases and the output scaling; see the gain sweep in "
        f"docs/experiments.md for how the verdict moves with the gain.)"
    )


def _schedule(t: TrainConfig) -> str:
    """The length and learning rates of a run, in words (what makes losses comparable)."""
    lr = f"lr {t.lr:g}" + (
        f", then {t.lr_decayed:g} from step {t.lr_decay_step:,}"
        if t.lr_decay_step < t.max_steps
        else ""
    )
    return f"{t.max_steps:,} steps of batch {t.batch_size}, {lr}"


def full_run_command(inputs: Inputs, variants: list[str]) -> str:
    """The ``dvc exp run`` that trains ``variants`` for the lecture's 200,000 steps
    (with its lr decay at 150,000 where the variant decays elsewhere)."""
    parts = ["dvc exp run"]
    for v in variants:
        own = (variant(inputs, v).train or {}).keys()
        for key, value in (("max_steps", FULL_STEPS), ("lr_decay_step", FULL_DECAY)):
            if key == "lr_decay_step" and train_of(inputs, v).lr_decay_step == FULL_DECAY:
                continue
            prefix = "" if key in own else "++"  # ++: add the key or set it
            parts.append(f"-S {prefix}variants.{v}.train.{key}={value}")
    return " ".join(parts)


def deep_run_sentence(inputs: Inputs) -> str:
    """How long and with which seeds each deep variant trained (variants that trained
    alike in one group), and the command for the lecture's full run of the lecture's
    own deep variants (``LECTURE_DEEP``) that ran shorter; '' with no deep variant."""
    deep = deep_variants(inputs)
    if not deep:
        return ""
    groups: dict[str, list[str]] = {}
    for v in deep:
        t = train_of(inputs, v)
        n = len(t.seeds)
        if t.lr_decay_step < t.max_steps:
            lr = f"lr {t.lr:g}, then {t.lr_decayed:g} from step {t.lr_decay_step:,}"
        else:
            lr = f"lr {t.lr:g} throughout: its decay step {t.lr_decay_step:,} lies past the end"
        groups.setdefault(f"{t.max_steps:,} steps ({lr}), {n} seed{'s' if n != 1 else ''}", [])
        groups[f"{t.max_steps:,} steps ({lr}), {n} seed{'s' if n != 1 else ''}"].append(v)
    runs = [f"{', '.join(vs)} {words}" for words, vs in groups.items()]
    short = [v for v in deep if v in LECTURE_DEEP and train_of(inputs, v).max_steps < FULL_STEPS]
    text = "The deep variants ran " + "; ".join(runs) + "."
    if short:
        text += (
            f" The lecture trains {' and '.join(short)} for {FULL_STEPS:,} steps: "
            f"`{full_run_command(inputs, short)}`."
        )
    return text


def summary(inputs: Inputs) -> str:
    """The report's opening paragraph: ``reporting.stats.summary_paragraph`` and, when
    deep variants ran, the depth verdict and their run length."""
    parts = [summary_paragraph(inputs), depth_sentence(inputs), deep_run_sentence(inputs)]
    return " ".join(p for p in parts if p)


def paired_rows(comps: list[Paired], inputs: Inputs | None = None) -> list[dict]:
    """The table of paired comparisons: with ``inputs``, what each pair differs in
    (``reporting.stats.compared_knob``); mean difference (first - second), sd, t
    quantile, the t interval and the bootstrap interval (nats). Each pair is shown
    ``oriented`` (higher loss first), the direction of the verdicts' sentences."""
    comps = [oriented(c) for c in comps]
    rows = [{
        "first": c.a, "second": c.b,
        **({"differs in": compared_knob(inputs, c.a, c.b)} if inputs is not None else {}),
        "pairs": c.n, "mean difference (first - second)": c.mean, "sd": c.sd,
        "t (0.975, n-1)": c.t, "95% CI low": c.lo, "95% CI high": c.hi,
        "bootstrap 95% low": c.boot_lo, "bootstrap 95% high": c.boot_hi,
    } for c in comps]  # fmt: skip
    return [{k: "–" if v is None else v for k, v in row.items()} for row in rows]


def param_rows(inputs: Inputs) -> list[dict]:
    """Every variant's network (``reporting.stats.architecture``), init recipe and
    parameter count per model (one seed): metrics.json's ``n_params``, else the
    diagnostics' (None when neither has it)."""
    rows = []
    for v in inputs.variants:
        c, arch = variant(inputs, v), architecture(inputs, v)
        n = inputs.metrics[v].get("n_params") or inputs.diagnostics[v].n_params or None
        bn = "no"
        if c.has_batchnorm:
            where = [w for w, on in (("hidden", c.batchnorm), ("output", c.batchnorm_output)) if on]
            bn = f"{' + '.join(where)} ({c.batchnorm_form})"
        rows.append(
            {
                "variant": v,
                "hidden layers": arch["depth"],
                "units": arch["width"],
                "nonlinearity": arch["nonlinearity"],
                "BatchNorm": bn,
                "init": c.init,
                "parameters": "–" if n is None else f"{n:,}",
            }
        )
    return rows
