"""charlm.theory: mean-field predictions, each checked by an independent computation.

Closed forms (relu, linear, Cho & Saul's arc-cosine kernel, the gelu moment) against
the quadrature; adaptive ``scipy.integrate.quad`` against Gauss-Hermite; seeded Monte
Carlo against the tanh maps (tolerance 4 standard errors, estimated from the same
samples); wide random networks in torch (float64, autograd) against the gradient
ratios and the BatchNorm growth factors (tolerances from the finite width and batch,
stated at each test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from charlm import theory

SMOOTH = ("tanh", "sigmoid", "gelu")


# ---- quadrature against closed forms and adaptive integration --------------------


@pytest.mark.parametrize("gain", [0.7, math.sqrt(2.0), 1.9])
@pytest.mark.parametrize("nonlinearity", ["relu", "linear"])
def test_relu_and_linear_match_closed_forms(nonlinearity: str, gain: float) -> None:
    # He et al. 2015, sec. 2.2: E[relu(sqrt(q) z)^2] = q / 2 and E[relu'^2] = 1 / 2.
    per_layer = gain**2 / 2 if nonlinearity == "relu" else gain**2
    for q in (1e-3, 0.37, 1.0, 2.78, 40.0):
        assert theory.length_map(q, gain, nonlinearity) == pytest.approx(per_layer * q, rel=1e-12)
        assert theory.length_map(q, gain, nonlinearity, sigma_b=0.5) == pytest.approx(
            per_layer * q + 0.25, rel=1e-12
        )
        assert theory.chi(q, gain, nonlinearity) == pytest.approx(per_layer, rel=1e-12)
    q1 = theory.q_from_input(1.03, gain)
    std = theory.preactivation_std(theory.propagate_q(q1, gain, nonlinearity, 64))
    expected = math.sqrt(q1) * math.sqrt(per_layer) ** np.arange(64)
    np.testing.assert_allclose(std, expected, rtol=1e-11)
    ratio = theory.gradient_ratio(
        theory.propagate_q(q1, gain, nonlinearity, 64), gain, nonlinearity
    )
    np.testing.assert_allclose(ratio, per_layer ** np.arange(63, -1, -1), rtol=1e-11)


def test_relu_first_moment_and_correlation_map_match_closed_forms() -> None:
    # relu's mean and its kernel have a kink at 0 (module docstring: ~1e-6 / ~1e-5 relative).
    for q in (0.5, 3.0):
        expected = math.sqrt(q * (0.5 - 1.0 / (2.0 * math.pi)))
        assert theory.postactivation_std(q, "relu") == pytest.approx(expected, rel=1e-5)
        for c in (0.0, 0.3, 0.9, 0.99, 1.0):
            # Cho & Saul 2009, arc-cosine kernel of degree 1; gain sqrt(2) makes q_next = q.
            kernel = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
            got = theory.correlation_map(c, q, math.sqrt(2.0), "relu")
            assert got == pytest.approx(kernel, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("nonlinearity", SMOOTH)
def test_quadrature_matches_adaptive_integration(nonlinearity: str) -> None:
    phi, dphi = theory.activation(nonlinearity)
    for q in (0.3, 2.7, 25.0, 100.0):
        s = math.sqrt(q)

        def reference(f, s=s, q=q):
            def density(h):
                return f(np.asarray(h)) * math.exp(-h * h / (2 * q)) / (s * math.sqrt(2 * math.pi))

            points = [-8.0, -2.0, 0.0, 2.0, 8.0]
            return integrate.quad(density, -40 * s, 40 * s, points=points, limit=2000)[0]

        for f in (phi, lambda h: phi(h) ** 2, lambda h: dphi(h) ** 2):
            assert theory.gaussian_expectation(f, q) == pytest.approx(reference(f), abs=1e-9)


# ---- tanh: Monte Carlo against the maps ------------------------------------------


@pytest.mark.parametrize("q", [0.5, 1.1785, 4.0])
def test_tanh_maps_match_monte_carlo(q: float) -> None:
    z = np.random.default_rng(20260312).standard_normal(200_000)
    h = math.sqrt(q) * z
    gain = 5 / 3
    checks = {
        "length_map": (gain**2 * np.tanh(h) ** 2, theory.length_map(q, gain, "tanh")),
        "chi": (gain**2 * (1 - np.tanh(h) ** 2) ** 2, theory.chi(q, gain, "tanh")),
    }
    for name, (samples, predicted) in checks.items():
        se = samples.std() / math.sqrt(samples.size)
        assert abs(samples.mean() - predicted) < 4 * se, name
    # shares: binomial standard error at the predicted p (a sample may hold no hit);
    # sigmoid's saturation is tanh's at h / 2 (|2 sigmoid(h) - 1| = |tanh(h / 2)|).
    shares = {
        "tanh": (np.abs(np.tanh(h)) > 0.97, theory.saturated_share(q, "tanh")),
        "sigmoid": (np.abs(2 / (1 + np.exp(-h)) - 1) > 0.97, theory.saturated_share(q, "sigmoid")),
    }
    for name, (hits, p) in shares.items():
        se = math.sqrt(p * (1 - p) / hits.size)
        assert abs(hits.mean() - p) < 4 * se + 1e-12, name


# ---- fixed points, phases, depth scales ------------------------------------------


@pytest.mark.parametrize("gain", [0.5, 0.9, 1.0])
def test_tanh_ordered_phase_has_q_star_zero_and_chi_1_gain_squared(gain: float) -> None:
    assert theory.fixed_point(gain, "tanh") == 0.0
    assert theory.chi_1(gain, "tanh") == pytest.approx(gain**2, rel=1e-12)  # tanh'(0) = 1
    assert theory.correlation_fixed_point(gain, "tanh") == 1.0
    assert theory.chi_c(gain, "tanh") == pytest.approx(gain**2, rel=1e-12)
    expected_xi = math.inf if gain == 1.0 else -1 / math.log(gain**2)
    assert theory.xi_c(gain, "tanh") == pytest.approx(expected_xi, rel=1e-9)


@pytest.mark.parametrize("gain", [1.1, 5 / 3, 2.0])
def test_tanh_chaotic_phase_has_positive_q_star(gain: float) -> None:
    q = theory.fixed_point(gain, "tanh")
    assert q > 0
    assert theory.length_map(q, gain, "tanh") == pytest.approx(q, rel=1e-11)
    assert theory.chi_1(gain, "tanh") > 1  # sigma_b = 0: chaos for every gain > 1
    # odd phi and sigma_b = 0: c = 0 is the stable correlation fixed point
    assert theory.correlation_fixed_point(gain, "tanh") == 0.0
    assert 0 < theory.chi_c(gain, "tanh") < 1


def test_fixed_point_edge_cases() -> None:
    assert theory.fixed_point(1.2, "relu") == 0.0  # gain^2 / 2 < 1: signal dies
    assert theory.fixed_point(1.5, "relu") == math.inf  # gain^2 / 2 > 1: diverges
    assert theory.fixed_point(1.1, "linear") == math.inf
    assert theory.fixed_point(math.sqrt(2.0), "relu", q_start=2.5) == 2.5  # every q fixed
    assert theory.fixed_point(1.2, "relu", sigma_b=0.3) == pytest.approx(0.09 / (1 - 0.72))
    with pytest.raises(ValueError, match="infinite"):
        theory.chi_1(1.5, "relu")
    assert theory.depth_scale(1.0) == math.inf
    assert theory.depth_scale(math.e) == pytest.approx(-1.0)  # growth: negative


def test_correlation_map_ordered_phase_converges_to_one_with_slope_chi_1() -> None:
    gain, sigma_b = 1.3, 0.3
    q = theory.fixed_point(gain, "tanh", sigma_b)
    chi_1 = theory.chi_1(gain, "tanh", sigma_b)
    assert q > 0 and chi_1 < 1
    assert theory.correlation_fixed_point(gain, "tanh", sigma_b) == 1.0
    assert theory.chi_c(gain, "tanh", sigma_b) == pytest.approx(chi_1, rel=1e-9)
    c = 0.2
    for _ in range(60):  # the map itself, iterated: 1 - c shrinks ~chi_1 per layer
        c = theory.correlation_map(c, q, gain, "tanh", sigma_b)
    assert 1 - 1e-2 < c < 1
    assert theory.trainable_depth(gain, "tanh", sigma_b) == pytest.approx(
        6 * -1 / math.log(chi_1), rel=1e-9
    )


def test_correlation_map_chaotic_phase_slope_matches_finite_difference() -> None:
    gain, sigma_b = 1.8, 0.3
    q = theory.fixed_point(gain, "tanh", sigma_b)
    c_star = theory.correlation_fixed_point(gain, "tanh", sigma_b)
    assert 0 < c_star < 1
    assert theory.correlation_map(c_star, q, gain, "tanh", sigma_b) == pytest.approx(
        c_star, abs=1e-10
    )
    eps = 1e-4
    slope = (
        theory.correlation_map(c_star + eps, q, gain, "tanh", sigma_b)
        - theory.correlation_map(c_star - eps, q, gain, "tanh", sigma_b)
    ) / (2 * eps)
    assert theory.chi_c(gain, "tanh", sigma_b) == pytest.approx(slope, rel=1e-6)
    assert theory.chi_c(gain, "tanh", sigma_b) < 1 < theory.chi_1(gain, "tanh", sigma_b)


# ---- a wide random network against the forward and backward predictions ----------


def test_wide_tanh_network_matches_stds_and_gradient_ratios() -> None:
    # Width 1000, 128 inputs: over seeds 0-4 the stds sat within 0.9 % of the prediction
    # and the gradient ratios within 2.3 % (1 % at width 2000): tolerances 2 % and 5 %.
    g = torch.Generator().manual_seed(1234)
    n, depth, gain = 1000, 5, 5 / 3
    x = torch.randn(128, 30, generator=g, dtype=torch.float64, requires_grad=True)
    q1 = theory.q_from_input(x.detach().pow(2).mean().item(), gain)
    xs = []
    for fan_in in [30] + [n] * (depth - 1):
        w = torch.randn(fan_in, n, generator=g, dtype=torch.float64) * gain / math.sqrt(fan_in)
        x = torch.tanh(x @ w)
        x.retain_grad()
        xs.append(x)
    top = torch.randn(x.shape, generator=g, dtype=torch.float64)  # d loss / d x^L
    (x * top).sum().backward()
    qs = theory.propagate_q(q1, gain, "tanh", depth)
    std = [theory.postactivation_std(q, "tanh") for q in qs]
    np.testing.assert_allclose([xl.std().item() for xl in xs], std, rtol=0.02)
    measured = np.array([xl.grad.pow(2).mean().item() for xl in xs])
    np.testing.assert_allclose(
        measured / measured[-1], theory.gradient_ratio(qs, gain, "tanh"), rtol=0.05
    )


# ---- BatchNorm --------------------------------------------------------------------


def bn_growth(nonlinearity: str, batch: int, width: int, depth: int, seeds: int) -> float:
    """Geometric-mean per-layer factor of mean((d loss / d x^l)^2) toward the input in
    h = W x, x' = phi(BN(h)) (batch statistics, biased variance, no eps, no affine),
    from autograd in float64; the first two layers below the top are a transient."""
    g = torch.Generator().manual_seed(7)
    act = {"linear": lambda h: h, "relu": torch.relu, "tanh": torch.tanh}[nonlinearity]
    logs = []
    for _ in range(seeds):
        x = torch.randn(batch, width, generator=g, dtype=torch.float64, requires_grad=True)
        xs = []
        for _ in range(depth):
            h = x @ (torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5)
            x = act((h - h.mean(0)) / h.std(0, unbiased=False))
            x.retain_grad()
            xs.append(x)
        (x * torch.randn(x.shape, generator=g, dtype=torch.float64)).sum().backward()
        d = torch.stack([xl.grad.pow(2).mean() for xl in xs])
        logs.append(torch.log(d[:-1] / d[1:])[: depth - 3])
    return math.exp(torch.cat(logs).mean().item())


def test_batchnorm_published_values_and_refusals() -> None:
    assert theory.batchnorm_gradient_growth("linear", 32) == pytest.approx(30 / 29)
    assert theory.batchnorm_gradient_growth("linear", math.inf) == 1.0
    assert theory.batchnorm_gradient_growth("relu", math.inf) == pytest.approx(1.46694220692)
    for nonlinearity, batch in [("relu", 32), ("tanh", 32), ("tanh", math.inf), ("gelu", 64)]:
        with pytest.raises(NotImplementedError, match="no closed form"):
            theory.batchnorm_gradient_growth(nonlinearity, batch)
    with pytest.raises(ValueError, match="batch_size >= 4"):
        theory.batchnorm_gradient_growth("linear", 3)
    # the B = inf derivation reproduces both published limits
    assert theory.batchnorm_large_batch_growth("relu") == pytest.approx(
        math.pi / (math.pi - 1), rel=1e-5
    )
    assert theory.batchnorm_large_batch_growth("linear") == pytest.approx(1.0, rel=1e-12)


def test_batchnorm_linear_growth_matches_simulation() -> None:
    # B = 6: (B-2)/(B-3) = 1.333 (not B/(B-2) = 1.5, not 1); width 384 and 2 x 7 layers
    # put the estimate within 0.7 % (widths 256-1024: -3 % to +0.5 %), tolerance 3 %.
    measured = bn_growth("linear", batch=6, width=384, depth=10, seeds=2)
    assert measured == pytest.approx(theory.batchnorm_gradient_growth("linear", 6), rel=0.03)


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_batchnorm_large_batch_growth_matches_simulation(nonlinearity: str) -> None:
    # B = 128, width 256: finite batch and width raise the factor by ~1 % (tanh: 1.193
    # here, 1.182 at B = 512 and width 1024, theory 1.178; relu +0.8 %); tolerance 3 %,
    # while relu's 1.467 and tanh's 1.178 differ by 25 %.
    measured = bn_growth(nonlinearity, batch=128, width=256, depth=8, seeds=1)
    assert measured == pytest.approx(theory.batchnorm_large_batch_growth(nonlinearity), rel=0.03)


# ---- gains and input validation ---------------------------------------------------


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "linear", "sigmoid"])
def test_default_gain_matches_torch(nonlinearity: str) -> None:
    assert theory.default_gain(nonlinearity) == torch.nn.init.calculate_gain(nonlinearity)


def test_gelu_gain_keeps_unit_q_and_torch_has_none() -> None:
    with pytest.raises(ValueError):
        torch.nn.init.calculate_gain("gelu")
    gain = theory.default_gain("gelu")
    closed = (1 / 3 + 1 / (2 * math.pi * math.sqrt(3))) ** -0.5  # E[gelu(z)^2] by Stein
    assert gain == pytest.approx(closed, rel=1e-12)
    assert theory.length_map(1.0, gain, "gelu") == pytest.approx(1.0, rel=1e-12)
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    phi, _ = theory.activation("gelu")
    np.testing.assert_allclose(phi(x.numpy()), torch.nn.functional.gelu(x).numpy(), atol=1e-15)


def test_saturation_and_dead_share_definitions() -> None:
    assert theory.saturated_share(1.0, "tanh") == pytest.approx(
        math.erfc(math.atanh(0.97) / math.sqrt(2))
    )
    assert theory.saturated_share(4.0, "sigmoid") == pytest.approx(
        theory.saturated_share(1.0, "tanh")
    )
    assert theory.dead_share(2.0) == 0.5
    for call in (
        lambda: theory.saturated_share(1.0, "relu"),
        lambda: theory.dead_share(1.0, "tanh"),
        lambda: theory.length_map(-1.0, 1.0, "tanh"),
        lambda: theory.chi(1.0, 1.0, "softplus"),
        lambda: theory.propagate_q(1.0, 1.0, "tanh", 0),
        lambda: theory.correlation_map(1.5, 1.0, 1.0, "tanh"),
    ):
        with pytest.raises(ValueError):
            call()
