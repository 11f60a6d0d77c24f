"""The depth atlas's library: batched gains x seeds equal to each model alone (at init
and after training), measure_init against a hand computation, float64 at depth 64,
classify, and mean-field theory against a wide relu / linear net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from charlm import engine, theory
from charlm.atlas import batched_model, measure_init, summarise
from charlm.atlas_theory import predict
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from charlm.init import build_mlp
from charlm.trainability import STALL_MARGIN, classify, unigram_entropy
from pipeline.atlas import draw_minibatches

V, T = 27, 3


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (n, T), generator=g)
    return X, (X[:, 2] + 1) % V


@pytest.mark.parametrize("batchnorm", [False, True])
def test_batched_gains_equal_each_model_alone(batchnorm: bool) -> None:
    cfg = ModelConfig(n_embd=4, n_hidden=16)
    variant = VariantConfig(layers=3, n_hidden=16, batchnorm=batchnorm, gain=1.0)
    gains, seeds = [0.5, 5 / 3], [3, 11]
    model, gens = batched_model(cfg, variant, gains, seeds, V, T)
    init_batch = {k: v.clone() for k, v in model.state_dict().items()}
    X, Y = synthetic(2000, 0)
    tc = TrainConfig(seeds=[0], max_steps=40, lr_decay_step=40, record_every=40)
    batch = engine.train(model, X, Y, gens, tc.model_copy(update={"seeds": list(range(4))}))
    for gi, g in enumerate(gains):
        for si, s in enumerate(seeds):
            k = gi * len(seeds) + si
            gen = [torch.Generator().manual_seed(s)]
            alone = build_mlp(cfg, variant.model_copy(update={"gain": g}), V, T, gen)
            init = {k: v.clone() for k, v in alone.state_dict().items()}
            for name, p in init.items():  # the same initial model, bit for bit
                assert torch.equal(init_batch[name][k], p[0]), name
            res = engine.train(alone, X, Y, gen, tc)
            assert torch.equal(batch.loss[:, k], res.loss[:, 0]), (g, s)
            for name, p in alone.state_dict().items():
                assert torch.equal(model.state_dict()[name][k], p[0]), name
            assert not torch.equal(init["C"], alone.state_dict()["C"])  # it trained


def test_measure_init_against_a_hand_computation() -> None:
    """One tanh layer, width 5, 2 models: every statistic recomputed by hand."""
    cfg = ModelConfig(n_embd=2, n_hidden=5)
    model, _ = batched_model(cfg, VariantConfig(layers=1, n_hidden=5, gain=1.0), [1.0, 2.0],
                             [7], V, T)  # fmt: skip
    X, Y = synthetic(50, 1)
    ix = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(5))
    st = measure_init(model, draw_minibatches(X, Y, 1, 8, 5))
    for s in range(2):
        C = model.C[s].detach().double()
        W1 = model.layers[0].weight[s].detach().double().requires_grad_()
        W2 = model.layers[2].weight[s].detach().double()
        emb = C[X[ix]].view(8, -1)
        h = emb @ W1 + model.layers[0].bias[s].detach().double()
        a = torch.tanh(h)
        a.retain_grad()
        logits = a @ W2 + model.layers[2].bias[s].detach().double()
        loss = torch.nn.functional.cross_entropy(logits, Y[ix])
        loss.backward()
        assert st["pre_std"][0, s] == pytest.approx(float(h.std()), rel=1e-12)
        assert st["act_std"][0, s] == pytest.approx(float(a.std()), rel=1e-12)
        assert st["saturated"][0, s] == pytest.approx(float((a.abs() > 0.97).double().mean()))
        assert st["grad_std"][0, s] == pytest.approx(float(a.grad.std()), rel=1e-10)
        assert st["wgrad_std"][0, s] == pytest.approx(float(W1.grad.std()), rel=1e-10)
        ratio = float(W1.grad.std() / W1.detach().std())
        assert st["grad_data"][0, s] == pytest.approx(ratio, rel=1e-10)
        assert st["input_ms"][s] == pytest.approx(float((emb**2).mean()), rel=1e-12)
        unit = a.detach() / a.detach().norm(dim=1, keepdim=True)
        distinct = (X[ix][:, None] != X[ix][None]).any(2).triu(1)
        cos = (unit @ unit.T)[distinct].mean()
        assert st["cosine"][0, s] == pytest.approx(float(cos), rel=1e-10)
        assert math.isnan(st["dead"][0, s])  # tanh: no dead units defined


def test_float64_holds_at_depth_64_where_float32_overflows() -> None:
    """A linear net at gain 4: the std grows 4x per layer, 4^63 ~ 1e38 at layer 64,
    past float32's range in its squares; the float64 measurement stays finite and
    follows the geometric law."""
    cfg = ModelConfig(n_embd=4, n_hidden=64)
    variant = VariantConfig(layers=64, n_hidden=64, nonlinearity="linear", gain=1.0)
    model, _ = batched_model(cfg, variant, [4.0], [0], V, T)
    X, Y = synthetic(200, 2)
    with torch.no_grad():
        out32 = model.trace(X[:32].unsqueeze(0))[-2]
    assert not torch.isfinite(out32.std())
    st = measure_init(model, draw_minibatches(X, Y, 1, 32, 0))
    pre = st["pre_std"][:, 0]
    assert np.isfinite(pre).all() and np.isfinite(st["grad_std"]).all()
    rate = (pre[-1] / pre[0]) ** (1 / 63)
    assert rate == pytest.approx(4.0, rel=0.03)  # finite width 64: a few % (not tuned)


def test_classify_and_baseline() -> None:
    Y = torch.tensor([0, 0, 1, 1])
    assert unigram_entropy(Y, 27) == pytest.approx(math.log(2))
    ok = torch.ones(10)
    assert classify(2.2, ok, 2.82) == "trained"
    assert classify(2.82 - STALL_MARGIN / 2, ok, 2.82) == "stalled"
    assert classify(3.1, ok, 2.82) == "stalled"
    assert classify(float("nan"), ok, 2.82) == "diverged"
    assert classify(2.2, torch.tensor([1.0, float("inf")]), 2.82) == "diverged"


def test_summarise_keeps_inf() -> None:
    s = summarise(np.array([[1.0, 2.0, 3.0, np.inf, np.inf]]))
    assert s["median"][0] == 3.0 and s["q90"][0] == np.inf and s["q10"][0] == 1.0


def test_summarise_leaves_the_warnings_filters_alone(monkeypatch) -> None:
    """Cells summarise on the embedded cluster's worker threads: while ``summarise``
    runs, the process-wide ``warnings.filters`` must stay the very list every thread
    sees (``warnings.catch_warnings`` swaps in a copy for the whole process, and two
    threads' swaps can leave the wrong one installed). An all-NaN slice still gives NaN,
    silently, even with warnings turned into errors."""
    import warnings

    seen = []
    quantile = np.nanquantile

    def watching(*args, **kwargs):
        seen.append(warnings.filters)
        return quantile(*args, **kwargs)

    monkeypatch.setattr(np, "nanquantile", watching)
    before = warnings.filters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = warnings.filters
        s = summarise(np.array([[np.nan, np.nan], [1.0, np.nan], [2.0, 4.0]]))
    assert seen and all(f is inside for f in seen)
    assert warnings.filters is before
    assert np.isnan(s["median"][0]) and np.isnan(s["q10"][0]) and np.isnan(s["q90"][0])
    assert s["median"][1] == 1.0 and s["q10"][2] == 2.0 and s["q90"][2] == 4.0


@pytest.mark.parametrize(("nl", "gain"), [("relu", 1.0), ("relu", 2.0), ("linear", 0.8)])
def test_theory_against_a_wide_net(nl: str, gain: float) -> None:
    """Width 512, 8 layers, 4 seeds: the measured pre-activation std per layer against
    the mean-field prediction from the measured input. Tolerance 10% at layer 8, stated
    before looking: finite width moves a relu net's log-norm by O(L / n) per model and
    32 examples of one batch add sampling noise of a few %."""
    cfg = ModelConfig(n_embd=10, n_hidden=512)
    variant = VariantConfig(layers=8, n_hidden=512, nonlinearity=nl, gain=1.0)
    model, _ = batched_model(cfg, variant, [gain], [0, 1, 2, 3], V, T)
    X, Y = synthetic(500, 3)
    st = measure_init(model, draw_minibatches(X, Y, 2, 32, 1))
    med = np.median(st["pre_std"], axis=1)
    p = predict(nl, gain, 8, float(np.median(st["input_ms"])))
    np.testing.assert_allclose(med, p["pre_std"], rtol=0.10)
    assert p["pre_std"][-1] / p["pre_std"][0] == pytest.approx(
        (gain / math.sqrt(2) if nl == "relu" else gain) ** 7
    )
    assert theory.default_gain("relu") == pytest.approx(math.sqrt(2))
