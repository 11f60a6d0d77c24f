"""charlm.engine: the hand-written backward pass and the batched training loop.

Two independent computations compared (micrograd's test): forward_backward against
autograd through MLP.forward, and engine.train against the lecture's plain autograd
loop (makemore part 3, ``p.data += -lr * p.grad``, one randint per step).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from support import LECTURE_NAMES
from torch.testing import assert_close

from charlm import engine
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from charlm.data import Vocabulary, build_windows, parse_names, shuffle_split
from charlm.init import build_mlp
from charlm.layers import BatchNorm1d
from charlm.model import MLP
from reference.lecture import lecture_train

ROOT = Path(__file__).resolve().parents[1]
SEED = 2147483647
VARIANTS = ("naive", "kaiming", "batchnorm")
# Loss of the canonical seed's first minibatch, before any update (DESIGN.md).
STEP0_LOSS = {"naive": 27.8817, "kaiming": 3.3179, "batchnorm": 3.3239}


def variant_config(name: str) -> VariantConfig:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return VariantConfig(**params["variants"][name])


def new_model(name: str, seeds: list[int], vocab_size: int = 27) -> tuple[MLP, list]:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return build_mlp(ModelConfig(), variant_config(name), vocab_size, 3, gens), gens


@pytest.fixture(scope="module")
def train_windows(names_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Xtr, Ytr of the lecture's split of the real names."""
    words = parse_names(names_path.read_bytes())
    train, _, _ = shuffle_split(words, 42, 0.8, 0.1)
    return build_windows(train, Vocabulary.from_words(words), 3)


# ------------------------------------------------------ backward vs autograd


def perturb_(model: MLP, seed: int = 3) -> None:
    """Move every parameter and buffer off its special init value (b2 = 0, gamma = 1,
    ...), so that a term the backward pass forgets cannot hide behind a 0 or a 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for bn in model.batchnorm_modules.values():
            bn.running_stat.abs_().add_(0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_matches_autograd(name, dtype):
    S, B = 3, 32
    model, _ = new_model(name, [SEED, 1, 2])
    perturb_(model)
    model = model.to(dtype)
    twin = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, 27, (S, B, 3), generator=g)
    targets = torch.randint(0, 27, (S, B), generator=g)
    # garbage in the buffers: forward_backward must overwrite every element
    grads = {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    loss = engine.forward_backward(model, idx, targets, grads)

    _, ref_loss = twin(idx, targets)
    ref_loss.sum().backward()  # the S models are independent: d(sum)/dp_s = dloss_s/dp_s

    # Same formulas, different summation orders: float64 agrees to ~1e-13, float32 to
    # ~1e-6 relative (a few ulp after sums over B = 32 and H = 200 terms).
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    assert loss.shape == (S,)
    assert_close(loss, ref_loss.detach(), **tol)
    for n, p in twin.named_parameters():
        assert_close(grads[n], p.grad, **tol, msg=lambda m, n=n: f"{name} d{n}: {m}")
        assert float(p.grad.abs().max()) > 0, f"{name}: autograd d{n} is all zero"
    for n, b in twin.named_buffers():  # BatchNorm running statistics, updated alike
        assert_close(dict(model.named_buffers())[n], b, **tol)
    # the parameters themselves are left alone
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True)
    )


# --------------------------------------------------------------- step-0 loss


@pytest.mark.parametrize("name", VARIANTS)
def test_step0_loss_of_the_canonical_seed(name, train_windows):
    X, Y = train_windows
    model, gens = new_model(name, [SEED, 1])  # canonical seed inside a batch of two
    cfg = TrainConfig(seeds=[SEED, 1], max_steps=1, lr_decay_step=1)
    result = engine.train(model, X, Y, gens, cfg)
    assert result.loss.shape == (1, 2)
    assert abs(float(result.loss[0, 0]) - STEP0_LOSS[name]) < 1e-4, float(result.loss[0, 0])


def test_well_initialised_step0_loss_is_near_uniform(train_windows):
    """-ln(1/27) = 3.2958: Kaiming's step-0 loss over all seeds stays within 0.1."""
    X, Y = train_windows
    seeds = [SEED, 1, 2, 3]
    model, gens = new_model("kaiming", seeds)
    result = engine.train(model, X, Y, gens, TrainConfig(seeds=seeds, max_steps=1, lr_decay_step=1))
    assert (result.loss[0] - 3.2958).abs().max() < 0.1


# --------------------------------------------- train vs the lecture's loop


@pytest.mark.parametrize("name", VARIANTS)
def test_train_matches_the_lecture_loop(name, train_windows, monkeypatch):
    X, Y = train_windows
    steps, decay = 50, 30
    # minibatch indices are drawn CHUNK steps at a time; cross two chunk boundaries
    monkeypatch.setattr(engine, "CHUNK", 20)
    model, gens = new_model(name, [SEED])
    cfg = TrainConfig(seeds=[SEED], max_steps=steps, lr_decay_step=decay, record_every=10)
    result = engine.train(model, X, Y, gens, cfg)
    ref, ref_loss = lecture_train(X, Y, name, steps, seed=SEED, decay_step=decay)

    assert result.loss.shape == (steps, 1)
    assert result.diverged_at == [None]
    # the engine replays autograd's kernels in autograd's order (charlm/engine.py), so
    # the run is bitwise the lecture's: equality, for every variant
    assert torch.equal(result.loss[:, 0], ref_loss)
    names = LECTURE_NAMES[name == "batchnorm"]
    assert {n for n, _ in model.named_parameters()} == set(names.values())  # all compared
    for k, n in names.items():
        p = model.get_parameter(n)[0].detach()
        assert torch.equal(p, ref[k].view(p.shape)), k  # bngain, bnbias: (1, H) there
    if name == "batchnorm":
        bn = model.layers[1]
        assert isinstance(bn, BatchNorm1d) and bn.form == "std"
        assert torch.equal(bn.running_mean[0], ref["bnmean_running"][0])
        assert torch.equal(bn.running_std[0], ref["bnstd_running"][0])
    assert result.record_steps.tolist() == [0, 10, 20, 30, 40]
    assert set(result.update_ratio) == {"C", "layers.0.weight", names["W2"]}
    assert all(
        v.shape == (5, 1) and bool(torch.isfinite(v).all()) for v in result.update_ratio.values()
    )


@pytest.mark.parametrize("name", ["kaiming", "batchnorm"])
def test_seed_trains_alike_alone_and_inside_a_batch(name, train_windows):
    X, Y = train_windows
    cfg_one = TrainConfig(seeds=[1], max_steps=30, lr_decay_step=30)
    cfg_three = TrainConfig(seeds=[SEED, 1, 2], max_steps=30, lr_decay_step=30)
    alone, g1 = new_model(name, [1])
    batch, g3 = new_model(name, [SEED, 1, 2])
    loss_alone = engine.train(alone, X, Y, g1, cfg_one).loss[:, 0]
    loss_batch = engine.train(batch, X, Y, g3, cfg_three).loss[:, 1]
    # every op is per model (charlm/engine.py): bitwise, not just close
    assert torch.equal(loss_batch, loss_alone)
    for (n, p), q in zip(batch.named_parameters(), alone.parameters(), strict=True):
        assert torch.equal(p[1], q[0]), n
    for n, b in batch.named_buffers():
        assert torch.equal(b[1], alone.get_buffer(n)[0]), n


def test_train_reports_divergence():
    """A learning rate far too large: the model's loss turns non-finite and is reported."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 27, (500, 3), generator=g)
    Y = torch.randint(0, 27, (500,), generator=g)
    model, gens = new_model("naive", [SEED, 1])
    with torch.no_grad():
        model.layers[2].weight[1] *= 1e30  # model 1 (W2) blows up, model 0 is untouched
    cfg = TrainConfig(seeds=[SEED, 1], max_steps=20, lr_decay_step=20, lr=1e30)
    result = engine.train(model, X, Y, gens, cfg)
    assert result.diverged_at[1] is not None and 0 <= result.diverged_at[1] < 20
    assert not bool(torch.isfinite(result.loss[result.diverged_at[1], 1]))


def test_train_rejects_batchnorm_with_batch_of_one():
    model, gens = new_model("batchnorm", [SEED])
    X, Y = torch.zeros(10, 3, dtype=torch.int64), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="batch_size"):
        engine.train(
            model, X, Y, gens, TrainConfig(seeds=[SEED], max_steps=1, lr_decay_step=1, batch_size=1)
        )
    with pytest.raises(ValueError, match="generators"):
        engine.train(model, X, Y, gens * 2, TrainConfig(seeds=[SEED], max_steps=1, lr_decay_step=1))
