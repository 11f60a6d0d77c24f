"""Mean-field theory beside the depth atlas's measurements (``charlm.theory``'s formulas
applied to the atlas's cells), the "measured vs predicted" table and the sentences
generated from it. Nothing here is fitted: every prediction uses only the gain, the
depth and the measured first layer's input (q^1 = gain^2 * mean((x^0)^2)).

Cells are the dicts the atlas_init / atlas_width stages write (``stats``: quantity ->
'median' / 'q10' / 'q90', (G, L) or (G,); non-finite values as None / 'inf'). No I/O.
"""

from __future__ import annotations

import math

import numpy as np

from charlm import theory

# |relative error| up to this counts as "theory holds" in the generated sentences.
HOLDS = 0.10


def arr(x) -> np.ndarray:
    """A stored table (nested lists; None = NaN, 'inf' / '-inf') as float64."""
    if isinstance(x, list):
        return np.array([arr(v) for v in x], dtype=np.float64)
    if x is None:
        return np.float64(np.nan)
    return np.float64(float(x))


def predict(
    nonlinearity: str,
    gain: float,
    depth: int,
    input_ms: float,
    batchnorm: bool = False,
    batch_size: int = 32,
    threshold: float = 0.97,
) -> dict:
    """Mean-field predictions for one architecture and gain, per hidden layer 1..L.

    Without BatchNorm: q^l from ``theory.propagate_q`` starting at
    ``q_from_input(input_ms, gain)`` (Poole et al. 2016, sec. 2); 'pre_std' sqrt(q^l);
    'act_std' ``postactivation_std``; 'saturated' ``saturated_share`` (tanh, sigmoid)
    or P(h <= 0) = 1/2 (relu, the share of exact zeros), else NaN; 'grad_ratio' the
    std ratio of d loss / d x at layer 1 over layer L, sqrt(``gradient_ratio``[0]);
    'grad_growth' its per-layer factor of the mean square, the geometric mean of
    chi(q^k), k = 2..L (Schoenholz et al. 2017, gradient section).

    With BatchNorm: the nonlinearity's input is normalised, so 'pre_std' 1 and
    'act_std' ``postactivation_std(1)`` (B = inf); 'grad_growth'
    ``batchnorm_gradient_growth`` where Yang et al. 2019 give a closed form (linear
    at any B; relu at B = inf, used here for B = 32 and said so in 'note'); tanh,
    sigmoid, gelu: ``batchnorm_large_batch_growth`` (B = inf, our derivation,
    docs/theory.md), with the note; saturation and grad_ratio follow from those.
    """
    L = depth
    out: dict = {"note": ""}
    if not batchnorm:
        q = theory.propagate_q(theory.q_from_input(input_ms, gain), gain, nonlinearity, L)
        out["pre_std"] = np.sqrt(q)
        out["act_std"] = np.array([_safe(theory.postactivation_std, v, nonlinearity) for v in q])
        out["saturated"] = np.array([_share(v, nonlinearity, threshold) for v in q])
        ratio = theory.gradient_ratio(q, gain, nonlinearity) if np.isfinite(q).all() else None
        out["grad_ratio"] = math.sqrt(ratio[0]) if ratio is not None else math.nan
        out["grad_growth"] = (
            ratio[0] ** (1.0 / (L - 1)) if ratio is not None and L > 1 else math.nan
        )
        return out
    out["pre_std"] = np.ones(L)
    out["act_std"] = np.full(L, theory.postactivation_std(1.0, nonlinearity))
    out["saturated"] = np.full(L, _share(1.0, nonlinearity, threshold))
    try:
        growth = theory.batchnorm_gradient_growth(nonlinearity, batch_size)
        out["note"] = f"Yang et al. 2019, closed form at B = {batch_size}"
    except NotImplementedError:
        if nonlinearity == "relu":
            growth = theory.batchnorm_gradient_growth("relu", math.inf)
            out["note"] = "Yang et al. 2019 at B = inf; no closed form at B = 32"
        else:
            growth = theory.batchnorm_large_batch_growth(nonlinearity)
            out["note"] = "B = inf, our derivation (docs/theory.md); no closed form at B = 32"
    out["grad_growth"] = growth
    out["grad_ratio"] = growth ** ((L - 1) / 2.0)
    return out


def _safe(fn, q: float, nl: str) -> float:
    return fn(q, nl) if math.isfinite(q) else math.inf


def _share(q: float, nl: str, threshold: float) -> float:
    if nl in ("tanh", "sigmoid"):
        return theory.saturated_share(q, nl, threshold) if math.isfinite(q) else 1.0
    if nl == "relu":
        return theory.dead_share(q) if math.isfinite(q) else 0.5
    return math.nan


def rel_err(measured: float, predicted: float) -> float:
    """(measured - predicted) / |predicted|; NaN when the prediction is 0 or either is
    not finite (no relative error exists)."""
    if not (math.isfinite(measured) and math.isfinite(predicted)) or predicted == 0:
        return math.nan
    return (measured - predicted) / abs(predicted)


def _row(group, case, quantity, cell, stat, gi, layer, predicted, note="") -> dict:
    s = cell["stats"][stat]
    pick = (lambda a: arr(a)[gi, layer]) if layer is not None else (lambda a: arr(a)[gi])
    m, lo, hi = (float(pick(s[k])) for k in ("median", "q10", "q90"))
    return {
        "group": group,
        "case": case,
        "quantity": quantity,
        "measured": m,
        "q10": lo,
        "q90": hi,
        "predicted": float(predicted),
        "rel_err": rel_err(m, float(predicted)),
        "in_band": bool(lo <= float(predicted) <= hi),
        "note": note,
    }


def deepest(cells: list[dict], nl: str, bn: bool, width: int | None = None) -> dict | None:
    """The deepest cell of a family (the one whose per-layer rates are best resolved)."""
    mine = [
        c
        for c in cells
        if c["nonlinearity"] == nl
        and c["batchnorm"] == bn
        and (width is None or c["width"] == width)
    ]
    return max(mine, key=lambda c: c["depth"]) if mine else None


def input_ms(cell: dict, gi: int) -> float:
    return float(arr(cell["stats"]["input_ms"]["median"])[gi])


def comparisons(cells: list[dict], batch_size: int = 32) -> list[dict]:
    """The measured-vs-predicted rows (medians with 10-90% bands over seeds), each with
    its relative error. Groups: 'tanh fixed point' (activation std and saturated share
    at the last layer of the deepest tanh cell, gains > 1, where q* > 0), 'gradient
    growth' (per-layer factor of the mean squared gradient, tanh and relu, every gain,
    without BatchNorm; tanh, relu and linear with it), 'signal decay' (per-layer factor
    of the pre-activation std, relu and linear, every gain, without BatchNorm)."""
    rows: list[dict] = []
    c = deepest(cells, "tanh", False)
    if c is not None and c["depth"] > 1:
        L = c["depth"]
        for gi, g in enumerate(c["gains"]):
            if g <= 1.0:
                continue
            q = theory.fixed_point(g, "tanh")
            case = f"tanh g={g:.3g} L={L} (layer {L})"
            rows.append(_row("tanh fixed point", case, "act std", c, "act_std", gi, L - 1,
                             theory.postactivation_std(q, "tanh"), f"q*={q:.3g}"))  # fmt: skip
            rows.append(_row("tanh fixed point", case, "saturated share", c, "saturated", gi,
                             L - 1, theory.saturated_share(q, "tanh", c["threshold"])))  # fmt: skip
    for nl in ("tanh", "relu"):
        c = deepest(cells, nl, False)
        if c is None or c["depth"] < 2:
            continue
        for gi, g in enumerate(c["gains"]):
            p = predict(nl, g, c["depth"], input_ms(c, gi))
            rows.append(_row("gradient growth", f"{nl} g={g:.3g} L={c['depth']}, no BN",
                             "per-layer growth of mean sq. gradient", c, "grad_growth", gi,
                             None, p["grad_growth"]))  # fmt: skip
    for nl in ("tanh", "relu", "linear"):
        c = deepest(cells, nl, True)
        if c is None or c["depth"] < 2:
            continue
        gi = int(np.argmin([abs(g - theory.default_gain(nl)) for g in c["gains"]]))
        p = predict(nl, c["gains"][gi], c["depth"], input_ms(c, gi), True, batch_size)
        rows.append(_row("gradient growth", f"{nl} g={c['gains'][gi]:.3g} L={c['depth']}, BN",
                         "per-layer growth of mean sq. gradient", c, "grad_growth", gi, None,
                         p["grad_growth"], p["note"]))  # fmt: skip
    for nl, slope in (("relu", lambda g: g / math.sqrt(2)), ("linear", lambda g: g)):
        c = deepest(cells, nl, False)
        if c is None or c["depth"] < 2:
            continue
        for gi, g in enumerate(c["gains"]):
            crit = math.sqrt(2) if nl == "relu" else 1.0
            side = "below" if g < crit - 1e-9 else ("above" if g > crit + 1e-9 else "at")
            rows.append(_row("signal decay", f"{nl} g={g:.3g} ({side} critical) L={c['depth']}",
                             "per-layer factor of pre-activation std", c, "pre_decay", gi,
                             None, slope(g)))  # fmt: skip
    return rows


def sentences(rows: list[dict], width_rows: list[dict] | None = None) -> list[str]:
    """Plain sentences generated from the table: per group where theory holds (|rel
    err| <= ``HOLDS``) and where it fails, with the size of the misses and, where the
    numbers show it, why (the width sweep's trend for finite width; BatchNorm's finite
    batch; the first layer's input)."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == group and math.isfinite(r["rel_err"])]
        if not rs:
            continue
        good = [r for r in rs if abs(r["rel_err"]) <= HOLDS]
        bad = sorted((r for r in rs if abs(r["rel_err"]) > HOLDS), key=lambda r: -abs(r["rel_err"]))
        text = (
            f"{group}: theory holds within {HOLDS:.0%} in {len(good)} of {len(rs)} cases "
            f"(median |relative error| {np.median([abs(r['rel_err']) for r in rs]):.1%})"
        )
        if bad:
            worst = "; ".join(
                f"{r['case']} {r['quantity']}: measured {r['measured']:.4g} "
                f"[{r['q10']:.3g}, {r['q90']:.3g}] vs {r['predicted']:.4g} ({r['rel_err']:+.0%}"
                + (", inside the seed band: sampling noise)" if r["in_band"] else ")")
                for r in bad[:3]
            )
            text += f". It fails for {worst}"
        out.append(text + ".")
    bn = [r for r in rows if r["case"].endswith(", BN") and math.isfinite(r["rel_err"])]
    for r in bn:
        out.append(
            f"With BatchNorm, {r['case'].split(' ')[0]}: measured growth {r['measured']:.3f} "
            f"per layer vs {r['predicted']:.3f} predicted ({r['note']}); "
            + ("a finite-batch (B = 32) or finite-width effect the formula leaves out."
               if abs(r["rel_err"]) > HOLDS else "agreement.")
        )  # fmt: skip
    if width_rows:
        errs = [(r["width"], r["rel_err"]) for r in width_rows if math.isfinite(r["rel_err"])]
        if len(errs) >= 2:
            errs.sort()
            trend = "shrinks" if abs(errs[-1][1]) < abs(errs[0][1]) else "does not shrink"
            out.append(
                f"Finite width: in the width sweep the relative error of {width_rows[0]['what']} "
                f"goes from {errs[0][1]:+.1%} at width {errs[0][0]} to {errs[-1][1]:+.1%} at "
                f"width {errs[-1][0]}: it {trend} as the width grows, as mean field (infinite "
                "width) expects."
            )
    return out


def width_rows(cells: list[dict], gain_index: int = -1) -> list[dict]:
    """Per width-sweep cell: the last layer's activation std against its prediction
    from the measured input (finite-depth propagate_q), at one gain."""
    out = []
    for c in sorted(cells, key=lambda c: c["width"]):
        gi = gain_index % len(c["gains"])
        g, L = c["gains"][gi], c["depth"]
        p = predict(c["nonlinearity"], g, L, input_ms(c, gi))
        m = float(arr(c["stats"]["act_std"]["median"])[gi, L - 1])
        pred = float(p["act_std"][-1])
        what = f"the {c['nonlinearity']} activation std at layer {L} (gain {g:.3g})"
        out.append(
            {"width": c["width"], "gain": g, "measured": m, "predicted": pred,
             "rel_err": rel_err(m, pred), "what": what}
        )  # fmt: skip
    return out
