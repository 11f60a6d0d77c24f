"""The unified design: one layer-list MLP, one init recipe per half of the lecture, one
training step composed of one op per layer type (charlm/model.py, init.py, step.py,
ops.py).

What it must prove: the composed step is autograd through ``MLP.forward`` bit for bit
wherever its ops are hand-written, for every nonlinearity, BatchNorm form and depth;
the default networks of params.yaml train exactly as the lecture's loops; depth is a
number, not a family (same recipe, same draw order, every nonlinearity and key valid
at every depth); and a key a variant would ignore is an error naming that key.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch.testing import assert_close

from charlm import engine
from charlm.config import FieldError, ModelConfig, TrainConfig, VariantConfig
from charlm.data import Vocabulary, build_windows, parse_names, shuffle_split
from charlm.init import RECIPES, build_mlp, first_half, kaiming_scale, second_half
from charlm.layers import NONLINEARITIES, BatchNorm1d, Linear
from charlm.model import MLP, new_model
from charlm.ops import OPS, AutogradOp
from charlm.step import TrainStep
from reference.lecture import lecture_deep_train, lecture_train

ROOT = Path(__file__).resolve().parents[1]
SEED = 2147483647
V, T = 27, 3
KINDS = list(NONLINEARITIES)  # tanh, relu, linear, sigmoid, gelu
NORMS = {
    "none": {},
    "var": {"batchnorm": True, "batchnorm_output": True, "batchnorm_form": "var"},
    "std": {"batchnorm": True, "batchnorm_output": True, "batchnorm_form": "std"},
}


def variant(nonlinearity: str, norm: str = "none", **kw) -> VariantConfig:
    return VariantConfig(nonlinearity=nonlinearity, **NORMS[norm], **kw)


def build(v: VariantConfig, seeds, n_embd: int = 4, n_hidden: int = 16) -> tuple[MLP, list]:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return build_mlp(ModelConfig(n_embd=n_embd, n_hidden=n_hidden), v, V, T, gens), gens


def perturb_(model: MLP, seed: int = 3) -> None:
    """Every parameter and buffer off its special init value (zero bias, gamma 1, running
    statistics 0 and 1), so a forgotten term cannot hide behind a 0 or a 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for bn in model.batchnorm_modules.values():
            bn.running_stat.abs_().add_(0.5)


def step_and_autograd(model: MLP, kernels: str, B: int = 16, seed: int = 11):
    """forward_backward on ``model`` and autograd through ``MLP.forward`` on a twin:
    (loss, grads, ref_loss, twin)."""
    S = model.n_models
    twin = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (S, B, T), generator=g)
    targets = torch.randint(0, V, (S, B), generator=g)
    grads = {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    loss = engine.forward_backward(model, idx, targets, grads, kernels=kernels)
    _, ref_loss = twin(idx, targets)
    ref_loss.sum().backward()  # independent models: d(sum)/dp_s = dloss_s/dp_s
    return loss, grads, ref_loss.detach(), twin


# ------------------------------------------------- (a) the step against autograd


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("nonlinearity", KINDS)
def test_exact_step_is_autograd_bitwise(nonlinearity, norm, depth):
    """kernels='exact': every gradient and every BatchNorm running buffer is autograd's
    own, bit for bit, for the hand-written ops (tanh, relu, linear, sigmoid, Linear,
    both BatchNorm forms) and for gelu, which runs through autograd itself
    (``AutogradOp``). The loss agrees to float32 rounding: the step sums the B
    per-example losses in nll_loss's order (``engine.nll_mean``), ``MLP.forward`` as
    ``Tensor.mean``."""
    model, _ = build(variant(nonlinearity, norm, layers=depth), [SEED, 1])
    perturb_(model)
    loss, grads, ref_loss, twin = step_and_autograd(model, "exact")
    assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n, p in twin.named_parameters():
        assert torch.equal(grads[n], p.grad), f"d{n}"
        assert bool(p.grad.abs().max() > 0), f"autograd's d{n} is all zero"
    for n, b in twin.named_buffers():
        assert torch.equal(model.get_buffer(n), b), n
    # the parameters themselves are left alone
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n


# Fast kernels: tanh as 2 sigmoid(2x) - 1 (within 1.8e-7 absolute of torch.tanh) and the
# 'var' BatchNorm's float32 variance and closed-form backward. Measured here: gradients
# within ~1e-6 of the largest element of each tensor, losses within 1e-6 relative. The
# ops without a fast kernel (relu, linear, sigmoid, gelu, the 'std' BatchNorm) are exact
# when no fast op runs before them in the backward pass. Tolerance: 1e-5 of each
# tensor's largest element, plus 1e-8 absolute for a gradient that is 0 in exact
# arithmetic (the beta of a BatchNorm that a later BatchNorm re-centres: ~3e-9 here).
FAST_TOL, FAST_ATOL = 1e-5, 1e-8


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("nonlinearity", KINDS)
def test_fast_step_is_autograd_within_rounding(nonlinearity, norm, depth):
    model, _ = build(variant(nonlinearity, norm, layers=depth), [SEED, 1])
    perturb_(model)
    loss, grads, ref_loss, twin = step_and_autograd(model, "fast")
    assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    fast_ops = nonlinearity == "tanh" or norm == "var"
    for n, p in twin.named_parameters():
        scale = float(p.grad.abs().max())
        if fast_ops:  # relative to the tensor's largest element: small ones round alike
            err = float((grads[n] - p.grad).abs().max())
            assert err <= FAST_TOL * scale + FAST_ATOL, f"d{n}: {err:.3g} vs max {scale:.3g}"
        else:
            assert torch.equal(grads[n], p.grad), f"d{n}"
    for n, b in twin.named_buffers():
        assert_close(model.get_buffer(n), b, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("width", [4, 8, 11])
def test_exact_step_is_autograd_bitwise_at_tiny_width(width):
    """The padded logits' gradient is copied contiguous before dout @ W^T: on the strided
    view MKL took another kernel for fan-in <= 11 and rounded 1 ulp differently."""
    model, _ = build(variant("tanh", layers=1), [SEED, 1], n_hidden=width)
    perturb_(model)
    _, grads, _, twin = step_and_autograd(model, "exact")
    for n, p in twin.named_parameters():
        assert torch.equal(grads[n], p.grad), f"d{n}"


def test_every_layer_type_has_its_op():
    """Hand-written ops for Linear, BatchNorm and every nonlinearity but gelu, which
    runs through autograd; an unknown kernels value is refused."""
    assert set(OPS) == {Linear, BatchNorm1d, *(c for k, c in NONLINEARITIES.items() if k != "gelu")}
    model, _ = build(variant("gelu", layers=2), [SEED])
    step = TrainStep(model, 4)
    assert [type(op).__name__ for op in step.ops] == [
        "LinearOp", "AutogradOp", "LinearOp", "AutogradOp", "LinearOp"
    ]  # fmt: skip
    assert isinstance(step.ops[1], AutogradOp)
    with pytest.raises(ValueError, match="kernels"):
        TrainStep(model, 4, kernels="approximate")


# -------------------------------------------- (b) params.yaml's networks, the lecture


def params_variant(name: str) -> VariantConfig:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return VariantConfig(**params["variants"][name])


@pytest.fixture(scope="module")
def train_windows(names_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    words = parse_names(names_path.read_bytes())
    train, _, _ = shuffle_split(words, 42, 0.8, 0.1)
    return build_windows(train, Vocabulary.from_words(words), 3)


def one_thread(fn, *args, **kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the lecture's loop: ~50x faster on a shared 2-core machine
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


LECTURE_ONE_LAYER = {  # reference.lecture.lecture_train's names -> the MLP's
    False: {"C": "C", "W1": "layers.0.weight", "b1": "layers.0.bias",
            "W2": "layers.2.weight", "b2": "layers.2.bias"},
    True: {"C": "C", "W1": "layers.0.weight", "W2": "layers.3.weight", "b2": "layers.3.bias",
           "bngain": "layers.1.gamma", "bnbias": "layers.1.beta",
           "bnmean_running": "layers.1.running_mean", "bnstd_running": "layers.1.running_std"},
}  # fmt: skip
STEPS = 60


@pytest.mark.parametrize("name", ["naive", "kaiming", "batchnorm"])
def test_default_one_layer_networks_are_the_lecture_loop(name, train_windows):
    """params.yaml's one-layer variants, exact kernels: the lecture's first-half loop
    bit for bit (losses, every parameter, the running mean and std)."""
    X, Y = train_windows
    v = params_variant(name)
    assert v.layers == 1 and v.init == "first_half"
    model, gens = build(v, [SEED], n_embd=10, n_hidden=200)
    cfg = TrainConfig(seeds=[SEED], max_steps=STEPS, lr_decay_step=40, record_every=10)
    result = engine.train(model, X, Y, gens, cfg)
    ref, ref_loss = one_thread(lecture_train, X, Y, name, STEPS, seed=SEED, decay_step=40)
    assert torch.equal(result.loss[:, 0], ref_loss)
    names = LECTURE_ONE_LAYER[v.batchnorm]
    assert set(names.values()) == set(model.state_dict())  # all compared
    state = model.state_dict()
    for k, n in names.items():
        assert torch.equal(state[n][0], ref[k].view(state[n][0].shape)), k


@pytest.mark.parametrize("kernels", ["exact", "fast"])
@pytest.mark.parametrize("name", ["deep_bn", "deep_tanh"])
def test_default_deep_networks_are_the_lecture_loop(name, kernels, train_windows):
    """params.yaml's deep variants: with exact kernels the lecture's second-half loop
    bit for bit (losses, parameters, BatchNorm running mean and variance); with the
    fast kernels the pipeline uses, the losses within 1e-5 relative."""
    X, Y = train_windows
    v = params_variant(name)
    assert (v.layers, v.init, v.batchnorm) == (5, "second_half", name == "deep_bn")
    model, gens = build(v, [SEED], n_embd=10)
    cfg = TrainConfig(seeds=[SEED], max_steps=STEPS, lr_decay_step=150_000, kernels=kernels)
    result = engine.train(model, X, Y, gens, cfg)
    ref = one_thread(lecture_deep_train, X, Y, STEPS, batchnorm=v.batchnorm, seed=SEED,
                     debug=False)  # fmt: skip
    if kernels == "fast":
        assert_close(result.loss[:, 0], ref["loss"], rtol=1e-5, atol=0)
        return
    assert torch.equal(result.loss[:, 0], ref["loss"])
    assert list(ref["params"]) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert torch.equal(p[0].detach(), ref["params"][n]), n
    assert list(ref["buffers"]) == [n for n, _ in model.named_buffers()]
    for n, b in model.named_buffers():
        assert torch.equal(b[0], ref["buffers"][n]), n


# ---------------------------------------------------------- (c) depth is one recipe


@pytest.mark.parametrize("layers", [1, 2, 8])
def test_depth_sweep_is_one_recipe(layers):
    """second_half, 100 units, no BatchNorm: 6,097 parameters at depth 1 and 10,100 per
    extra hidden layer; the draws of a shallower net are the prefix of a deeper one's
    (C, then the Linear weights in layer order), so the first Linear is the same
    matrix at every depth for the same seed."""
    v = VariantConfig(layers=layers, n_hidden=100)
    model, _ = build(v, [SEED, 1], n_embd=10, n_hidden=200)
    assert model.depth == layers
    assert sum(p.numel() for p in model.parameters()) // 2 == 6_097 + (layers - 1) * 10_100
    ref, _ = build(VariantConfig(layers=8, n_hidden=100), [SEED, 1], n_embd=10)
    assert torch.equal(model.C, ref.C)
    hidden = [i for i, m in enumerate(model.layers) if isinstance(m, Linear)][:-1]
    assert hidden == [2 * j for j in range(layers)]
    for i in hidden:  # every hidden weight, not only the first: randn / sqrt(fan_in) x 5/3
        assert torch.equal(model.layers[i].weight, ref.layers[i].weight), i
    out = model.layers[-1]
    assert torch.equal(out.bias, torch.zeros(2, V))
    # the output weight is randn / sqrt(100) x last_scale 0.1, drawn after the hidden ones
    g = torch.Generator().manual_seed(SEED)
    for shape in [(V, 10), (30, 100), *[(100, 100)] * (layers - 1)]:
        torch.randn(shape, generator=g)
    expected = torch.randn((100, V), generator=g) / 100**0.5 * 0.1
    assert torch.equal(out.weight[0], expected)


def test_first_half_at_depth_three_draws_in_layer_order():
    """The first-half recipe at depth 3, written out: C unscaled; then per Linear its
    weight and bias; hidden weights x gain / sqrt(fan_in) (one rounding), hidden biases
    x bias_scale, output x out_weight_scale and out_bias_scale."""
    v = VariantConfig(init="first_half", layers=3, n_hidden=6, bias_scale=0.5,
                      out_weight_scale=0.2, out_bias_scale=0.3)  # fmt: skip
    model = new_model(ModelConfig(n_embd=4, n_hidden=99), v, V, T, 1)
    drawn = first_half(model, v, torch.Generator().manual_seed(SEED))
    g = torch.Generator().manual_seed(SEED)
    ref = {"C": torch.randn((V, 4), generator=g)}
    for i, (fan_in, fan_out) in enumerate([(12, 6), (6, 6), (6, 6), (6, V)]):
        last = i == 3
        W, b = torch.randn((fan_in, fan_out), generator=g), torch.randn(fan_out, generator=g)
        ref[f"layers.{2 * i}.weight"] = W * (0.2 if last else kaiming_scale(5 / 3, fan_in))
        ref[f"layers.{2 * i}.bias"] = b * (0.3 if last else 0.5)
    assert list(drawn) == list(ref) == [n for n, _ in model.named_parameters()]
    for k, t in ref.items():
        assert torch.equal(drawn[k], t), k
    assert RECIPES == {"first_half": first_half, "second_half": second_half}


def test_second_half_with_output_batchnorm_scales_gamma():
    """The lecture's deep BatchNorm net: last gamma x last_scale, every Linear weight
    (the output's included) x gain; nothing drawn but C and the weights."""
    v = VariantConfig(layers=2, n_hidden=6, batchnorm=True, batchnorm_output=True, gain=2.0,
                      last_scale=0.25)  # fmt: skip
    model = new_model(ModelConfig(n_embd=4), v, V, T, 1)
    drawn = second_half(model, v, torch.Generator().manual_seed(SEED))
    g = torch.Generator().manual_seed(SEED)
    assert torch.equal(drawn["C"], torch.randn((V, 4), generator=g))
    for i, (fan_in, fan_out) in zip([0, 3, 6], [(12, 6), (6, 6), (6, V)], strict=True):
        expected = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5 * 2.0
        assert torch.equal(drawn[f"layers.{i}.weight"], expected), i
    assert torch.equal(drawn["layers.7.gamma"], torch.full((V,), 0.25))
    assert torch.equal(drawn["layers.1.gamma"], torch.ones(6))
    assert not any(k.endswith(".bias") for k in drawn)  # BatchNorm's beta is the bias


# ------------------------------------------------ (d) a seed alone or inside a batch


@pytest.mark.parametrize("nonlinearity", ["gelu", "sigmoid"])
def test_seed_alone_and_inside_a_batch_bitwise(nonlinearity):
    """gelu (AutogradOp) and sigmoid, 3 hidden layers with BatchNorm: the same bits
    alone and as the middle of three seeds split over two workers."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, V, (500, T), generator=g), torch.randint(0, V, (500,), generator=g)
    v = variant(nonlinearity, "var", layers=3)
    alone, g1 = build(v, [SEED])
    batch, g3 = build(v, [5, SEED, 11])
    cfg = TrainConfig(seeds=[SEED], max_steps=25, lr_decay_step=15, record_every=5)
    ra = engine.train(alone, X, Y, g1, cfg, workers=1)
    rb = engine.train(batch, X, Y, g3, cfg.model_copy(update={"seeds": [5, SEED, 11]}), workers=2)
    assert torch.equal(rb.loss[:, 1], ra.loss[:, 0])
    for (n, p), q in zip(batch.named_parameters(), alone.parameters(), strict=True):
        assert torch.equal(p[1], q[0]), n
    for n, b in batch.named_buffers():
        assert torch.equal(b[1], alone.get_buffer(n)[0]), n
    for w, r in rb.update_ratio.items():
        assert torch.equal(r[:, 1], ra.update_ratio[w][:, 0]), w
    assert not torch.equal(rb.loss[:, 0], rb.loss[:, 1])  # the others trained, differently


# --------------------------------------------------------------------- (e) config


def test_any_depth_is_valid():
    v = VariantConfig(layers=64)
    assert v.layers == 64 and v.init == "second_half"
    model = new_model(ModelConfig(n_embd=2, n_hidden=3), v, 5, 2, 1)
    assert model.depth == 64 and len(model.weight_names) == 66


@pytest.mark.parametrize("layers", [1, 5])
@pytest.mark.parametrize("init", ["first_half", "second_half"])
@pytest.mark.parametrize("nonlinearity", KINDS)
def test_every_nonlinearity_at_every_depth(nonlinearity, init, layers):
    """Every nonlinearity builds, initialises and trains at depth 1 and 5 under either
    recipe, and its hidden layers are that nonlinearity."""
    v = variant(nonlinearity, layers=layers, init=init)
    model, gens = build(v, [SEED])
    assert model.depth == layers and model.nonlinearity == nonlinearity
    assert all(type(model.layers[i]) is NONLINEARITIES[nonlinearity] for i in model.hidden_indices)
    X = torch.randint(0, V, (100, T), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(seeds=[SEED], max_steps=3, lr_decay_step=3, record_every=1)
    result = engine.train(model, X, X[:, 0], gens, cfg)
    assert result.diverged_at == [None] and torch.isfinite(result.loss).all()


GAINS = [("tanh", 5 / 3), ("relu", math.sqrt(2)), ("linear", 1.0), ("sigmoid", 1.0)]


@pytest.mark.parametrize(("nonlinearity", "gain"), GAINS)
def test_gain_null_is_calculate_gain_for_every_nonlinearity(nonlinearity, gain):
    assert VariantConfig(nonlinearity=nonlinearity, layers=5).gain_value == gain


# (keys, the key the error names, words of its message)
INVALID = [
    ({"init": "first_half", "last_scale": 0.2}, "last_scale", "init: second_half only"),
    ({"out_weight_scale": 0.01}, "out_weight_scale", "init: first_half only"),
    ({"layers": 5, "weight_scale": 0.1}, "weight_scale", "init: first_half only"),
    ({"layers": 5, "bias_scale": 0.1}, "bias_scale", "init: first_half only"),
    ({"batchnorm": True, "batchnorm_form": "std", "eps": 1e-3}, "eps", "'std' form has no eps"),
    ({"layers": 3, "momentum": 0.1}, "momentum", "used only with BatchNorm"),
    ({"batchnorm_form": "std"}, "batchnorm_form", "used only with BatchNorm"),
    ({"eps": 1e-5}, "eps", "used only with BatchNorm"),
    ({"init": "first_half", "weight_scale": 1.0, "gain": 1.0}, "gain", "weight_scale sets"),
    ({"init": "first_half", "batchnorm": True, "bias_scale": 0.5}, "bias_scale",
     "before BatchNorm have no bias"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "key", "words"), INVALID, ids=[e[1] for e in INVALID])
def test_a_key_the_variant_would_ignore_is_an_error_naming_it(kwargs, key, words):
    with pytest.raises(ValidationError) as info:
        VariantConfig(**kwargs)
    (err,) = info.value.errors()
    cause = err["ctx"]["error"]  # the FieldError pipeline.params maps to its line
    assert isinstance(cause, FieldError) and cause.key == key, cause
    assert key in str(cause) and words in str(cause)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init": "first_half", "weight_scale": 1.0},  # naive: gain not needed
        {"nonlinearity": "gelu", "init": "first_half", "weight_scale": 0.3},  # gelu, no gain
        {"nonlinearity": "gelu", "layers": 5},  # gain null: charlm.theory.default_gain
        {"nonlinearity": "gelu", "gain": 1.0, "layers": 5, "batchnorm": True, "eps": 1e-3},
        {"batchnorm_output": True, "momentum": 0.5},  # an output BatchNorm uses momentum
        {"init": "first_half", "batchnorm": True, "batchnorm_form": "std", "momentum": 0.001},
    ],
)
def test_keys_the_variant_reads_are_valid(kwargs):
    VariantConfig(**kwargs)


@pytest.mark.parametrize("removed", ["deep", "w1_init", "w1_scale", "b1_scale", "w2_scale",
                                     "b2_scale", "is_deep", "momentum_value"])  # fmt: skip
def test_removed_keys_are_unknown(removed):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        VariantConfig(**{removed: 1.0})


def test_gelu_null_gain_is_the_gain_that_keeps_a_unit_second_moment():
    """torch's calculate_gain has no gelu entry; null means 1 / sqrt(E[gelu(z)^2]),
    here checked against a Monte-Carlo estimate of E[gelu(z)^2] (2e6 draws, 3 standard
    errors ~ 1e-3 relative on the gain)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    mc = 1 / torch.nn.functional.gelu(z).pow(2).mean().sqrt().item()
    gain = VariantConfig(nonlinearity="gelu").gain_value
    assert abs(gain - 1.5335) < 1e-4
    assert abs(gain - mc) / mc < 2e-3
