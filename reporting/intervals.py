"""Paired comparisons of two variants over seeds: a t interval and a bootstrap interval.

Seed i of one variant starts from the same generator seed as seed i of the other, so
the seeds pair by index and the comparison is on the per-seed differences
d_i = a_i - b_i. The report states every difference as (higher loss) - (lower loss)
(``oriented``), in its tables and its sentences alike. Both intervals come from
scipy.stats: the paired t interval (``ttest_rel(a, b).confidence_interval``) and a
percentile bootstrap of mean(d) (``bootstrap``) drawn from a generator with a fixed
seed, so the report is deterministic. Pure functions; missing values (None, NaN,
infinity: a diverged seed) drop the pair.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95  # confidence level of the paired intervals
BOOTSTRAP_SEED = 20_260_101  # np.random.default_rng seed of the bootstrap resamples
BOOTSTRAP_RESAMPLES = 9_999

SOURCE = (
    "the t interval is scipy.stats.ttest_rel(first, second).confidence_interval(0.95), "
    "i.e. mean(d) ± t(0.975, n-1) · sd(d) / √n over the per-seed differences d; the "
    f"bootstrap interval is the percentile interval of mean(d) over "
    f"{BOOTSTRAP_RESAMPLES:,} resamples of d (scipy.stats.bootstrap, "
    f"numpy generator seeded with {BOOTSTRAP_SEED}); with few seeds it is narrower "
    "than the t interval, which accounts for the uncertainty of sd(d)"
)


@dataclass
class Paired:
    """Mean of a - b over seeds paired by index, with a t and a bootstrap interval.

    ``n`` pairs where both are finite; ``sd`` the sample sd (n - 1) of the differences;
    ``t`` the quantile t(1 - (1 - level)/2, n - 1); ``lo``/``hi`` the t interval and
    ``boot_lo``/``boot_hi`` the bootstrap one (None when n < 2), all in nats.
    """

    a: str
    b: str
    n: int
    mean: float | None
    sd: float | None
    lo: float | None
    hi: float | None
    t: float | None
    boot_lo: float | None = None
    boot_hi: float | None = None


def paired_difference(
    a_vals: list, b_vals: list, a: str = "a", b: str = "b", level: float = LEVEL
) -> Paired:
    """d_i = a_i - b_i over the seeds where both are finite; intervals on mean(d).

    t interval: mean(d) ± t_{(1+level)/2, n-1} · sd(d) / sqrt(n) (Student 1908; scipy's
    ``ttest_rel``). Bootstrap: the (1-level)/2 and (1+level)/2 quantiles of the mean of
    ``BOOTSTRAP_RESAMPLES`` resamples of d with replacement (Efron & Tibshirani 1993,
    percentile method; scipy's ``bootstrap``).
    """
    pairs = [
        (x, y)
        for x, y in zip(a_vals, b_vals, strict=False)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    n = len(pairs)
    if n == 0:
        return Paired(a, b, 0, None, None, None, None, None)
    d = [x - y for x, y in pairs]
    mean = statistics.fmean(d)
    if n < 2:
        return Paired(a, b, n, mean, None, None, None, None)
    xa, xb = (np.array(v, dtype=np.float64) for v in zip(*pairs, strict=True))
    with warnings.catch_warnings():  # equal differences: scipy warns about sd = 0
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_rel(xa, xb).confidence_interval(level)
        boot = stats.bootstrap(
            (xa - xb,),
            np.mean,
            confidence_level=level,
            n_resamples=BOOTSTRAP_RESAMPLES,
            method="percentile",
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        ).confidence_interval
    return Paired(
        a,
        b,
        n,
        mean,
        statistics.stdev(d),
        float(ci.low),
        float(ci.high),
        float(stats.t.ppf((1 + level) / 2, n - 1)),
        float(boot.low),
        float(boot.high),
    )


def oriented(c: Paired) -> Paired:
    """``c`` as (higher loss) - (lower loss): the pair swapped and every difference
    negated when the mean difference is negative, so that it is >= 0 and reads as the
    report's sentences read ("B beats A by d" beside "A - B = +d"). Unchanged when the
    mean is missing or not negative (sd and t do not depend on the direction)."""
    if c.mean is None or c.mean >= 0:
        return c

    def neg(x: float | None) -> float | None:
        return None if x is None else -x

    return Paired(
        c.b, c.a, c.n, -c.mean, c.sd, neg(c.hi), neg(c.lo), c.t, neg(c.boot_hi), neg(c.boot_lo)
    )


def verdict(c: Paired, spread_a: float | None, spread_b: float | None) -> str:
    """One sentence on a paired comparison (val loss, nats; lower is better), always in
    the direction of ``oriented``: the difference it states is (higher loss) - (lower
    loss), as the paired table gives it."""
    c = oriented(c)
    if c.mean is None:
        return (
            f"{c.a} vs {c.b}: no seed value that both ran has a finite loss in both (they "
            f"share no seed, or the shared ones diverged), so no comparison."
        )
    if c.lo is None:
        return (
            f"{c.a} vs {c.b}: only {c.n} paired seed, {c.a} - {c.b} = {c.mean:+.4f}; "
            f"an interval needs at least two."
        )
    better, worse, gap = c.b, c.a, c.mean
    spreads = [s for s in (spread_a, spread_b) if s is not None]
    if spreads:
        sd = max(spreads)
        beyond = "larger" if gap > sd else "smaller"
        spread_words = f"; the gap is {beyond} than the seed-to-seed sd ({sd:.4f})"
    else:
        spread_words = ""
    ci = f"95% CI of {worse} - {better}: [{c.lo:+.4f}, {c.hi:+.4f}], {c.n} pairs"
    if c.lo > 0:
        return f"{better} beats {worse} by {gap:.4f} nats ({ci}){spread_words}."
    return (
        f"no clear difference between {worse} and {better}: {worse} - {better} = "
        f"{c.mean:+.4f} nats, and the interval includes 0 ({ci}){spread_words}."
    )
