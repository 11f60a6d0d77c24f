"""charlm.diagnostics: each number the report draws, computed a second, independent way;
charlm.artefacts: the typed records of diagnostics.pt, their format and their round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.testing import assert_close

from charlm import artefacts
from charlm import diagnostics as diag
from charlm.config import ModelConfig, VariantConfig
from charlm.init import build_mlp

V, T = 27, 3
VARIANTS = {
    "naive": VariantConfig(init="first_half", weight_scale=1.0, bias_scale=1.0,
                           out_weight_scale=1.0, out_bias_scale=1.0),
    "kaiming": VariantConfig(init="first_half"),
    "batchnorm": VariantConfig(init="first_half", batchnorm=True, batchnorm_form="std",
                               momentum=0.001),
}  # fmt: skip
# The one-layer network's W1 and W2 under the layer-list MLP's names (W2 follows a
# BatchNorm layer in the 'batchnorm' variant).
W1 = "layers.0.weight"


def w2(name: str) -> str:
    return "layers.3.weight" if name == "batchnorm" else "layers.2.weight"


def model(name: str, seeds=(1, 2)):
    cfg = ModelConfig(n_embd=10, n_hidden=20)
    return build_mlp(cfg, VARIANTS[name], V, T, [torch.Generator().manual_seed(s) for s in seeds])


def probe(S: int, P: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (P, T), generator=g)
    y = torch.randint(0, V, (P,), generator=g)
    return x.expand(S, -1, -1), y.expand(S, -1)


def test_loss_curve_is_the_lecture_view_mean():
    loss = torch.rand(10, 2, generator=torch.Generator().manual_seed(0)) + 1
    steps, means = diag.loss_curve(loss, 5)
    assert steps.tolist() == [0, 5]
    assert_close(means, loss.double().log10().view(2, 5, 2).mean(1))
    steps, means = diag.loss_curve(loss[:3], 5)  # shorter than a window: one point
    assert steps.tolist() == [0] and means.shape == (1, 2)


def test_activation_summary_counts_by_hand():
    h = torch.zeros(2, 4, 3)
    h[0, :, 1] = 0.995  # unit 1 of model 0 saturated on every example: dead
    h[0, 0, 2] = -0.98  # one value between the two thresholds
    h[1, :2, 0] = 1.0  # saturated on half of the examples: not dead
    s = diag.activation_summary(h, h * 3, (0.97, 0.99))
    assert s["saturated"]["0.97"] == pytest.approx([5 / 12, 2 / 12])
    assert s["saturated"]["0.99"] == pytest.approx([4 / 12, 2 / 12])
    assert s["dead"] == [1, 0]
    assert s["image"].dtype == torch.bool and int(s["image"].sum()) == 6
    assert s["hpreact_mean"] == pytest.approx([3 * (4 * 0.995 - 0.98) / 12, 3 * 2 / 12])


def test_saturation_rule_per_nonlinearity():
    """tanh |h| > t; sigmoid |2h - 1| > t (the same rule on (0, 1)); relu exact zeros;
    linear and gelu have no flat part: None, an empty share and no dead units."""
    h = torch.tensor([[[0.0, 0.5, 0.996, -0.996, 0.001, 0.999]]])
    assert diag.saturated(h, "tanh", 0.99).tolist() == [[[False, False, True, True, False, True]]]
    assert diag.saturated(h, "sigmoid", 0.99).tolist() == [[[True, False, True, True, True, True]]]
    assert diag.saturated(h, "relu", 0.99).tolist() == [[[True, False, False, False, False, False]]]
    for kind in ("linear", "gelu"):
        assert diag.saturated(h, kind, 0.99) is None
        s = diag.activation_summary(h, h, (0.97, 0.99), kind)
        assert s["saturated"] == {} and s["dead"] is None and s["image"] is None
        assert s["hpreact_mean"] == pytest.approx([float(h.mean())])
    relu = torch.tensor([[[0.0, 2.0], [0.0, 0.0], [0.0, 1e-30]]])  # unit 0 off throughout
    s = diag.activation_summary(relu, relu, (0.97, 0.99), "relu")
    assert s["saturated"] == {"0.97": [pytest.approx(4 / 6)], "0.99": [pytest.approx(4 / 6)]}
    assert s["dead"] == [1] and int(s["image"].sum()) == 4


def test_initial_logits_of_a_zero_output_layer_are_uniform():
    m = model("kaiming")
    with torch.no_grad():
        m.layers[2].weight.zero_()  # W2
        m.layers[2].bias.zero_()  # b2
    x, y = probe(2)
    il = diag.initial_logits(m, x, y)
    assert il["loss"] == pytest.approx([math.log(V)] * 2, abs=1e-6)
    assert il["p_target_median"] == pytest.approx([1 / V] * 2)
    assert il["logits_std"] == [0.0, 0.0] and il["logits_std_predicted"] == [0.0, 0.0]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_initial_logits_loss_matches_the_forward_pass(name):
    m = model(name)
    x, y = probe(2)
    il = diag.initial_logits(m, x, y)
    _, loss = m.train()(x, y)
    assert il["loss"] == pytest.approx(loss.tolist(), rel=1e-6)
    # the reason naive's step-0 loss is far above ln 27: logits of sd > 3 (vs 0.1), and
    # the correct character gets less than 1% of the uniform 1/V on half of the probe
    # examples (measured 1e-5 and 1e-4 for these two seeds)
    if name == "naive":
        assert min(il["logits_std"]) > 3 and max(il["p_target_median"]) < 0.01 / V


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradient_at_h_by_hand(name):
    """dloss/dh = (softmax(logits) - onehot) / P @ W2^T, against autograd's."""
    m = model(name)
    x, y = probe(2)
    g = diag.gradients(m, x, y)
    out = m.layers[-1]  # the output Linear: W2, b2
    h = m.train().trace(x)[m.hidden_indices[0]]
    logits = torch.baddbmm(out.bias.unsqueeze(1), h, out.weight).detach()
    dlogits = torch.softmax(logits, 2) - torch.nn.functional.one_hot(y, V).float()
    expected = torch.bmm(dlogits / x.shape[1], out.weight.detach().transpose(1, 2))
    (dh,) = g["dh"]  # one hidden layer
    assert_close(dh, expected, rtol=1e-5, atol=1e-8)
    assert list(g["weights"]) == ["C", W1, w2(name)]  # the model's names, in its order
    for w, rec in g["weights"].items():
        grad = torch.autograd.grad(m.train()(x, y)[1].sum(), m.get_parameter(w))[0]
        expected = grad.reshape(2, -1).std(1) / m.get_parameter(w).detach().reshape(2, -1).std(1)
        assert_close(rec["grad_data_ratio"], expected, rtol=1e-5, atol=0)
        assert_close(rec["grad_std"], grad.reshape(2, -1).std(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_weight_matrices_are_the_models_2d_parameters(name):
    m = model(name)
    assert diag.weight_matrices(m) == ["C", W1, w2(name)] == m.weight_names
    assert [m.weight_label(w) for w in m.weight_names] == ["C", "W1", "W2"]
    assert list(diag.batchnorm_layers(m)) == (["layers.1"] if name == "batchnorm" else [])
    deeper = deep_model("deep_tanh")  # a deeper model lists every Linear weight
    assert diag.weight_matrices(deeper) == deeper.weight_names == [
        "C", "layers.0.weight", "layers.2.weight", "layers.4.weight", "layers.6.weight"
    ]  # fmt: skip
    assert [deeper.weight_label(w) for w in deeper.weight_names] == ["C", "W1", "W2", "W3", "W4"]


def test_gradients_do_not_touch_the_model():
    m = model("batchnorm")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = probe(2)
    diag.gradients(m, x, y)
    diag.activations(m, x, train_mode=True)
    diag.initial_logits(m, x, y)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in m.parameters())


def test_calibrate_batchnorm_against_torch_mean_std():
    """The lecture's calibration, emb @ W1 over the whole split, for the 'std' form."""
    m = model("batchnorm")
    X = torch.randint(0, V, (1000, T), generator=torch.Generator().manual_seed(3))
    cal = diag.calibrate_batchnorm(m, X, chunk=300)
    assert list(cal) == ["layers.1"]
    with torch.no_grad():
        pre = torch.bmm(m.embed(X.expand(2, -1, -1)), m.layers[0].weight)  # (S, N, H)
    c = cal["layers.1"]
    assert_close(c["mean"], pre.mean(1), rtol=1e-5, atol=1e-6)
    assert_close(c["std"], pre.std(1), rtol=1e-5, atol=1e-6)
    recal = diag.with_batchnorm_stats(m, cal)
    assert torch.equal(recal.layers[1].running_mean, c["mean"])
    assert torch.equal(recal.layers[1].running_std, c["std"])  # the 'std' form keeps std
    assert torch.equal(m.layers[1].running_mean, torch.zeros_like(c["mean"]))  # original kept


def test_calibrate_every_batchnorm_in_layer_order():
    """A deep 'var' form net: each BatchNorm from the eval-mode forward pass with the ones
    before it calibrated already; the 'var' form receives std^2."""
    m = deep_model("deep_bn")
    X = torch.randint(0, V, (500, T), generator=torch.Generator().manual_seed(5))
    cal = diag.calibrate_batchnorm(m, X, chunk=128)
    names = ["layers.1", "layers.4", "layers.7", "layers.10"]
    assert list(cal) == names
    recal = diag.with_batchnorm_stats(m, cal).eval()
    with torch.no_grad():
        outs = recal.trace(X.expand(2, -1, -1))
    for name in names:
        i = int(name.split(".")[1])
        pre = outs[i - 1].double()  # the BatchNorm's input, earlier ones calibrated
        assert_close(cal[name]["mean"], pre.mean(1).float(), rtol=1e-5, atol=1e-6)
        assert_close(cal[name]["std"], pre.std(1).float(), rtol=1e-5, atol=1e-6)
        bn = recal.get_submodule(name)
        assert bn.form == "var" and torch.equal(bn.running_mean, cal[name]["mean"])
        assert torch.equal(bn.running_var, cal[name]["std"] * cal[name]["std"])
    for bn in m.batchnorm_modules.values():  # the model itself is untouched
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def records(n_layers: int = 1, S: int = 2, P: int = 4, H: int = 3) -> artefacts.Diagnostics:
    """Small diagnostics records with ``n_layers`` hidden layers."""
    acts = {
        "hpreact": torch.zeros(S, P, H), "h": torch.zeros(S, P, H),
        "saturated": {"0.97": [0.0] * S}, "dead": [0] * S, "hpreact_mean": [0.0] * S,
        "hpreact_std": [1.0] * S, "image": torch.zeros(S, P, H, dtype=torch.bool),
    }  # fmt: skip
    weight = {"grad_mean": torch.zeros(S), "grad_std": torch.ones(S),
              "grad_data_ratio": torch.ones(S),
              "update_ratio": torch.full((2, S), -3.0)}  # fmt: skip
    return artefacts.Diagnostics(
        seeds=list(range(S)), diverged_at=[None, 5], probe_index=torch.arange(P),
        thresholds=[0.97], update_steps=torch.tensor([0, 10]),
        curve={"window": 10, "step": torch.tensor([0]), "log10_loss": torch.zeros(1, S)},
        init_loss={"step0": [3.3] * S, "uniform": math.log(V), "loss": [3.3] * S,
                   "logits_std": [0.1] * S, "logits_std_predicted": [0.1] * S,
                   "p_target_median": [0.04] * S, "p_max": [0.05] * S, "h_rms": [0.5] * S,
                   "output_weight": f"W{n_layers + 1}", "output_weight_std": [0.01] * S},
        layers=[{"activations": {"init": acts, "final": acts}, "dh": torch.zeros(S, P, H)}
                for _ in range(n_layers)],
        weights={"C": weight, **{f"W{i + 1}": weight for i in range(n_layers + 1)}},
        batchnorm=None,
    )  # fmt: skip


def saved(state) -> object:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # no class is unpickled


@pytest.mark.parametrize("n_layers", [1, 6])
def test_records_round_trip_through_a_weights_only_load(n_layers):
    d = records(n_layers)
    back = artefacts.from_state(saved(artefacts.to_state(d)))
    assert back.format == artefacts.FORMAT
    assert len(back.layers) == n_layers and list(back.weights)[-1] == f"W{n_layers + 1}"
    assert torch.equal(back.weights["W1"].update_ratio, d.weights["W1"].update_ratio)
    assert back.diverged_at == [None, 5] and back.batchnorm is None


def test_records_of_another_format_are_refused_with_the_file_named():
    state = artefacts.to_state(records())
    state["format"] = 3
    with pytest.raises(ValueError, match=r"data/eval/x/diagnostics.pt: diagnostics format 3, "
                       r"but this code reads format \d+; .* rerun it"):  # fmt: skip
        artefacts.from_state(state, "data/eval/x/diagnostics.pt")
    with pytest.raises(ValueError, match="format None"):
        artefacts.from_state({"curve": {}}, "old.pt")  # format 1 had no version at all
    state = artefacts.to_state(records())
    state["layers"][0]["dh"] = [0.0]  # a list where a tensor belongs
    with pytest.raises(
        ValueError,
        match=r"x.pt: not valid diagnostics \(format \d+\): layers.0.dh: Input should be",
    ):
        artefacts.from_state(state, "x.pt")


def test_evaluate_stage_diagnostics_are_valid_records(tmp_path):
    """diagnose() fills every field of the records for a BatchNorm model (names from it)."""
    from charlm.config import EvaluateConfig
    from pipeline.stages.evaluate import diagnose

    m, init = model("batchnorm"), model("batchnorm")
    x, y = probe(2)
    X = torch.randint(0, V, (50, T), generator=torch.Generator().manual_seed(4))
    splits = {k: {"X": X, "Y": X[:, 0]} for k in ("train", "val", "test")}
    history = {"loss": torch.full((20, 2), 3.0), "record_steps": torch.tensor([0, 10]),
               "update_ratio": {w: torch.zeros(2, 2) for w in m.weight_names}}  # fmt: skip
    losses = {k: [2.0, 2.1] for k in splits}
    fields = diagnose(m, init, history, (x, y), splits, losses, EvaluateConfig(curve_window=5))
    d = artefacts.from_state(
        saved(artefacts.to_state(artefacts.Diagnostics(
            seeds=[1, 2], diverged_at=[None, None], probe_index=torch.arange(16), **fields
        )))
    )  # fmt: skip
    assert list(d.weights) == ["C", W1, w2("batchnorm")]
    assert d.init_loss.output_weight == w2("batchnorm")
    assert list(d.batchnorm.layers) == ["layers.1"] and d.batchnorm.loss_running == losses
    assert d.batchnorm.loss_calibrated is not None
    assert d.layers[0].activations["init"].h.shape == (2, 16, 20)


# ------------------------------------------------------------------ deep networks

DEEP = {
    "deep_bn": VariantConfig(layers=3, n_hidden=16, batchnorm=True, batchnorm_output=True,
                             gain=1.0),
    "deep_tanh": VariantConfig(layers=3, n_hidden=16),
}  # fmt: skip


def deep_model(name: str, seeds=(1, 2)):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return build_mlp(ModelConfig(n_embd=10, n_hidden=200), DEEP[name], V, T, gens)


@pytest.mark.parametrize("name", sorted(DEEP))
def test_deep_gradients_activations_and_logits(name):
    """One record per hidden nonlinearity; dloss/dh of the last one by hand (no output
    BatchNorm) and every weight's gradient against autograd on the model's forward."""
    m = deep_model(name)
    x, y = probe(2)
    assert diag.n_params(m) == sum(p[0].numel() for p in m.parameters())
    assert diag.weight_matrices(m) == m.weight_names
    assert list(diag.batchnorm_layers(m)) == (
        ["layers.1", "layers.4", "layers.7", "layers.10"] if name == "deep_bn" else []
    )
    g = diag.gradients(m, x, y)
    acts = diag.activations(m, x, train_mode=True)
    outs = m.train().trace(x)
    assert len(g["dh"]) == len(acts) == 3
    for a, i in zip(acts, m.hidden_indices, strict=True):
        assert torch.equal(a["h"], outs[i].detach()) and torch.equal(a["hpreact"], outs[i - 1])
    if name == "deep_tanh":
        W = m.layers[-1].weight.detach()
        dlogits = torch.softmax(outs[-1].detach(), 2) - torch.nn.functional.one_hot(y, V)
        assert_close(g["dh"][-1], torch.bmm(dlogits / x.shape[1], W.transpose(1, 2)))
    for w, rec in g["weights"].items():
        grad = torch.autograd.grad(m.train()(x, y)[1].sum(), m.get_parameter(w))[0]
        assert_close(rec["grad_std"], grad.reshape(2, -1).std(1), rtol=1e-5, atol=0)
    il = diag.initial_logits(m, x, y)
    assert il["loss"] == pytest.approx(m.train()(x, y)[1].tolist(), rel=1e-6)
    assert il["output_weight"] == m.weight_names[-1]
    if name == "deep_bn":  # normalised logits: sd = rms of the output gamma (0.1)
        assert il["logits_std_predicted"] == pytest.approx([0.1, 0.1], rel=1e-6)
        # measured on the probe batch: a sample sd, within a few % of the predicted 0.1
        assert il["logits_std"] == pytest.approx([0.1, 0.1], rel=0.05)


def test_evaluate_stage_fills_the_deep_records():
    """diagnose() on a deep BatchNorm model with train's captures: every hidden layer,
    the running statistics of each BatchNorm, the snapshots and the parameter count."""
    from charlm import engine
    from charlm.config import EvaluateConfig, TrainConfig
    from pipeline.stages.evaluate import depth_summary, diagnose
    from pipeline.stages.train import capture_steps

    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    m = build_mlp(ModelConfig(n_embd=10), DEEP["deep_bn"], V, T, gens)
    init = deep_model("deep_bn")
    X = torch.randint(0, V, (200, T), generator=torch.Generator().manual_seed(4))
    Y = X[:, 0]
    cfg = TrainConfig(seeds=[1, 2], max_steps=12, lr_decay_step=150_000, record_every=4)
    steps = capture_steps(cfg.max_steps)
    assert steps == {"final": 11}  # the lecture's step 1,000 lies past this run
    result = engine.train(m, X, Y, gens, cfg, capture_steps=tuple(steps.values()))
    captures = {k: {"step": i, **result.captures[i]} for k, i in steps.items()}
    splits = {k: {"X": X, "Y": Y} for k in ("train", "val", "test")}
    history = {"loss": result.loss, "record_steps": result.record_steps,
               "update_ratio": result.update_ratio}  # fmt: skip
    losses = {k: [2.0, 2.1] for k in splits}
    x, y = probe(2)
    fields = diagnose(m, init, history, (x, y), splits, losses,
                      EvaluateConfig(curve_window=5), captures)  # fmt: skip
    d = artefacts.from_state(
        saved(artefacts.to_state(artefacts.Diagnostics(
            seeds=[1, 2], diverged_at=[None, None], probe_index=torch.arange(16), **fields
        )))
    )  # fmt: skip
    assert d.n_params == diag.n_params(m) and len(d.layers) == 3
    assert list(d.weights) == m.weight_names
    bn = d.batchnorm
    assert list(bn.layers) == ["layers.1", "layers.4", "layers.7", "layers.10"]
    # every BatchNorm is calibrated now, at any depth (the first from emb @ W1)
    assert set(bn.loss_calibrated) == set(losses)
    with torch.no_grad():
        pre = torch.bmm(m.embed(X.expand(2, -1, -1)), m.layers[0].weight)
    assert_close(bn.layers["layers.1"].calibrated_mean, pre.mean(1), rtol=1e-5, atol=1e-6)
    assert all(la.calibrated_std is not None for la in bn.layers.values())
    assert_close(bn.layers["layers.1"].running_std, m.layers[1].running_var.sqrt())
    snap = d.snapshots["final"]
    assert (snap.step, snap.threshold) == (11, 0.97)
    assert [la.name for la in snap.layers] == ["layers.2", "layers.5", "layers.8"]
    out = result.captures[11]["out"][2]
    assert snap.layers[0].std == pytest.approx(out.reshape(2, -1).std(1).tolist(), rel=1e-6)
    sat = (out.abs() > 0.97).float().reshape(2, -1).mean(1)
    assert snap.layers[0].saturated == pytest.approx(sat.tolist())
    w = snap.weights["layers.0.weight"]
    after = m.layers[0].weight.detach().reshape(2, -1).std(1)  # the last step: the final state
    assert w.data_std == pytest.approx(after.tolist(), rel=1e-6)
    assert w.grad_data_ratio == pytest.approx((torch.tensor(w.grad_std) / after).tolist())
    depth = depth_summary(artefacts.to_state(d)["snapshots"])
    assert set(depth) == {"final"}
    assert depth["final"]["std_first"] == pytest.approx(sum(snap.layers[0].std) / 2)
    expected = sum(max(v) for v in zip(*(la.saturated for la in snap.layers), strict=True))
    assert depth["final"]["saturated_max"] == pytest.approx(expected / 2 * 100)
