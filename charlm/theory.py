"""Mean-field signal propagation for a deep fully connected net at initialisation.

The predictions the depth atlas puts beside its measurements (DESIGN.md, "Signal
propagation"). Net: h^l = W^l x^(l-1) + b^l, x^l = phi(h^l), l = 1..L, with
W ~ N(0, gain^2 / fan_in) and b ~ N(0, sigma_b^2); q^l = E[(h^l_i)^2] is the
pre-activation second moment, z ~ N(0, 1). Infinite width, as in Poole et al. 2016
("Exponential expressivity in deep neural networks through transient chaos", sec. 2)
and Schoenholz et al. 2017 ("Deep Information Propagation", secs. 2-4).

Pure functions of floats, numpy/scipy only, float64. Every Gaussian expectation is
Gauss-Hermite quadrature (``scipy.special.roots_hermitenorm``) with an even node count
growing with q (``_n_nodes``: 256 up to q = 2, then 128 q rounded up to a power of two,
at most 8192) and one Richardson step. Against adaptive ``scipy.integrate.quad``, the
second moments of tanh, sigmoid, gelu and of their slopes are within 1e-11 for
q <= 64 and 2e-10 at q = 100 (tests check 1e-9); beyond, tanh degrades (1e-6 at
q = 250, 6e-4 at q = 1e3) as the rule cannot resolve a feature of width 1 under a
Gaussian of std sqrt(q). relu: E[relu^2] and E[relu'^2] are exact to rounding (no
node at the kink), E[relu] within ~1e-6 relative. 2-D expectations (correlation map):
~1e-11 for tanh at q <= 4, ~1e-5 relative for relu's kinks. Derivations and sources:
docs/theory.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from scipy import optimize, special

NONLINEARITIES = ("tanh", "relu", "linear", "sigmoid", "gelu")
Fn = Callable[[np.ndarray], np.ndarray]
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_Q_INF = 1e15  # q beyond this counts as divergent in fixed_point


def activation(nonlinearity: str) -> tuple[Fn, Fn]:
    """(phi, phi') as numpy ufunc-style callables on float64 arrays.

    relu' is 0 at 0 (torch's convention); gelu is the exact form x * Phi(x)
    (``torch.nn.functional.gelu`` default, Hendrycks & Gimpel 2016).
    Raises ValueError for a name outside ``NONLINEARITIES``.
    """
    if nonlinearity == "tanh":
        return np.tanh, lambda h: 1.0 - np.tanh(h) ** 2
    if nonlinearity == "relu":
        return lambda h: np.maximum(h, 0.0), lambda h: (h > 0).astype(np.float64)
    if nonlinearity == "linear":
        return lambda h: h, np.ones_like
    if nonlinearity == "sigmoid":
        return special.expit, lambda h: special.expit(h) * special.expit(-h)
    if nonlinearity == "gelu":
        return (
            lambda h: h * special.ndtr(h),
            lambda h: special.ndtr(h) + h * np.exp(-0.5 * h * h) / _SQRT_2PI,
        )
    raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected one of {NONLINEARITIES}")


def _n_nodes(q: float) -> int:
    """Power of two >= 128 q (node spacing ~ 1 / sqrt q), between 256 and 8192."""
    return int(min(8192, max(256, 2 ** math.ceil(math.log2(max(128.0 * q, 1.0))))))


@functools.cache
def _rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    z, w = special.roots_hermitenorm(n)
    return z, w / w.sum()  # weights of N(0, 1), summing to 1


def _check_q(q: float) -> float:
    q = float(q)
    if not (q >= 0.0 and math.isfinite(q)):
        raise ValueError(f"q must be finite and >= 0, got {q}")
    return q


def gaussian_expectation(fn: Fn, q: float) -> float:
    """E[fn(h)] for h ~ N(0, q), by Gauss-Hermite quadrature (accuracy: module docstring).

    fn maps a float64 array to an array of the same shape; q (float, >= 0) is a variance.
    One Richardson step on the node count, 2 Q(2n) - Q(n): a kink at h = 0 (relu) leaves
    an O(1/n) error that this cancels; for smooth fn both sums agree to rounding.
    Raises ValueError for negative or non-finite q.
    """
    q = _check_q(q)
    n = _n_nodes(q)
    sums = []
    for m in (n, 2 * n):
        z, w = _rule(m)
        sums.append(float(w @ fn(math.sqrt(q) * z)))
    return 2.0 * sums[1] - sums[0]


def q_from_input(mean_square_input: float, gain: float, sigma_b: float = 0.0) -> float:
    """q^1 = gain^2 * mean((x^0)^2) + sigma_b^2: the first layer's pre-activation moment.

    mean_square_input is mean((x^0)^2) of the actual input (for the makemore MLP, the
    concatenated embedding, ~1 for C ~ N(0, 1)), not an assumed 1. Poole et al. 2016, sec. 2.
    """
    return gain**2 * float(mean_square_input) + sigma_b**2


def length_map(q: float, gain: float, nonlinearity: str, sigma_b: float = 0.0) -> float:
    """q^(l+1) = gain^2 E[phi(sqrt(q^l) z)^2] + sigma_b^2 (float, a variance).

    Poole et al. 2016, sec. 2; Schoenholz et al. 2017, sec. 2. Raises ValueError for an
    unknown nonlinearity or a negative / non-finite q.
    """
    phi, _ = activation(nonlinearity)
    return gain**2 * gaussian_expectation(lambda h: phi(h) ** 2, q) + sigma_b**2


def propagate_q(
    q1: float, gain: float, nonlinearity: str, depth: int, sigma_b: float = 0.0
) -> np.ndarray:
    """float64 array (depth,) of q^1..q^depth, q^1 given (see ``q_from_input``).

    Iterates ``length_map`` in float64 (no cut-off: relu at gain 1.9 reaches 1e35 by
    layer 64); an entry overflowing float64 is inf and so is everything after it.
    Raises ValueError for depth < 1.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    qs = np.empty(depth, dtype=np.float64)
    qs[0] = _check_q(q1)
    for i in range(1, depth):
        prev = qs[i - 1]
        qs[i] = length_map(prev, gain, nonlinearity, sigma_b) if math.isfinite(prev) else prev
    return qs


def preactivation_std(q: float | np.ndarray) -> float | np.ndarray:
    """Predicted std of h^l: sqrt(q^l) (h^l ~ N(0, q^l) in mean field; zero mean)."""
    return np.sqrt(q)


def postactivation_std(q: float, nonlinearity: str) -> float:
    """Predicted std of x^l = phi(h^l), h^l ~ N(0, q): sqrt(E[phi^2] - E[phi]^2).

    The std over units and inputs that a measurement of ``x.std()`` estimates (relu,
    sigmoid and gelu outputs have nonzero mean, which this subtracts).
    """
    phi, _ = activation(nonlinearity)
    m1 = gaussian_expectation(phi, q)
    m2 = gaussian_expectation(lambda h: phi(h) ** 2, q)
    return math.sqrt(max(m2 - m1 * m1, 0.0))


def saturated_share(q: float, nonlinearity: str, threshold: float = 0.97) -> float:
    """Predicted share of saturated units, P(|s(h)| > threshold) for h ~ N(0, q).

    tanh: s = tanh, so P(|h| > atanh t) = erfc(atanh(t) / sqrt(2 q)) (the lecture's
    ``abs() > 0.97``). sigmoid: s = 2 sigmoid(h) - 1 = tanh(h / 2), the sigmoid rescaled
    to (-1, 1), i.e. sigmoid(h) < (1 - t)/2 or > (1 + t)/2; in both cases a unit is
    saturated when phi'(h) < (1 - t^2) phi'(0), the same relative-slope criterion.
    Closed form via erfc (no quadrature). Raises ValueError for other nonlinearities
    (relu: see ``dead_share``) or a threshold outside (0, 1).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    q = _check_q(q)
    scale = {"tanh": 1.0, "sigmoid": 2.0}.get(nonlinearity)
    if scale is None:
        raise ValueError(f"saturation is defined for tanh and sigmoid, not {nonlinearity!r}")
    if q == 0.0:
        return 0.0
    return float(special.erfc(scale * math.atanh(threshold) / math.sqrt(2.0 * q)))


def dead_share(q: float, nonlinearity: str = "relu") -> float:
    """Predicted share of relu units with h <= 0: P(h <= 0) = 1/2 for any q > 0.

    h ~ N(0, q) is symmetric in mean field (zero-mean weights and biases); 1.0 at q = 0
    (every h is exactly 0). Raises ValueError for a nonlinearity other than relu.
    """
    if nonlinearity != "relu":
        raise ValueError(f"dead share is defined for relu, not {nonlinearity!r}")
    return 1.0 if _check_q(q) == 0.0 else 0.5


def chi(q: float, gain: float, nonlinearity: str) -> float:
    """chi(q) = gain^2 E[phi'(sqrt(q) z)^2]: per-layer factor of the mean squared gradient.

    Poole et al. 2016, sec. 2 and Schoenholz et al. 2017, sec. 2 (chi_1 when q = q*);
    its role for gradients: Schoenholz et al.'s section on gradient backpropagation.
    Float, dimensionless.
    """
    _, dphi = activation(nonlinearity)
    return gain**2 * gaussian_expectation(lambda h: dphi(h) ** 2, q)


@functools.cache
def fixed_point(
    gain: float, nonlinearity: str, sigma_b: float = 0.0, q_start: float = 1.0
) -> float:
    """q*: the fixed point of ``length_map`` that iteration from q_start converges to.

    Poole et al. 2016, sec. 2. Found by root-finding (Brent) on length_map(q) - q after
    bracketing by growing or shrinking q geometrically (the map is increasing in q, so
    the iterates are monotone). Returns 0.0 when the signal dies (tanh with gain <= 1 and
    sigma_b = 0; relu with gain^2 < 2 and sigma_b = 0; linear with gain < 1), inf when it
    diverges (q beyond 1e15: relu with gain^2 > 2, linear with gain > 1, or either at
    the critical gain with sigma_b > 0), and q_start itself when length_map(q_start) =
    q_start to 1e-12 relative (e.g. relu at gain sqrt(2), linear at gain 1, sigma_b = 0:
    every q is a fixed point). For tanh with gain > 1 and sigma_b = 0, q = 0 is an
    unstable fixed point and q_start > 0 reaches the stable q* > 0. Cached.
    """
    q0 = _check_q(q_start)

    def excess(q: float) -> float:
        return length_map(q, gain, nonlinearity, sigma_b) - q

    f0 = excess(q0)
    if abs(f0) <= 1e-12 * max(q0, 1e-300):
        return q0
    if f0 > 0:  # iterates increase: look above q0
        lo, hi = q0, max(16.0 * q0, 1e-12)
        while excess(hi) > 0:
            if hi > _Q_INF:
                return math.inf
            lo, hi = hi, 16.0 * hi
    else:  # iterates decrease: look below q0
        lo, hi = 1e-4 * q0, q0
        while excess(lo) < 0:
            if lo < 1e-300:
                return 0.0
            lo, hi = 1e-4 * lo, lo
    return float(optimize.brentq(excess, lo, hi, xtol=1e-300, rtol=1e-13, maxiter=200))


def chi_1(gain: float, nonlinearity: str, sigma_b: float = 0.0) -> float:
    """chi_1 = chi(q*) (Schoenholz et al. 2017, sec. 2). Raises ValueError if q* is inf."""
    q = fixed_point(gain, nonlinearity, sigma_b)
    if not math.isfinite(q):
        raise ValueError(f"q* is infinite for {nonlinearity} at gain {gain}: no chi_1")
    return chi(q, gain, nonlinearity)


def depth_scale(slope: float) -> float:
    """xi = -1 / ln(slope) in layers; inf when |ln slope| < 1e-12 (criticality).

    Schoenholz et al. 2017, sec. 3 (xi_c) and their gradient section (-1/ln chi_1):
    a quantity multiplied by ``slope`` per layer changes by e over |xi| layers. The sign
    is kept: xi < 0 means growth (slope > 1, e.g. exploding gradients).
    """
    if slope <= 0.0:
        raise ValueError(f"slope must be > 0, got {slope}")
    log = math.log(slope)
    return math.inf if abs(log) < 1e-12 else -1.0 / log


def _pair_expectation(f: Fn, g: Fn, q: float, c: float) -> float:
    """E[f(u1) g(u2)], (u1, u2) ~ N(0, q [[1, c], [c, 1]]): tensor Gauss-Hermite rule,
    n = min(_n_nodes(q), 512) nodes per axis, with the Richardson step of
    ``gaussian_expectation``."""
    n = min(_n_nodes(q), 512)
    s, r = math.sqrt(q), math.sqrt(max(1.0 - c * c, 0.0))
    sums = []
    for m in (n, 2 * n):
        z, w = _rule(m)
        u1 = s * z[:, None]
        u2 = s * (c * z[:, None] + r * z[None, :])
        sums.append(float(w @ (f(u1) * g(u2)) @ w))
    return 2.0 * sums[1] - sums[0]


def correlation_map(
    c: float, q: float, gain: float, nonlinearity: str, sigma_b: float = 0.0
) -> float:
    """c^(l+1) from c^l for two inputs whose pre-activations both have moment q.

    c^(l+1) = (gain^2 E[phi(u1) phi(u2)] + sigma_b^2) / length_map(q), with
    u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2): Poole et al. 2016, sec. 2;
    Schoenholz et al. 2017, sec. 2 (their q* in the denominator equals length_map(q)
    at q = q*). 2-D Gauss-Hermite (<= 1024^2 nodes): 1e-10 for tanh at q <= 4; relu's
    kinks limit it to ~1e-5 relative (tests compare Cho & Saul's arc-cosine form).
    Raises ValueError for c outside [-1, 1].
    """
    if not -1.0 <= c <= 1.0:
        raise ValueError(f"c must be in [-1, 1], got {c}")
    phi, _ = activation(nonlinearity)
    q_next = length_map(q, gain, nonlinearity, sigma_b)
    return (gain**2 * _pair_expectation(phi, phi, q, c) + sigma_b**2) / q_next


@functools.cache
def correlation_fixed_point(gain: float, nonlinearity: str, sigma_b: float = 0.0) -> float:
    """c*, the stable fixed point of ``correlation_map`` at q = q*.

    Schoenholz et al. 2017, sec. 3: c* = 1 is stable iff chi_1 <= 1 (ordered phase,
    returned without search; also when q* = 0, where the map degenerates); in the
    chaotic phase (chi_1 > 1) c* < 1 is found by Brent's method on [0, 1 - delta]
    (0 exactly for odd phi with sigma_b = 0). Raises ValueError if q* is inf. Cached.
    """
    q = fixed_point(gain, nonlinearity, sigma_b)
    if not math.isfinite(q):
        raise ValueError(f"q* is infinite for {nonlinearity} at gain {gain}: no c*")
    if q == 0.0 or chi(q, gain, nonlinearity) <= 1.0:
        return 1.0

    def excess(c: float) -> float:
        return correlation_map(c, q, gain, nonlinearity, sigma_b) - c

    if abs(excess(0.0)) < 1e-14:
        return 0.0
    for delta in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        if excess(1.0 - delta) < 0:
            return float(optimize.brentq(excess, 0.0, 1.0 - delta, xtol=1e-14))
    return 1.0  # numerically at criticality


def chi_c(gain: float, nonlinearity: str, sigma_b: float = 0.0) -> float:
    """Slope of the correlation map at c*: gain^2 E[phi'(u1) phi'(u2)] at (q*, c*).

    Schoenholz et al. 2017, sec. 3 (chi_c, the slope that sets xi_c; by Price's theorem
    d/dc E[phi(u1) phi(u2)] = q E[phi'(u1) phi'(u2)]); equals chi_1 where c* = 1.
    Raises ValueError if q* is inf.
    """
    q = fixed_point(gain, nonlinearity, sigma_b)
    c = correlation_fixed_point(gain, nonlinearity, sigma_b)
    _, dphi = activation(nonlinearity)
    return gain**2 * _pair_expectation(dphi, dphi, q, c)


def xi_c(gain: float, nonlinearity: str, sigma_b: float = 0.0) -> float:
    """xi_c = -1 / ln(chi_c) in layers (Schoenholz et al. 2017, sec. 3); inf at criticality."""
    return depth_scale(chi_c(gain, nonlinearity, sigma_b))


def trainable_depth(gain: float, nonlinearity: str, sigma_b: float = 0.0) -> float:
    """6 xi_c layers: Schoenholz et al. 2017 found random nets trainable up to about this
    depth (their experiments, MNIST and CIFAR10 over depth and gain); 6 is an empirical
    constant fitted there, not derived.
    """
    return 6.0 * xi_c(gain, nonlinearity, sigma_b)


def gradient_ratio(q_list: np.ndarray | list[float], gain: float, nonlinearity: str) -> np.ndarray:
    """Predicted d^l / d^L for l = 1..L: float64 array (L,), last entry 1.

    q_list = [q^1, ..., q^L] for the hidden layers (e.g. ``propagate_q``); d^l is the
    mean square of d loss / d x^l_i over units and inputs, x^l = phi(h^l) the output of
    hidden layer l. Mean field (gradient independence; Schoenholz et al. 2017, gradient
    backpropagation section) with equal hidden widths: d^l = chi(q^(l+1)) d^(l+1), so
    d^l / d^L = prod_{k=l+1..L} chi(q^k). The output layer's own weights set d^L and
    cancel in the ratio. Compare with measured std(d loss / d x^l) / std(d loss / d x^L)
    via the square root. Unequal widths n_l would add a factor n_(l+1) / n_l per layer.
    """
    qs = np.asarray(q_list, dtype=np.float64)
    if qs.ndim != 1 or qs.size == 0:
        raise ValueError("q_list must be a non-empty 1-D sequence of q^1..q^L")
    factors = np.array([chi(q, gain, nonlinearity) for q in qs[1:]] + [1.0])
    return np.cumprod(factors[::-1])[::-1]


def batchnorm_gradient_growth(nonlinearity: str, batch_size: float) -> float:
    """Per-layer growth factor of the mean squared gradient, deep BatchNorm net, init.

    Net: h = W x, x' = phi(BN(h)) (no skip connections, BN without affine parameters),
    infinite width, gradients toward the input; the factor does not depend on the gain
    (BN removes the scale of W). Yang et al. 2019, "A Mean Field Theory of Batch
    Normalization" (ICLR), gradient backpropagation results:

    - linear, batch B >= 4: (B - 2) / (B - 3); 1 for B = inf.
    - relu, B = inf: pi / (pi - 1) ~ 1.467.

    Their theorem numbers could not be checked here (no full text offline), so both
    values are re-derived in docs/theory.md and checked against simulated nets in the
    tests. Finite-batch relu and every tanh/sigmoid/gelu case: NotImplementedError (the
    paper characterises those through integral expressions and numerics, not a closed
    form reproduced here; for B = inf see ``batchnorm_large_batch_growth``, our
    derivation). Raises ValueError for linear with B < 4 (the rate is infinite at B = 3).
    """
    activation(nonlinearity)  # validates the name
    b = float(batch_size)
    if nonlinearity == "linear":
        if b < 4:
            raise ValueError(f"the linear rate needs batch_size >= 4, got {batch_size}")
        return 1.0 if math.isinf(b) else (b - 2.0) / (b - 3.0)
    if nonlinearity == "relu" and math.isinf(b):
        return math.pi / (math.pi - 1.0)
    raise NotImplementedError(
        f"no closed form implemented for {nonlinearity} BatchNorm at batch size {batch_size}: "
        "Yang et al. 2019 give closed forms for linear (any B) and relu (B = inf) only "
        "as reproduced here"
    )


def batchnorm_large_batch_growth(nonlinearity: str) -> float:
    """E[phi'(z)^2] / Var(phi(z)), z ~ N(0, 1): the B = inf limit of the factor above.

    Our derivation (docs/theory.md, not a published formula for tanh, sigmoid, gelu):
    with B = inf, BN divides the gradient by the batch std of its input, which is
    gain * std(phi(z)), the weights multiply it by gain^2 and phi by E[phi'^2]. It gives
    Yang et al.'s pi / (pi - 1) for relu and 1 for linear; tested against a simulated
    wide net for tanh. Finite batch and width correct it (unknown in closed form).
    """
    phi, dphi = activation(nonlinearity)
    m1 = gaussian_expectation(phi, 1.0)
    var = gaussian_expectation(lambda h: phi(h) ** 2, 1.0) - m1 * m1
    return gaussian_expectation(lambda h: dphi(h) ** 2, 1.0) / var


_TORCH_GAINS = {"tanh": 5.0 / 3.0, "relu": math.sqrt(2.0), "linear": 1.0, "sigmoid": 1.0}


def default_gain(nonlinearity: str) -> float:
    """torch.nn.init.calculate_gain's value: tanh 5/3, relu sqrt(2), linear 1, sigmoid 1.

    gelu (torch raises ValueError): 1 / sqrt(E[gelu(z)^2]) = (1/3 + 1/(2 pi sqrt 3))^(-1/2)
    ~ 1.5335, computed by quadrature: the gain that keeps q = 1 fixed, He et al. 2015's
    forward criterion (sec. 2.2), which for relu gives sqrt(2). (The gain making chi = 1
    at q = 1 would be 1.4811.) tanh's 5/3 has no derivation in PyTorch's docs; in mean
    field with sigma_b = 0 the order-to-chaos transition is at gain 1, so 5/3 sits in the
    chaotic phase: q* = 1.178, chi_1 = 1.210, xi_c = 12.1 (docs/theory.md).
    """
    if nonlinearity == "gelu":
        phi, _ = activation("gelu")
        return 1.0 / math.sqrt(gaussian_expectation(lambda h: phi(h) ** 2, 1.0))
    activation(nonlinearity)
    return _TORCH_GAINS[nonlinearity]
