"""Deep MLPs: config, parameter counts, draws, hand-written backward, seed batching, and
the lecture's printed statistics (makemore part 3, "PyTorch-ifying"; DESIGN.md, "The
deep network") reproduced by the eager oracle and by the engine.

Two independent computations compared (micrograd's test): the engine's backward
against autograd through ``MLP.forward``; the engine's run against the lecture's
loop written out in ``reference/lecture.py`` (bitwise with exact kernels).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch.testing import assert_close

from charlm import engine
from charlm.config import FieldError, ModelConfig, TrainConfig, VariantConfig
from charlm.data import Vocabulary, build_windows, parse_names, shuffle_split
from charlm.diagnostics import snapshot as snapshot_records
from charlm.evaluate import split_loss
from charlm.init import build_mlp
from charlm.model import MLP
from reference.lecture import deep_layers, lecture_deep_loss, lecture_deep_train

SEED = 2147483647
DEEP_BN = {"layers": 5, "n_hidden": 100, "batchnorm": True, "batchnorm_output": True, "gain": 1.0}
DEEP_TANH = {"layers": 5, "n_hidden": 100}  # gain null: 5/3; last weight x 0.1

# The lecture's printed output after 1,001 steps of the deep BatchNorm net (DESIGN.md).
STEP0_LOSS = 3.2870
TANH_STD = [0.63, 0.64, 0.65, 0.65, 0.65]
SATURATED_PCT = [2.78, 2.56, 2.25, 1.69, 1.88]
GRAD_STD = [2.640702e-03, 2.245584e-03, 2.045742e-03, 1.983134e-03, 1.952382e-03]
GRAD_DATA = [8.012630e-03, 4.881091e-02, 6.964619e-02, 6.073741e-02, 5.631483e-02,
             5.570125e-02, 1.160106e-01]  # fmt: skip
SPLIT_LOSS = {"train": 2.4003, "val": 2.3982}


def build(variant: dict, seeds: list[int]) -> tuple[MLP, list[torch.Generator]]:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return build_mlp(ModelConfig(), VariantConfig(**variant), 27, 3, gens), gens


# --------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("nonlinearity", "gain"), [("tanh", 5 / 3), ("relu", math.sqrt(2)), ("linear", 1.0)]
)
def test_gain_null_is_calculate_gain(nonlinearity, gain):
    v = VariantConfig(layers=2, nonlinearity=nonlinearity, gain=None)
    assert v.gain_value == gain == torch.nn.init.calculate_gain(nonlinearity)
    assert VariantConfig(layers=2, nonlinearity=nonlinearity, gain=2).gain_value == 2.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"gain": "tanh"}, "write null instead of a name"),
        ({"gain": True}, "gain must be a number > 0 or null"),
        ({"gain": -1.0}, "finite number > 0"),
        ({"layers": 0}, "greater than or equal to 1"),
        ({"layers": 2, "nonlinearity": "swish"}, "'sigmoid' or 'gelu'"),
        ({"layers": 3, "w2_scale": 0.01}, "Extra inputs are not permitted"),  # removed keys
        ({"layers": 3, "deep": False}, "Extra inputs are not permitted"),
        ({"w1_init": "normal"}, "Extra inputs are not permitted"),
        ({"eps": 1e-3, "batchnorm": True, "batchnorm_form": "std"}, "'std' form has no eps"),
        ({"layers": 3, "momentum": 0.1}, "used only with BatchNorm"),
        ({"layers": 3, "last_scale": 0.1, "init": "first_half"}, "second_half only"),
        ({"train": {"max_step": 10}}, "unknown train key"),
    ],
)
def test_invalid_variant(kwargs, pattern):
    with pytest.raises((ValidationError, FieldError), match=pattern):
        VariantConfig(**kwargs)


def test_defaults_keep_their_meaning():
    """Depth changes nothing but the depth: the same recipe, BatchNorm form, momentum
    and eps at depth 1 and depth 2 (the lecture's first-half BatchNorm is explicit)."""
    one, deep = VariantConfig(batchnorm=True), VariantConfig(layers=2, batchnorm=True)
    for v in (one, deep):
        assert v.init == "second_half" and v.batchnorm_form == "var"
        assert v.momentum == 0.1 and v.eps_value == 1e-5 and v.last_scale == 0.1
        assert v.has_batchnorm and not v.batchnorm_output
    assert VariantConfig(batchnorm_output=True).has_batchnorm
    assert not VariantConfig().has_batchnorm
    assert VariantConfig(init="first_half").out_weight_scale == 0.01
    assert (
        one.hidden_size(ModelConfig()) == 200 == VariantConfig(layers=2).hidden_size(ModelConfig())
    )


def test_train_override_merges_over_the_global_section():
    base = TrainConfig(seeds=[1, 2], max_steps=1000, lr_decay_step=500)
    v = VariantConfig(layers=5, train={"max_steps": 2000, "lr_decay_step": 1500, "seeds": [SEED]})
    cfg = v.train_config(base)
    assert (cfg.max_steps, cfg.lr_decay_step, cfg.seeds, cfg.lr) == (2000, 1500, [SEED], 0.1)
    assert VariantConfig().train_config(base) is base
    with pytest.raises((ValidationError, FieldError), match="max_steps"):
        VariantConfig(train={"max_steps": 0}).train_config(base)


# ------------------------------------------------------- counts and draws


@pytest.mark.parametrize(
    ("variant", "count"),
    [
        (DEEP_BN, 47_024),
        (DEEP_TANH, 46_497),
        ({}, 11_897),
        ({"batchnorm": True}, 12_097),
        ({"init": "first_half"}, 11_897),  # the recipe never changes the sizes
    ],
)
def test_parameter_counts(variant, count):
    model, _ = build(variant, [SEED])
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.depth == VariantConfig(**variant).layers


@pytest.mark.parametrize("batchnorm", [True, False])
def test_deep_draws_are_the_lecture_draws_bitwise(batchnorm):
    model, (g,) = build(DEEP_BN if batchnorm else DEEP_TANH, [SEED])
    ref_g = torch.Generator().manual_seed(SEED)
    C = torch.randn((27, 10), generator=ref_g)
    ref = {"C": C}
    for i, layer in enumerate(deep_layers(ref_g, batchnorm)):
        for name in ("weight", "bias", "gamma", "beta"):
            if getattr(layer, name, None) is not None:
                ref[f"layers.{i}.{name}"] = getattr(layer, name)
    params = dict(model.named_parameters())
    assert list(params) == list(ref)
    for k, v in ref.items():
        assert torch.equal(params[k][0].detach(), v), k
    if batchnorm:
        assert model.hidden_indices == [2, 5, 8, 11, 14]  # the lecture's tanh layers
        assert [n for n, _ in model.named_buffers()][:2] == [
            "layers.1.running_mean",
            "layers.1.running_var",
        ]
    assert torch.equal(
        torch.randint(0, 99, (8,), generator=g), torch.randint(0, 99, (8,), generator=ref_g)
    )


# ------------------------------------------------------ backward vs autograd

SMALL = {"layers": 3, "n_hidden": 16}
NORM = {
    "none": {},
    "hidden": {"batchnorm": True},
    "all": {"batchnorm": True, "batchnorm_output": True},
}


@pytest.mark.parametrize("norm", list(NORM))
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "linear"])
def test_forward_backward_matches_autograd(nonlinearity, norm):
    S, B = 2, 32
    model, _ = build({**SMALL, "nonlinearity": nonlinearity, **NORM[norm]}, [SEED, 1])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # off the special values (zero bias, gamma 1, ...)
        for p in list(model.parameters()) + list(model.buffers()):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model = model.double()
    twin = copy.deepcopy(model).train()
    idx = torch.randint(0, 27, (S, B, 3), generator=g)
    targets = torch.randint(0, 27, (S, B), generator=g)
    grads = {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    loss = engine.forward_backward(model, idx, targets, grads)
    _, ref_loss = twin(idx, targets)
    ref_loss.sum().backward()  # independent models: d(sum)/dp_s = dloss_s/dp_s
    tol = {"rtol": 1e-9, "atol": 1e-12}  # float64 on both sides: a few ulps of round-off
    assert_close(loss, ref_loss.detach(), **tol)
    for n, p in twin.named_parameters():
        assert_close(grads[n], p.grad, **tol, msg=lambda m, n=n: f"d{n}: {m}")
    for n, b in twin.named_buffers():
        assert_close(model.get_buffer(n), b, **tol)


def test_seed_trains_alike_alone_and_inside_a_batch():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 27, (2000, 3), generator=g), torch.randint(0, 27, (2000,), generator=g)
    variant = {**SMALL, **NORM["all"]}
    alone, g1 = build(variant, [1])
    batch, g3 = build(variant, [SEED, 1, 2])
    cfg = TrainConfig(seeds=[1], max_steps=40, lr_decay_step=20, record_every=10)
    ra = engine.train(alone, X, Y, g1, cfg)
    cfg3 = TrainConfig(seeds=[SEED, 1, 2], max_steps=40, lr_decay_step=20, record_every=10)
    rb = engine.train(batch, X, Y, g3, cfg3, workers=2)
    assert torch.equal(rb.loss[:, 1], ra.loss[:, 0])
    for (n, p), q in zip(batch.named_parameters(), alone.parameters(), strict=True):
        assert torch.equal(p[1], q[0]), n
    for n, b in batch.named_buffers():
        assert torch.equal(b[1], alone.get_buffer(n)[0]), n
    assert set(ra.update_ratio) == {
        "C",
        "layers.0.weight",
        "layers.3.weight",
        "layers.6.weight",
        "layers.9.weight",
    }


# ---------------------------------------------- engine vs the lecture's loop


@pytest.mark.parametrize("kernels", ["exact", "fast"])
@pytest.mark.parametrize("batchnorm", [True, False], ids=["deep_bn", "deep_tanh"])
def test_engine_follows_the_lecture_loop(batchnorm, kernels, splits):
    """Exact kernels: bitwise the lecture's loop (losses, parameters, BatchNorm
    buffers) after 300 steps. Fast kernels (charlm/ops.py: closed-form BatchNorm
    backward, sigmoid tanh, float32 variance): within float32 rounding. Either way the
    recorded update:data ratio (the lecture's ``ud``, after the update) agrees."""
    X, Y = splits["train"]
    steps = 300
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = lecture_deep_train(X, Y, steps, batchnorm=batchnorm, seed=SEED)
    finally:
        torch.set_num_threads(threads)
    model, gens = build(DEEP_BN if batchnorm else DEEP_TANH, [SEED])
    cfg = TrainConfig(
        seeds=[SEED], max_steps=steps, lr_decay_step=steps, record_every=100, kernels=kernels
    )
    result = engine.train(model, X, Y, gens, cfg)
    if kernels == "exact":
        assert torch.equal(result.loss[:, 0], ref["loss"])
        for name, p in model.named_parameters():
            assert torch.equal(p[0].detach(), ref["params"][name]), name
        for name, b in model.named_buffers():
            assert torch.equal(b[0], ref["buffers"][name]), name
    assert_close(result.loss[:, 0], ref["loss"], rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        assert_close(p[0].detach(), ref["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    for name, b in model.named_buffers():
        assert_close(b[0], ref["buffers"][name], rtol=1e-5, atol=1e-6, msg=name)
    names = list(ref["params"])
    assert list(result.update_ratio) == model.weight_names
    for w, r in result.update_ratio.items():
        ud = torch.tensor([ref["ud"][i][names.index(w)] for i in result.record_steps.tolist()])
        assert_close(r[:, 0], ud, rtol=0, atol=1e-4, msg=w)


# -------------------------------------------------- fidelity: the lecture's figures


@pytest.fixture(scope="module")
def splits(names_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    words = parse_names(names_path.read_bytes())
    train, val, _ = shuffle_split(words, 42, 0.8, 0.1)
    vocab = Vocabulary.from_words(words)
    return {"train": build_windows(train, vocab, 3), "val": build_windows(val, vocab, 3)}


def stats(out, out_grad, grads, params, weights) -> dict[str, list[float]]:
    """The lecture's printed statistics from one model's snapshot."""
    return {
        "tanh_std": [float(t.std()) for t in out],
        "saturated": [float((t.abs() > 0.97).float().mean()) * 100 for t in out],
        "tanh_mean": [float(t.mean()) for t in out],
        "grad_std": [float(t.std()) for t in out_grad],
        "grad_data": [float(grads[w].std() / params[w].std()) for w in weights],
    }


def check(s: dict, losses: dict, step0: float, rel: float) -> None:
    assert round(step0, 4) == STEP0_LOSS
    assert [round(v, 2) for v in s["tanh_std"]] == TANH_STD
    assert [round(v, 2) for v in s["saturated"]] == SATURATED_PCT
    assert all(abs(m) < 0.01 for m in s["tanh_mean"])
    assert_close(s["grad_std"], GRAD_STD, rtol=rel, atol=0)
    assert_close(s["grad_data"], GRAD_DATA, rtol=rel, atol=0)
    for k, v in SPLIT_LOSS.items():
        assert round(losses[k], 4) == v, (k, losses[k])  # the lecture prints 4 decimals


def test_lecture_oracle_reproduces_the_printed_statistics(splits):
    """The 7th digit of the printed grad stds and ratios moves with the CPU kernels
    (MKL_CBWR=COMPATIBLE or ATEN_CPU_CAPABILITY=avx2 shift it by a few units): the
    trajectory is reproduced to ~1e-6 relative, every other printed digit exactly."""
    X, Y = splits["train"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~50x faster on a shared 2-core machine (intra-op spinning)
    try:
        run = lecture_deep_train(X, Y, 1001, batchnorm=True, seed=SEED, decay_step=150_000)
    finally:
        torch.set_num_threads(threads)
    hidden = [2, 5, 8, 11, 14]
    weights = [n for n, p in run["params"].items() if p.ndim == 2]
    s = stats(
        [run["out"][i] for i in hidden],
        [run["out_grad"][i] for i in hidden],
        run["grads"],
        run["params"],
        weights,
    )
    losses = {k: lecture_deep_loss(run, *splits[k]) for k in SPLIT_LOSS}
    check(s, losses, float(run["loss"][0]), rel=2e-6)


def test_engine_reproduces_the_printed_statistics(splits):
    X, Y = splits["train"]
    model, gens = build(DEEP_BN, [SEED])
    assert sum(p.numel() for p in model.parameters()) == 47_024
    # the lecture's decay at 150,000 lies past the run: lr 0.1 for all 1,001 steps
    cfg = TrainConfig(seeds=[SEED], max_steps=1001, lr_decay_step=1001)
    result = engine.train(model, X, Y, gens, cfg, capture_steps=(1000,))
    snap = result.captures[1000]
    assert list(snap["out"]) == model.hidden_indices
    assert snap["out"][2].shape == (1, 32, 100) and snap["grad"]["C"].shape == (1, 27, 10)
    first = lambda d: {k: v[0] for k, v in d.items()}  # noqa: E731
    s = stats(
        [snap["out"][i][0] for i in model.hidden_indices],
        [snap["out_grad"][i][0] for i in model.hidden_indices],
        first(snap["grad"]),
        first(snap["param"]),
        model.weight_names,
    )
    for name, p in model.named_parameters():  # 'param' is the state after that step
        assert torch.equal(snap["param"][name], p.detach()), name
    losses = {k: float(split_loss(model, *splits[k])[0]) for k in SPLIT_LOSS}
    check(s, losses, float(result.loss[0, 0]), rel=1e-4)
    # the same figures as the evaluate stage records them (artefacts.Snapshot)
    rec = snapshot_records(model, {"step": 1000, **snap}, 0.97)
    assert rec["step"] == 1000 and [la["name"] for la in rec["layers"]] == [
        f"layers.{i}" for i in model.hidden_indices
    ]
    recorded = {
        "tanh_std": [la["std"][0] for la in rec["layers"]],
        "saturated": [la["saturated"][0] * 100 for la in rec["layers"]],
        "tanh_mean": [la["mean"][0] for la in rec["layers"]],
        "grad_std": [la["grad_std"][0] for la in rec["layers"]],
        "grad_data": [w["grad_data_ratio"][0] for w in rec["weights"].values()],
    }
    assert list(rec["weights"]) == model.weight_names
    check(recorded, losses, float(result.loss[0, 0]), rel=1e-4)
