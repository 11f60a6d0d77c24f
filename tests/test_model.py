"""charlm.model and charlm.init at depth 1: initial parameters, parameter counts, and
the 'std' form of charlm.layers.BatchNorm1d (the lecture's first half).

The initial draws of the 'first_half' recipe are compared bitwise with the lecture's
draw sequence written out here independently (DESIGN.md, "randomness" and "init");
BatchNorm1d is compared with a per-unit loop over ``torch.var_mean``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from support import LECTURE_NAMES
from torch.testing import assert_close

from charlm.config import ModelConfig, VariantConfig
from charlm.init import build_mlp, first_half
from charlm.layers import BatchNorm1d
from charlm.model import new_model

ROOT = Path(__file__).resolve().parents[1]
SEED = 2147483647
VARIANTS = ("naive", "kaiming", "batchnorm")
V, T, E, H = 27, 3, 10, 200


def variant_config(name: str) -> VariantConfig:
    """The variant exactly as params.yaml configures it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return VariantConfig(**params["variants"][name])


def model_config() -> ModelConfig:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return ModelConfig(**params["model"])


def reference_draw(name: str, seed: int = SEED) -> tuple[dict[str, torch.Tensor], torch.Generator]:
    """The lecture's draw sequence for one variant, one generator, in DESIGN.md order."""
    g = torch.Generator().manual_seed(seed)
    kaiming = (5 / 3) / 30**0.5  # calculate_gain('tanh') / sqrt(fan_in = 3 * 10)
    if name == "naive":
        p = {
            "C": torch.randn((27, 10), generator=g),
            "W1": torch.randn((30, 200), generator=g),
            "b1": torch.randn(200, generator=g),
            "W2": torch.randn((200, 27), generator=g),
            "b2": torch.randn(27, generator=g),
        }
    elif name == "kaiming":
        p = {
            "C": torch.randn((27, 10), generator=g),
            "W1": torch.randn((30, 200), generator=g) * kaiming,
            "b1": torch.randn(200, generator=g) * 0.01,
            "W2": torch.randn((200, 27), generator=g) * 0.01,
            "b2": torch.randn(27, generator=g) * 0,
        }
    elif name == "batchnorm":  # no b1 drawn at all
        p = {
            "C": torch.randn((27, 10), generator=g),
            "W1": torch.randn((30, 200), generator=g) * kaiming,
            "W2": torch.randn((200, 27), generator=g) * 0.01,
            "b2": torch.randn(27, generator=g) * 0,
        }
    else:
        raise KeyError(name)
    return p, g


@pytest.mark.parametrize("name", VARIANTS)
def test_initial_parameters_match_reference_draws_bitwise(name):
    cfg = variant_config(name)
    ref, ref_g = reference_draw(name)
    assert cfg.init == "first_half"
    g = torch.Generator().manual_seed(SEED)
    drawn = first_half(new_model(model_config(), cfg, V, T, 1), cfg, g)
    names = LECTURE_NAMES[cfg.batchnorm]
    # drawn in the lecture's order; then BatchNorm's gamma 1 and beta 0, not drawn
    assert list(drawn)[: len(ref)] == [names[k] for k in ref]
    for k in ref:
        assert drawn[names[k]].dtype == torch.float32
        assert torch.equal(drawn[names[k]], ref[k]), f"{name}: {k} differs from the reference draw"
    if cfg.batchnorm:
        assert torch.equal(drawn["layers.1.gamma"], torch.ones(H))
        assert torch.equal(drawn["layers.1.beta"], torch.zeros(H))
    assert len(drawn) == len(names)
    # the generator is left exactly where the lecture starts drawing minibatches
    assert torch.equal(
        torch.randint(0, 1000, (32,), generator=g), torch.randint(0, 1000, (32,), generator=ref_g)
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_build_mlp_stacks_one_generator_per_model(name):
    seeds = [SEED, 1, 2]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    model = build_mlp(model_config(), variant_config(name), V, T, gens)
    assert model.n_models == 3 and model.depth == 1
    names = LECTURE_NAMES[name == "batchnorm"]
    for s, seed in enumerate(seeds):
        ref, ref_g = reference_draw(name, seed)
        for k, v in ref.items():
            assert torch.equal(model.get_parameter(names[k])[s], v), f"{name}: model {s} {k}"
        assert torch.equal(
            torch.randint(0, 1000, (32,), generator=gens[s]),
            torch.randint(0, 1000, (32,), generator=ref_g),
        )
    if name == "batchnorm":
        assert model.layers[0].bias is None  # no b1: BatchNorm's beta is the bias
        assert list(model.batchnorm_modules) == ["layers.1"]
        bn = model.layers[1]
        assert isinstance(bn, BatchNorm1d) and bn.form == "std"
        assert torch.equal(bn.gamma, torch.ones(3, H))
        assert torch.equal(bn.beta, torch.zeros(3, H))
        assert torch.equal(bn.running_mean, torch.zeros(3, H))
        assert torch.equal(bn.running_std, torch.ones(3, H))
        assert bn.running_stat is bn.running_std
        assert bn.momentum == 0.001
        assert model.hidden_indices == [2]
    else:
        assert model.batchnorm_modules == {}
        assert model.hidden_indices == [1]
    assert model.weight_names == ["C", "layers.0.weight", names["W2"]]
    assert [model.weight_label(w) for w in model.weight_names] == ["C", "W1", "W2"]


@pytest.mark.parametrize(
    ("name", "count", "names"),
    [
        ("naive", 11_897, ["C", "W1", "b1", "W2", "b2"]),
        ("kaiming", 11_897, ["C", "W1", "b1", "W2", "b2"]),
        ("batchnorm", 12_097, ["C", "W1", "bngain", "bnbias", "W2", "b2"]),
    ],
)
def test_parameter_counts(name, count, names):
    gens = [torch.Generator().manual_seed(SEED)]
    model = build_mlp(model_config(), variant_config(name), V, T, gens)
    assert sum(p.numel() for p in model.parameters()) == count
    lecture = LECTURE_NAMES[name == "batchnorm"]
    assert [n for n, _ in model.named_parameters()] == [lecture[n] for n in names]
    # running statistics are buffers, never trained
    expected_buffers = (
        ["layers.1.running_mean", "layers.1.running_std"] if name == "batchnorm" else []
    )
    assert [n for n, _ in model.named_buffers()] == expected_buffers


def test_forward_contract_shapes_and_loss():
    gens = [torch.Generator().manual_seed(s) for s in (SEED, 1)]
    model = build_mlp(model_config(), variant_config("kaiming"), V, T, gens)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (2, 5, T), generator=g)
    targets = torch.randint(0, V, (2, 5), generator=g)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 5, V) and logits.dtype == torch.float32
    assert loss.shape == (2,)
    # independent: the lecture's single-model forward, one model at a time
    for s in range(2):
        emb = model.C[s][idx[s]]  # (B, T, E)
        W1, b1 = model.layers[0].weight[s], model.layers[0].bias[s]
        W2, b2 = model.layers[2].weight[s], model.layers[2].bias[s]
        h = torch.tanh(emb.view(5, -1) @ W1 + b1)
        ref_logits = h @ W2 + b2
        assert_close(logits[s], ref_logits, rtol=1e-5, atol=1e-6)
        ref_loss = torch.nn.functional.cross_entropy(ref_logits, targets[s])
        assert_close(loss[s], ref_loss, rtol=1e-5, atol=1e-6)
    assert model(idx)[1] is None


# ----------------------------------------------------------------- BatchNorm

# float32 forward vs float64 reference: a few ulp of values of order 1-10.
BN_TOL = {"rtol": 1e-5, "atol": 1e-5}


def bn_reference_train(x, gamma, beta, running_mean, running_std, momentum):
    """Per-unit loop: unbiased std (correction=1), PyTorch's momentum convention."""
    S, _, Hd = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    rm, rs = running_mean.double().clone(), running_std.double().clone()
    for s in range(S):
        for j in range(Hd):
            col = x[s, :, j].double()
            var, mean = torch.var_mean(col, correction=1)
            std = var.sqrt()
            out[s, :, j] = gamma[s, j].double() * (col - mean) / std + beta[s, j].double()
            rm[s, j] = (1 - momentum) * rm[s, j] + momentum * mean
            rs[s, j] = (1 - momentum) * rs[s, j] + momentum * std
    return out, rm, rs


def random_bn(
    S: int, Hd: int, momentum: float, seed: int = 0
) -> tuple[BatchNorm1d, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    bn = BatchNorm1d(S, Hd, form="std", momentum=momentum)
    with torch.no_grad():  # non-trivial gamma, beta and running statistics
        bn.gamma.copy_(1 + 0.5 * torch.randn(S, Hd, generator=g))
        bn.beta.copy_(torch.randn(S, Hd, generator=g))
        bn.running_mean.copy_(torch.randn(S, Hd, generator=g))
        bn.running_std.copy_(0.5 + torch.rand(S, Hd, generator=g))
    return bn, g


@pytest.mark.parametrize("form", ["std", "var"])
def test_batchnorm_starts_at_identity_statistics(form):
    bn = BatchNorm1d(2, 4, form=form)
    assert bn.momentum == 0.1 and bn.eps == 1e-5  # PyTorch's defaults
    assert [n for n, _ in bn.named_parameters()] == ["gamma", "beta"]
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", f"running_{form}"]
    assert torch.equal(bn.gamma, torch.ones(2, 4)) and torch.equal(bn.beta, torch.zeros(2, 4))
    assert torch.equal(bn.running_mean, torch.zeros(2, 4))
    assert torch.equal(bn.running_stat, torch.ones(2, 4))
    with pytest.raises(ValueError, match="form"):
        BatchNorm1d(2, 4, form="biased")


@pytest.mark.parametrize("momentum", [0.001, 0.1, 1.0])
def test_batchnorm_train_mode_against_per_unit_loop(momentum):
    S, B, Hd = 2, 32, 7
    bn, g = random_bn(S, Hd, momentum)
    bn.train()
    rm, rs = bn.running_mean.clone(), bn.running_std.clone()
    for _ in range(3):  # the running update compounds over steps
        x = 3 * torch.randn(S, B, Hd, generator=g) + 2
        ref, rm, rs = bn_reference_train(x, bn.gamma, bn.beta, rm, rs, momentum)
        out = bn(x)
        assert out.shape == (S, B, Hd)
        assert_close(out.double(), ref, **BN_TOL)
        assert_close(bn.running_mean.double(), rm, **BN_TOL)
        assert_close(bn.running_std.double(), rs, **BN_TOL)
    # with gamma 1 and beta 0 the output has per-unit mean 0 and unbiased std 1
    unit = BatchNorm1d(S, Hd, form="std", momentum=momentum)
    y = unit(3 * torch.randn(S, B, Hd, generator=g) + 2)
    assert_close(y.mean(1), torch.zeros(S, Hd), rtol=0, atol=1e-5)
    assert_close(y.std(1), torch.ones(S, Hd), rtol=0, atol=1e-5)


def test_batchnorm_running_update_by_hand():
    """momentum 0.001 from (0, 1): running = 0.999 * running + 0.001 * batch."""
    bn = BatchNorm1d(1, 1, form="std", momentum=0.001)
    x = torch.tensor([[[1.0], [2.0], [3.0], [6.0]]])  # mean 3, unbiased var 14/3
    bn(x)
    assert_close(bn.running_mean, torch.tensor([[0.003]]), rtol=1e-6, atol=0)
    assert_close(
        bn.running_std, torch.tensor([[0.999 + 0.001 * (14 / 3) ** 0.5]]), rtol=1e-6, atol=0
    )


def test_batchnorm_eval_mode_uses_running_statistics_and_keeps_them():
    S, B, Hd = 3, 5, 4
    bn, g = random_bn(S, Hd, momentum=0.001, seed=1)
    bn.eval()
    rm, rs = bn.running_mean.clone(), bn.running_std.clone()
    x = torch.randn(S, B, Hd, generator=g)
    out = bn(x)
    ref = torch.empty(S, B, Hd, dtype=torch.float64)
    for s in range(S):
        for j in range(Hd):
            ref[s, :, j] = (
                bn.gamma[s, j].double() * (x[s, :, j].double() - rm[s, j].double()) / rs[s, j]
                + bn.beta[s, j]
            )
    assert_close(out.double(), ref, **BN_TOL)
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_std, rs)
    # one example at a time gives the same as the batch (no batch statistics in eval)
    assert_close(bn(x[:, :1]), out[:, :1], rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, 0.001])
def test_var_form_train_mode_against_per_unit_loop(momentum):
    """The second half's form: (x - mean) / sqrt(var + eps) with the unbiased variance,
    a running variance (not std), eps inside the square root."""
    S, B, Hd, eps = 2, 16, 5, 1e-3
    g = torch.Generator().manual_seed(4)
    bn = BatchNorm1d(S, Hd, form="var", momentum=momentum, eps=eps)
    with torch.no_grad():
        bn.gamma.copy_(1 + 0.5 * torch.randn(S, Hd, generator=g))
        bn.beta.copy_(torch.randn(S, Hd, generator=g))
    rm, rv = bn.running_mean.double().clone(), bn.running_var.double().clone()
    for _ in range(3):
        x = 3 * torch.randn(S, B, Hd, generator=g) + 2
        out = bn(x)
        ref = torch.empty(S, B, Hd, dtype=torch.float64)
        for s in range(S):
            for j in range(Hd):
                col = x[s, :, j].double()
                var, mean = torch.var_mean(col, correction=1)
                ref[s, :, j] = bn.gamma[s, j].double() * (col - mean) / (var + eps).sqrt()
                ref[s, :, j] += bn.beta[s, j].double()
                rm[s, j] = (1 - momentum) * rm[s, j] + momentum * mean
                rv[s, j] = (1 - momentum) * rv[s, j] + momentum * var
        assert_close(out.double(), ref, **BN_TOL)
        assert_close(bn.running_mean.double(), rm, **BN_TOL)
        assert_close(bn.running_var.double(), rv, **BN_TOL)
    bn.eval()  # eval: the running variance, eps included
    x = torch.randn(S, 3, Hd, generator=g)
    expect = bn.gamma.unsqueeze(1) * (
        (x - bn.running_mean.unsqueeze(1)) / torch.sqrt(bn.running_var.unsqueeze(1) + eps)
    ) + bn.beta.unsqueeze(1)
    assert torch.equal(bn(x), expect)
