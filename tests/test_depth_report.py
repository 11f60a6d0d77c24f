"""The layer-by-layer part of the report and the verdict at depth, on synthetic records
(charlm.artefacts, diagnostics format 6: every variant has snapshots).

Five hidden tanh layers, three seeds: each figure function draws (or says why not), the
tables hold mean ± sd across seeds computed here independently, variants are compared
when their architectures differ in one knob at most, and the summary sentence carries
the paired interval. The params are validated ``charlm.config.Params`` (as
``pipeline.params`` gives them). The template tests execute the whole template with
papermill on a synthetic evaluate directory, one with params.yaml written in every
YAML 1.2 number spelling the stages accept.
"""

from __future__ import annotations

import copy
import html
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from matplotlib.figure import Figure
from support import ROOT

from charlm import artefacts as A
from charlm.config import Params
from pipeline import params as params_file
from reporting import depth as rd
from reporting import stats as rs
from reporting import verdict as rv

S, B, H, LAYERS, V = 3, 16, 8, 5, 27
SEEDS = [2147483647, 1, 2]
DEEP = {"init": "second_half", "layers": LAYERS, "n_hidden": H, "gain": 1.0}
PARAMS = {
    "data": {"url": "https://example.invalid/names.txt", "sha256": "0" * 64},
    "model": {"n_embd": 10, "n_hidden": 200},
    "train": {"seeds": SEEDS, "max_steps": 2000, "lr_decay_step": 1500, "batch_size": 32},
    "variants": {
        "naive": {"init": "first_half", "weight_scale": 1.0},
        "kaiming": {"init": "first_half", "gain": None},
        "deep_bn": {**DEEP, "batchnorm": True, "batchnorm_output": True},
        "deep_tanh": {**DEEP, "gain": 5 / 3},
    },
}
VAL = {  # per-seed val losses: deep_tanh is worse by 0.02 ± 0.001
    "naive": [2.17, 2.18, 2.16],
    "kaiming": [2.11, 2.10, 2.12],
    "deep_bn": [2.30, 2.31, 2.29],
    "deep_tanh": [2.321, 2.329, 2.310],
}
N_PARAMS = {"naive": 11_897, "kaiming": 11_897, "deep_bn": 47_024, "deep_tanh": 46_497}


def snapshot(step: int, g: torch.Generator, scale: float, n_layers: int = LAYERS) -> A.Snapshot:
    layers = []
    for i in range(n_layers):
        out = torch.tanh(scale * (i + 1) * torch.randn(S, B, H, generator=g))
        grad = 1e-3 * (i + 1) * torch.randn(S, B, H, generator=g)
        flat, gflat = out.reshape(S, -1), grad.reshape(S, -1)
        layers.append(A.LayerSnapshot(
            name=f"layers.{3 * i + 2}", kind="tanh", out=out, out_grad=grad,
            mean=flat.mean(1).tolist(), std=flat.std(1).tolist(),
            saturated=(flat.abs() > 0.97).float().mean(1).tolist(),
            grad_mean=gflat.mean(1).tolist(), grad_std=gflat.std(1).tolist(),
        ))  # fmt: skip
    weights = {}
    shapes = {
        "C": (V, 10),
        "layers.0.weight": (30, H),
        **{f"layers.{3 * i}.weight": (H, H) for i in range(1, n_layers)},
        f"layers.{3 * n_layers}.weight": (H, V),
    }
    for name, (fan_in, fan_out) in shapes.items():
        grad = 1e-2 * torch.randn(S, fan_in, fan_out, generator=g)
        gs = grad.reshape(S, -1).std(1)
        data = torch.full((S,), 0.5) + 0.01 * torch.arange(S)
        weights[name] = A.WeightSnapshot(
            grad=grad, grad_mean=grad.reshape(S, -1).mean(1).tolist(), grad_std=gs.tolist(),
            data_std=data.tolist(), grad_data_ratio=(gs / data).tolist(),
        )  # fmt: skip
    return A.Snapshot(step=step, threshold=0.97, layers=layers, weights=weights)


def diagnostics(
    deep: bool, seed: int = 0, layers: int = LAYERS, probe_layers: int = 1
) -> A.Diagnostics:
    """Synthetic records: snapshots of ``layers`` hidden layers when ``deep`` (else 1),
    probe-batch activations of ``probe_layers`` of them, no BatchNorm."""
    g = torch.Generator().manual_seed(seed)
    P, R = 4, 3
    acts = {
        "saturated": {"0.97": [0.0] * S}, "dead": [0] * S, "hpreact_mean": [0.0] * S,
        "hpreact_std": [1.0] * S, "hpreact": torch.zeros(S, P, H), "h": torch.zeros(S, P, H),
        "image": torch.zeros(S, P, H, dtype=torch.bool),
    }  # fmt: skip
    n = layers if deep else 1  # every variant has snapshots (diagnostics format 6)
    snaps = {"snapshot": snapshot(1000, g, 0.5, n), "final": snapshot(1999, g, 0.7, n)}
    names = list(snaps["final"].weights)
    return A.Diagnostics(
        seeds=SEEDS, diverged_at=[None] * S, probe_index=torch.arange(P), thresholds=[0.97],
        curve={"window": 1000, "step": torch.tensor([0, 1000]),
               "log10_loss": torch.full((2, S), 0.4, dtype=torch.float64)},
        init_loss={"step0": [3.29] * S, "uniform": math.log(V), "loss": [3.29] * S,
                   "logits_std": [0.1] * S, "logits_std_predicted": [0.1] * S,
                   "p_target_median": [0.03] * S, "p_max": [0.05] * S, "h_rms": [0.6] * S,
                   "output_weight": names[-1], "output_weight_std": [0.01] * S},
        layers=[{"activations": {"init": acts, "final": acts},
                 "dh": 1e-3 * torch.randn(S, P, H, generator=g)}] * probe_layers,
        weights={n: {"grad_mean": torch.zeros(S), "grad_std": torch.ones(S),
                     "grad_data_ratio": torch.ones(S),
                     "update_ratio": -3 + 0.1 * torch.randn(R, S, generator=g)} for n in names},
        update_steps=torch.tensor([0, 1000, 1999]), batchnorm=None,
        snapshots=snaps, n_params=N_PARAMS["deep_bn"] if deep else 11_897,
    )  # fmt: skip


def batchnorm_records(modules: int, seed: int = 0) -> A.BatchNorm:
    """Running and calibrated statistics of ``modules`` BatchNorm modules, and losses."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(modules):
        mean, std = torch.randn(S, H, generator=g), 1 + torch.rand(S, H, generator=g)
        layers[f"layers.{3 * i + 1}"] = A.BatchNormLayer(
            running_mean=mean, running_std=std,
            calibrated_mean=mean + 0.01, calibrated_std=std * 1.01,
        )  # fmt: skip
    losses = {k: [2.3 + 0.01 * i for i in range(S)] for k in ("train", "val", "test")}
    return A.BatchNorm(layers=layers, loss_running=losses, loss_calibrated=losses)


def with_batchnorm(inputs: rs.Inputs) -> rs.Inputs:
    """``inputs`` with BatchNorm records for every variant that has BatchNorm (one
    module per hidden layer with ``batchnorm``, one more with ``batchnorm_output``)."""
    for v in inputs.variants:
        c = inputs.params.variants[v]
        if c.has_batchnorm:
            modules = (c.layers if c.batchnorm else 0) + c.batchnorm_output
            inputs.diagnostics[v].batchnorm = batchnorm_records(modules)
    return inputs


def metrics(v: str) -> dict:
    val = VAL[v]
    per_seed = {k: [x + d for x in val] for k, d in (("train", -0.05), ("val", 0), ("test", 0))}
    per_seed.update(init_loss=[3.3] * S, val_unseen=val, test_unseen=val, diverged=[False] * S,
                    diverged_at=[None] * S)  # fmt: skip
    canonical = {k: per_seed[k][0] for k in ("init_loss", "train", "val", "test")}
    keys = ("init_loss", "train", "val", "test", "val_unseen", "test_unseen")
    return {"seeds": SEEDS, "n_diverged": 0, "per_seed": per_seed, "canonical": canonical,
            "mean": {k: statistics.fmean(per_seed[k]) for k in keys},
            "std": {k: statistics.stdev(per_seed[k]) for k in keys},
            "n_params": N_PARAMS[v]}  # fmt: skip


def make_params(raw: dict) -> Params:
    """Validated params from a (partial) mapping, as ``pipeline.params`` gives them."""
    return params_file.parse(copy.deepcopy(raw))


def with_train(inputs: rs.Inputs, v: str, train: dict) -> None:
    """Give variant ``v`` its own ``train`` overrides (Params is frozen: rebuilt)."""
    raw = params_yaml(inputs.params)
    raw["variants"][v]["train"] = train
    inputs.params = make_params(raw)


def params_yaml(params: Params) -> dict:
    """``params`` as a params.yaml mapping that ``pipeline.params.validate`` accepts:
    every key of the global sections spelled out, each variant with its given keys."""
    out = params.model_dump(mode="json", exclude={"variants"})
    out["variants"] = {
        name: v.model_dump(mode="json", exclude_unset=True) for name, v in params.variants.items()
    }
    return out


def make_inputs(variants: list[str] | None = None) -> rs.Inputs:
    """The synthetic run of ``variants`` (default: all of PARAMS), deep_bn with its
    BatchNorm records."""
    vs = variants or list(PARAMS["variants"])
    params = make_params({**PARAMS, "variants": {v: PARAMS["variants"][v] for v in vs}})
    return with_batchnorm(rs.Inputs(
        params=params, counts={"vocab_size": V}, variants=vs,
        metrics={v: metrics(v) for v in vs}, samples={},
        diagnostics={v: diagnostics(v.startswith("deep"), i) for i, v in enumerate(vs)},
        runs={},
    ))  # fmt: skip


def pm(values: list[float], spec: str) -> tuple[str, str]:
    return format(statistics.fmean(values), spec), format(statistics.stdev(values), spec)


# ---- figures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "draw",
    [rd.activation_lines, rd.gradient_lines, rd.weight_gradient_lines, rd.update_ratio_lines],
)
def test_every_deep_figure_draws_one_line_per_layer_or_weight(draw):
    fig, notes = draw(make_inputs(), "deep_bn")
    assert isinstance(fig, Figure) and notes == []
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
    if draw in (rd.activation_lines, rd.gradient_lines):
        # hidden layers numbered 1..L, not by module index (2, 5, 8, ...)
        assert labels[:LAYERS] == [f"layer {i + 1} (tanh)" for i in range(LAYERS)]
    elif draw is rd.weight_gradient_lines:
        assert labels[0].startswith("C (27x10), grad:data ")
        assert labels[1].startswith(f"W1 (30x{H})")
        assert labels[LAYERS + 1].startswith(f"W{LAYERS + 1} ({H}x{V})")
    else:
        assert "1e-3 guide" in labels and f"W{LAYERS + 1}" in labels
        (guide,) = [ln for ln in fig.axes[0].lines if ln.get_label() == "1e-3 guide"]
        assert guide.get_linestyle() == "--" and guide.get_ydata()[0] == -3


def test_degenerate_snapshots_give_not_drawn_notes():
    inputs = make_inputs()
    d = inputs.diagnostics["deep_tanh"]
    del d.snapshots["snapshot"]  # a run shorter than the lecture's step 1,000
    for x in d.snapshots["final"].layers:
        x.out_grad.zero_()  # an all-zero gradient: no distribution
    _, notes = rd.gradient_lines(inputs, "deep_tanh")
    texts = [n.text for n in notes]
    assert any("snapshot: not recorded" in t for t in texts)
    assert any("every gradient distribution is constant or not finite" in t for t in texts)
    inputs.metrics["deep_tanh"]["per_seed"]["diverged"] = [True] * S
    fig, notes = rd.update_ratio_lines(inputs, "deep_tanh")
    assert fig is None and "every seed diverged" in notes[0].text
    fig, notes = rd.activation_lines(inputs, "deep_tanh")
    assert any("every seed diverged" in n.text for n in notes)


# ---- tables ---------------------------------------------------------------------------------


def test_tables_hold_mean_and_sd_across_seeds():
    inputs = make_inputs()
    snap = inputs.diagnostics["deep_bn"].snapshots["final"]
    rows = [r for r in rd.activation_rows(inputs, "deep_bn") if r["when"].startswith("final")]
    assert len(rows) == LAYERS and rows[0]["layer"] == "layer 1 (tanh)"
    x = snap.layers[3]
    outs = [x.out[s].std().item() for s in range(S)]  # recomputed from the tensors
    mean, sd = pm(outs, ".2f")
    assert rows[3]["std"] == f"{mean} ± {sd} (n = 3)"
    sat = [100 * (x.out[s].abs() > 0.97).float().mean().item() for s in range(S)]
    mean, sd = pm(sat, ".2f")
    assert rows[3]["saturated when"] == "|out| > 0.97"
    assert rows[3]["% saturated"] == f"{mean} ± {sd} % (n = 3)"
    grows = rd.gradient_rows(inputs, "deep_bn")
    gs = [x.out_grad[s].std().item() for s in range(S)]
    assert grows[LAYERS + 3]["grad std"].startswith(f"{statistics.fmean(gs):.3e} ± ")
    wrows = [r for r in rd.weight_rows(inputs, "deep_bn") if r["weight"] == f"W{LAYERS + 1}"]
    w = snap.weights[f"layers.{3 * LAYERS}.weight"]
    ratio = [w.grad[s].std().item() / w.data_std[s] for s in range(S)]
    assert wrows[1]["shape"] == f"{H} x {V}"
    assert wrows[1]["grad:data"] == (
        f"{statistics.fmean(ratio):.3e} ± {statistics.stdev(ratio):.2e} (n = 3)"
    )


def test_parameter_counts_of_every_variant():
    rows = rv.param_rows(make_inputs())
    assert [r["parameters"] for r in rows] == ["11,897", "11,897", "47,024", "46,497"]
    assert [r["hidden layers"] for r in rows] == [1, 1, LAYERS, LAYERS]
    assert [r["units"] for r in rows] == [200, 200, H, H]  # model.n_hidden, or the variant's
    assert [r["BatchNorm"] for r in rows] == ["no", "no", "hidden + output (var)", "no"]
    assert [r["init"] for r in rows] == ["first_half"] * 2 + ["second_half"] * 2


# ---- the verdict at depth --------------------------------------------------------------------


def test_variants_are_compared_when_they_differ_in_one_knob_at_most():
    inputs = make_inputs()
    # naive and kaiming differ in their init only; deep_bn and deep_tanh in BatchNorm;
    # a one-layer and a deep variant differ in depth and width: never compared. Each
    # pair is listed higher loss first (deep_tanh's val loss is the higher one)
    assert [(c.a, c.b) for c in rs.comparisons(inputs)] == [
        ("naive", "kaiming"),
        ("deep_tanh", "deep_bn"),
    ]
    assert rs.compared_knob(inputs, "naive", "kaiming") == "init / training"
    # the lecture's two deep nets also differ in their init (gain 1 vs 5/3): said so
    assert rs.compared_knob(inputs, "deep_bn", "deep_tanh") == "BatchNorm, init"
    assert [(c.a, c.b) for c in rv.depth_comparisons(inputs)] == [("deep_tanh", "deep_bn")]
    # the summary ranks the variants comparable with the first: deep_bn never its "runner-up"
    assert "deep" not in rs.summary_paragraph(inputs)
    rows = rv.paired_rows(rs.comparisons(inputs), inputs)
    assert [r["differs in"] for r in rows] == ["init / training", "BatchNorm, init"]


def test_a_knob_compared_alone_across_depth_width_and_nonlinearity():
    """The comparable pairs come from VariantConfig: a variant that differs from
    deep_tanh in one knob (depth, width or nonlinearity) is compared with it, one that
    differs in two is not."""
    raw = copy.deepcopy(PARAMS)
    raw["variants"] = {
        "deep_tanh": PARAMS["variants"]["deep_tanh"],
        "shallow": {**PARAMS["variants"]["deep_tanh"], "layers": 2},
        "wide": {**PARAMS["variants"]["deep_tanh"], "n_hidden": 2 * H},
        "relu": {**PARAMS["variants"]["deep_tanh"], "nonlinearity": "relu"},
    }
    inputs = make_inputs(["deep_tanh"])
    inputs.params = make_params(raw)
    inputs.variants = list(raw["variants"])
    for v in inputs.variants:
        inputs.metrics[v] = metrics("deep_tanh")
    pairs = {(c.a, c.b): rs.compared_knob(inputs, c.a, c.b) for c in rs.comparisons(inputs)}
    assert pairs == {("deep_tanh", "shallow"): "depth", ("deep_tanh", "wide"): "width",
                     ("deep_tanh", "relu"): "nonlinearity"}  # fmt: skip
    # a knob and an init setting at once (fresh-user trial: the first-half naive recipe
    # against a second-half net of another width) is labelled with both
    raw["variants"]["wide_gain"] = {**raw["variants"]["wide"], "gain": 1.0}
    inputs.params = make_params(raw)
    assert rs.compared_knob(inputs, "deep_tanh", "wide_gain") == "width, init"


def test_summary_sentence_answers_with_the_paired_interval():
    inputs = make_inputs()
    d = [t - b for t, b in zip(VAL["deep_tanh"], VAL["deep_bn"], strict=True)]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    half = 4.302652729749 * sd / math.sqrt(3)  # t(0.975, 2)
    text = rv.summary(inputs)
    assert (
        f"At depth (5 hidden tanh layers of {H} units), BatchNorm (**deep_bn**) beats no "
        f"BatchNorm (deep_tanh) by {mean:.4f} nats of val loss (deep_tanh - deep_bn = "
        f"{mean:+.4f}, paired 95% CI [{mean - half:+.4f}, {mean + half:+.4f}]) over 3 paired "
        "seeds, after 2,000 steps of batch 32, lr 0.1, then 0.01 from step 1,500." in text
    )
    assert (
        "The deep variants ran deep_bn, deep_tanh 2,000 steps (lr 0.1, then 0.01 from step "
        "1,500), 3 seeds" in text  # variants that trained alike: one group
    )
    assert (
        "`dvc exp run -S ++variants.deep_bn.train.max_steps=200000 "
        "-S ++variants.deep_bn.train.lr_decay_step=150000 "
        "-S ++variants.deep_tanh.train.max_steps=200000 "
        "-S ++variants.deep_tanh.train.lr_decay_step=150000`" in text
    )


def test_seeds_pair_by_value_and_variant_train_overrides_count():
    inputs = make_inputs()
    with_train(inputs, "deep_bn", {"max_steps": 200_000, "lr_decay_step": 150_000})
    m = inputs.metrics["deep_tanh"]
    m["seeds"], m["per_seed"]["val"] = [SEEDS[1], SEEDS[0]], VAL["deep_tanh"][1::-1]
    c = rv.paired_by_seed(inputs, "deep_tanh", "deep_bn")
    assert c.n == 2 and c.mean == pytest.approx(statistics.fmean([0.021, 0.019]))
    text = rv.deep_run_sentence(inputs)
    assert "deep_bn 200,000 steps" in text
    assert "`dvc exp run -S ++variants.deep_tanh.train.max_steps=200000" in text
    assert "variants.deep_bn.train" not in text  # already the full run


@pytest.mark.parametrize("vs", [["naive", "kaiming"], ["naive", "deep_bn"]])
def test_no_or_one_deep_variant_gives_no_verdict_and_no_error(vs):
    inputs = make_inputs(vs)
    assert rv.depth_comparisons(inputs) == []
    if "deep_bn" in vs:
        assert "no pair of deep variants" in rv.depth_sentence(inputs)
        assert rv.deep_variants(inputs) == ["deep_bn"]
    else:
        assert rv.depth_sentence(inputs) == rv.deep_run_sentence(inputs) == ""
        assert rv.summary(inputs) == rs.summary_paragraph(inputs)


# ---- the template, executed --------------------------------------------------------------


def write_eval_dir(root: Path, inputs: rs.Inputs) -> None:
    """params.yaml, counts.json and each variant's evaluate outputs, from ``inputs``."""
    text = yaml.safe_dump(params_yaml(inputs.params), sort_keys=False)
    (root / "params.yaml").write_text(text, encoding="utf-8")
    (root / "processed").mkdir()
    counts = {"names": 100, "vocab_size": V, "block_size": 3, "windows": {"train": 80},
              "words": {"train": 80, "val": 10, "test": 10},
              "duplicates": {"distinct_names": 90, "repeated_lines": 10,
                             "also_in_train": {"val": 1, "test": 1},
                             "unseen_windows": {"val": 9, "test": 9}}}  # fmt: skip
    (root / "processed" / "counts.json").write_text(json.dumps(counts), encoding="utf-8")
    for v in inputs.variants:
        out = root / "eval" / v
        out.mkdir(parents=True)
        torch.save(A.to_state(inputs.diagnostics[v]), out / "diagnostics.pt")
        m = {**inputs.metrics[v], **inputs.metrics[v]["canonical"]}
        (out / "metrics.json").write_text(json.dumps(m), encoding="utf-8")
        samples = {"samples": [["ann"] * 2] * S, "share_in_train": [0.5] * S}
        (out / "samples.json").write_text(json.dumps(samples), encoding="utf-8")


def test_template_executes_on_synthetic_deep_records(tmp_path):
    papermill = pytest.importorskip("papermill")
    inputs = make_inputs()
    write_eval_dir(tmp_path, inputs)
    root = ROOT
    nb = papermill.execute_notebook(
        str(root / "reporting" / "template.ipynb"), str(tmp_path / "out.ipynb"),
        parameters={"params_path": str(tmp_path / "params.yaml"),
                    "eval_dir": str(tmp_path / "eval"), "data_dir": str(tmp_path / "processed"),
                    "runs_dir": str(tmp_path / "runs"), "variants": inputs.variants},
        cwd=str(root), kernel_name="python3", progress_bar=False,
    )  # fmt: skip
    text = json.dumps(nb["cells"])
    assert "BatchNorm (**deep_bn**) beats no BatchNorm" in text
    assert text.count("image/png") >= 2 * 4  # four deep figures per deep variant
    assert "47,024" in text and "46,497" in text


# ---- the sweep report: gain sensitivity at depth (synthetic dvc.api answers) -----------------


def sweep_metrics(bn_gain: float, tanh_gain: float) -> dict:
    """metrics.json of one run: BatchNorm holds; without it the activations vanish at
    small gain (std shrinks layer by layer) and saturate at large gain."""

    def entry(val: float, first: float, last: float, sat: float) -> dict:
        depth = {"std_first": first, "std_last": last, "saturated_max": sat,
                 "grad_std_first": 1e-3, "grad_std_last": 1e-3}  # fmt: skip
        return {"val": val, "mean": {"val": val}, "std": {"val": 0.01}, "n_seeds": 2,
                "depth": {"snapshot": depth, "final": depth}}  # fmt: skip

    t = tanh_gain
    return {
        "kaiming": {"val": 2.10, "mean": {"val": 2.10}, "std": {"val": 0.01}},
        "deep_bn": entry(2.30 + 0.001 * bn_gain, 0.64, 0.65, 2.0),
        "deep_tanh": entry(2.30 + 0.05 * abs(t - 5 / 3), 0.6 * min(t, 1), 0.6 * min(t, 1) ** 5,
                           min(95.0, 3.0 * t**3)),
    }  # fmt: skip


def sweep_runs() -> list:
    from dvc.exceptions import DvcException

    from tools import sweep_report as sr

    def params(bn: object, tanh: object) -> dict:
        return {"data": PARAMS["data"], "train": {"seeds": [1, 2]}, "variants": {
            "kaiming": {"gain": None}, "deep_bn": {"layers": 5, "batchnorm": True, "gain": bn},
            "deep_tanh": {"layers": 5, "gain": tanh}}}  # fmt: skip

    rows = [{"Experiment": None, "rev": "workspace", "typ": "baseline", "State": None},
            {"Experiment": None, "rev": "main", "typ": "baseline", "State": None}]  # fmt: skip
    table = {"main": (params(1.0, None), sweep_metrics(1.0, 5 / 3))}
    runs = [*((f"bn-{g}", g, None) for g in (0.5, 1.5, 3.0)),
            *((f"tanh-{g}", 1.0, g) for g in (0.5, 1.0, 3.0)),
            ("grid", 3.0, 3.0), ("queued", 2.0, None)]  # fmt: skip
    for i, (name, bn, tanh) in enumerate(runs):
        rev = f"{i}" * 7
        state = "Queued" if name == "queued" else "Success"
        rows.append({"Experiment": name, "rev": rev, "typ": "branch_commit", "State": state})
        table[rev] = (params(bn, tanh), sweep_metrics(bn, 5 / 3 if tanh is None else tanh))

    def lookup(i: int):
        def get(rev: str) -> dict:
            if rev not in table:
                raise DvcException(f"unknown Git revision '{rev}'")
            return table[rev][i]

        return get

    return sr.collect(rows, lookup(0), lookup(1))


def test_null_gains_read_as_calculate_gain():
    from tools.sweep_report import flat_params

    config = make_params({"data": PARAMS["data"], "variants": {
        "a": {"gain": None}, "b": {"gain": None, "nonlinearity": "relu"}, "c": {"gain": 2.0},
    }})  # fmt: skip
    flat = flat_params(config)
    assert flat["variants.a.gain"] == 5 / 3 and flat["variants.b.gain"] == math.sqrt(2)
    assert flat["variants.c.gain"] == 2.0
    assert "train.lr" not in flat  # the keys the file gives, typed (not every default)


def test_sweep_leaves_out_runs_whose_params_no_longer_validate():
    """An experiment of an older schema (here the one-layer keys w1_init, w2_scale that
    VariantConfig no longer has) is listed as left out with the reason, not a crash."""
    from tools import sweep_report as sr

    old = {"data": PARAMS["data"], "variants": {"kaiming": {"w1_init": "kaiming"}}}
    good = {"data": PARAMS["data"], "variants": {"kaiming": {"gain": 1.0}}}
    rows = [
        {"Experiment": None, "rev": "main", "typ": "baseline", "State": None},
        {"Experiment": "old", "rev": "o" * 7, "typ": "branch_commit", "State": "Success"},
    ]
    table = {"main": good, "o" * 7: old}
    metrics = {"kaiming": {"val": 2.1, "mean": {"val": 2.1}, "std": {"val": 0.01}}}
    runs = sr.collect(rows, table.__getitem__, lambda rev: metrics)  # fmt: skip
    assert runs[1].left_out.startswith("params do not validate against the current schema: ")
    assert "variants.kaiming.w1_init" in runs[1].left_out and runs[1].metrics == {}
    assert sr.not_plotted(runs) == "1 left out, params of an older schema (old)"
    page = sr.render(runs)
    assert "(left out)" in page and "variants.kaiming.w1_init" in page
    assert sr.loss_table(runs)["experiment"].tolist() == ["main"]


def test_gain_table_keeps_runs_that_change_only_that_variants_gain():
    from tools.sweep_depth import gain_table, swept

    table = gain_table(sweep_runs())
    bn = table[table.variant == "deep_bn"]
    tanh = table[table.variant == "deep_tanh"]
    # the queued run is left out; the grid run repeats a point (deduplicated)
    assert bn["gain"].tolist() == [0.5, 1.0, 1.5, 3.0]
    assert tanh["gain"].tolist() == pytest.approx([0.5, 1.0, 5 / 3, 3.0])
    assert tanh.loc[tanh.baseline, "gain"].tolist() == pytest.approx([5 / 3])
    assert tanh["std_last"].tolist() == pytest.approx([0.6 * 0.5**5, 0.6, 0.6, 0.6])
    assert tanh["saturated_max"].iloc[-1] == pytest.approx(81.0)
    assert bn["std_last"].tolist() == [0.65] * 4
    assert swept(table) == ["deep_bn", "deep_tanh"]


def test_sweep_page_draws_gain_sensitivity_at_depth():
    from tools import sweep_report as sr

    page = sr.render(sweep_runs())
    assert "<h2>Gain sensitivity at depth</h2>" in page
    assert "<h2>variants.deep_bn.gain</h2>" in page and "<h2>variants.deep_tanh.gain</h2>" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert "<b>Not plotted: 1 queued.</b>" in page
    # without any deep variant's gain swept: no section
    one = [r for r in sweep_runs() if r.baseline or r.name.startswith("bn-")]
    for r in one:
        r.metrics.pop("deep_bn")
    assert "Gain sensitivity at depth" not in sr.render(one)


def test_sweep_page_keeps_short_gain_runs_on_a_curve_of_their_own():
    """Issue 16: gain runs shortened as the README advises (train keys of the variant
    changed too) stay in the gain section as their own curve, apart from the baseline's
    length and seeds; a run that also changes the architecture is named, not dropped;
    the variant every experiment adds is said once, not in every row."""
    from tools import sweep_report as sr

    short = {"max_steps": 1500, "seeds": [2147483647]}

    def params(tanh: float | None, train: dict | None, width: int | None = None) -> dict:
        deep = {"layers": 5, "gain": tanh, **({"train": train} if train else {})}
        if width:
            deep["n_hidden"] = width
        return {"data": PARAMS["data"], "train": {"seeds": [1, 2]}, "variants": {
            "kaiming": {"gain": None}, "deep_tanh": deep,
            "relu5": {"layers": 5, "nonlinearity": "relu"}}}  # fmt: skip

    base = params(None, None)
    del base["variants"]["relu5"]  # the learner's variant: every experiment adds it
    rows = [{"Experiment": None, "rev": "main", "typ": "baseline", "State": None}]
    table = {"main": (base, sweep_metrics(1.0, 5 / 3))}
    runs = [(f"short-{g}", params(g, short)) for g in (0.5, 1.0, 3.0)]
    runs.append(("wide", params(3.0, short, width=64)))
    for i, (name, p) in enumerate(runs):
        rev = f"{i}" * 7
        rows.append({"Experiment": name, "rev": rev, "typ": "branch_commit", "State": "Success"})
        table[rev] = (p, sweep_metrics(1.0, p["variants"]["deep_tanh"]["gain"]))
    out = sr.collect(rows, lambda r: table[r][0], lambda r: table[r][1])
    page = sr.render(out)
    assert "<h2>Gain sensitivity at depth</h2>" in page
    assert "1,500 steps × 1 seed" in page  # the short curve, labelled by its training
    assert "wide for deep_tanh: it changes variants.deep_tanh.n_hidden besides the gain" in page
    experiments = page.split("<h2>Experiments</h2>")[1]
    assert experiments.count("+variants.relu5=") == 1  # said once above the table
    # the baseline's kaiming (1 layer) and deep_tanh (5) differ in depth only
    arch = sr.architecture_frame(out)
    depth = arch[(arch.experiment == "main") & (arch.varies == "depth")]
    assert depth[["value", "variant"]].values.tolist() == [["1", "kaiming"], ["5", "deep_tanh"]]
    assert "<h2>By architecture</h2>" in page


def test_no_verdict_when_the_deep_variants_trained_differently():
    """A user shortens one deep variant only (e.g. the lecture's 1,001-step run of
    deep_bn): the two are not comparable, and the summary must say so, not pair them."""
    inputs = make_inputs()
    with_train(inputs, "deep_bn", {"max_steps": 1001})
    text = rv.depth_sentence(inputs)
    assert "no verdict: deep_bn and deep_tanh trained differently" in text
    assert "deep_bn: 1,001 steps" in text and "deep_tanh: 2,000 steps" in text
    assert "beats" not in text
    # the paired table keeps the pair but says so
    assert (
        rs.compared_knob(inputs, "deep_bn", "deep_tanh")
        == "BatchNorm, init (and trained differently)"
    )


# ---- params.yaml in every number spelling the stages accept ----------------------------------

# YAML 1.2 (core schema, as DVC and pipeline.params read it) spellings of the numbers of
# PARAMS, each a key of its own; integral floats are accepted where an int is expected
# (``dvc exp run -S train.max_steps=2e3`` writes 2000.0). A YAML 1.1 reader (PyYAML)
# reads 1e-1 and .5e-0 as strings, 042 as 34 and 0o7 as a string: the report must not.
SPELLED = """\
data:
  url: https://example.invalid/names.txt
  sha256: "{sha}"
split:
  seed: 042
  train_frac: .8
  val_frac: +0.10
  block_size: +3
model:
  n_embd: 0xA
  n_hidden: 2e2
train:
  seeds: [2147483647, 0o1, 2.0]
  max_steps: 2e3
  batch_size: 32.0
  lr: 1e-1
  lr_decay_step: 1.5e+3
  lr_decayed: 1.0e-2
  device: cpu
  record_every: 1000.
  kernels: exact
evaluate:
  probe_seed: 0o7
  probe_size: 0x20
  sample_seed: 2147483657
  n_samples: 2e1
  n_novelty: 1E3
  curve_window: 1_000
  saturation: [.97, 9.9e-1]
variants:
  naive: {{init: first_half, weight_scale: 1.}}
  kaiming: {{init: first_half, gain: null}}
  deep_bn: {{layers: 5, n_hidden: 8, gain: 1.0e0, batchnorm: true, batchnorm_output: true,
            momentum: 1e-1, eps: .1e-4}}
  deep_tanh: {{layers: 5., n_hidden: 0o10, gain: 1.6666666666666667}}
report:
  reference:
    kaiming: {{init_loss: 3.3179, train: 2.0377, val: 2.107e0, test: null, tol: 1e-4}}
"""


@pytest.fixture(scope="module")
def spelled_report(tmp_path_factory) -> tuple[Params, dict, str]:
    """The report stage run on the synthetic records with SPELLED as params.yaml: the
    params as the stages read them, the metrics it returns and the HTML page."""
    from pipeline.stages import report

    tmp_path = tmp_path_factory.mktemp("spelled")
    inputs = make_inputs()
    write_eval_dir(tmp_path, inputs)
    spelled = tmp_path / "spelled.yaml"
    # the atlas section (read by the atlas stages only) as the defaults, spelled plainly
    atlas = yaml.safe_dump({"atlas": params_yaml(inputs.params)["atlas"]}, sort_keys=False)
    spelled.write_text(SPELLED.format(sha="0" * 64) + atlas, encoding="utf-8")
    p = params_file.validate(spelled)  # every stage accepts it
    out = tmp_path / "out"
    summary = report.report(
        spelled, tmp_path / "eval", tmp_path / "processed", out / "metrics.json",
        out / "report.ipynb", out / "report.html", list(p.variants), None,
    )  # fmt: skip
    return p, summary, (out / "report.html").read_text(encoding="utf-8")


def test_report_renders_params_in_every_yaml_number_spelling(spelled_report):
    """A params.yaml that every stage accepts (pipeline.params.validate) must not break
    the report: the report stage renders it, and shows the numbers the stages read."""
    p, summary, page = spelled_report
    assert (p.split.seed, p.model.n_embd, p.train.lr, p.train.max_steps) == (42, 10, 0.1, 2000)
    assert p.train.seeds == SEEDS and p.evaluate.probe_seed == 7
    assert p.variants["deep_tanh"].layers == LAYERS and p.variants["deep_tanh"].n_hidden == H
    assert list(summary) == list(p.variants)
    assert "Seeds per variant:</strong> 3 (the first, 2147483647" in page
    assert "2,000 steps of batch 32, lr 0.1, then 0.01 from step 1,500" in page
    assert "BatchNorm (<strong>deep_bn</strong>) beats no BatchNorm" in page


def test_rendered_report_has_contents_atlas_link_and_one_wording(spelled_report):
    """The page the report stage writes: a table of contents whose every link resolves,
    listing the sections this run renders (BatchNorm's: deep_bn has it) and the depth
    atlas; the atlas linked beside the report; layers never named by module index;
    'canonical' always 'canonical seed'; the paired table in the verdicts' direction."""
    from support import contents_problems

    _, _, page = spelled_report
    assert contents_problems(page) == []
    nav = re.search(r'<nav class="report-contents".*?</nav>', page, re.S).group(0)
    for section in (
        "This run",
        "Paired comparisons of the validation loss",
        "BatchNorm: running statistics vs calibrated ones",
        "Layer by layer during training",
        "The depth atlas",
        "Parameters used",
    ):
        assert f">{section}</a>" in nav, section  # fmt: skip
    assert ">deep_bn</a>" not in nav  # the per-variant h4 headings stay out
    assert '<a href="atlas.html">atlas.html</a>' in page and "dvc repro atlas_report" in page
    body = re.sub(r"<pre.*?</pre>|<style.*?</style>|<img [^>]*>", " ", page, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", body))
    # module names only as the gradient table's parameter names (layers.i.weight)
    assert re.findall(r"layers\.\d+\b(?!\.weight)", text) == []
    assert re.findall(r"\blayer 0\b|seed #|\bseed 0\b", text) == []
    assert re.findall(r"(?i)canonical(?! seed)", text) == []
    assert "deep_bn (canonical seed)" in text  # the samples' column
    # the paired table: higher loss first, as the sentences state the difference
    pairs = re.findall(r"<tr>\s*<td>(deep_\w+)</td>\s*<td>(deep_\w+)</td>", page)
    assert pairs == [("deep_tanh", "deep_bn")]
    assert "deep_tanh - deep_bn = +0.0" in text


# ---- saturation per nonlinearity ----------------------------------------------------------


def nonlinear_inputs(kind: str) -> rs.Inputs:
    """kaiming as a one-layer ``kind`` network, its probe activations summarised by
    charlm.diagnostics.activation_summary as the evaluate stage does."""
    from charlm.diagnostics import activation_summary

    raw = copy.deepcopy(PARAMS)
    raw["variants"] = {"kaiming": {**PARAMS["variants"]["kaiming"], "nonlinearity": kind}}
    if kind == "gelu":
        raw["variants"]["kaiming"]["gain"] = 1.0
    inputs = make_inputs(["kaiming"])
    inputs.params = make_params(raw)
    g = torch.Generator().manual_seed(3)
    layer = inputs.diagnostics["kaiming"].layers[0]
    for when in ("init", "final"):
        pre = 3 * torch.randn(S, 4, H, generator=g)
        h = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
             "linear": lambda x: x, "gelu": torch.nn.functional.gelu}[kind](pre)  # fmt: skip
        summary = activation_summary(h, pre, (0.97,), kind)
        layer.activations[when] = A.Activations(hpreact=pre, h=h, **summary)
    return inputs


@pytest.mark.parametrize("kind", ["tanh", "sigmoid", "relu", "linear", "gelu"])
def test_saturation_follows_the_nonlinearity(kind):
    from reporting import figures as rf
    from reporting import tables as rt

    inputs = nonlinear_inputs(kind)
    (row, _) = rt.activation_rows(inputs)
    rule = {"tanh": "|h| > t", "sigmoid": "|2h − 1| > t", "relu": "h = 0"}.get(kind)
    assert row["saturated when"] == (rule or f"no saturation for {kind}")
    if kind == "relu":
        assert "share zero (relu)" in row and not any(k.startswith("share sat") for k in row)
    elif rule is None:  # nothing counted: no 0 % shown, no dead units
        assert not any(k.startswith("share") or k.startswith("dead") for k in row)
    text = rs.dead_units_sentence(inputs)
    assert (f"no saturation for {kind}" in text) == (rule is None)
    assert ("never fire" in text) == (kind == "relu")
    fig, notes = rf.activation_figure(inputs, "kaiming")
    assert notes == []
    hists = [ax for ax in fig.axes if ax.get_xlabel().startswith("h (")]
    assert len(fig.axes) == (2 if rule is None else 4) and len(hists) == 2
    h = inputs.diagnostics["kaiming"].layers[0].activations["init"].h[0]
    for ax in fig.axes:  # every panel's axes are labelled
        assert ax.get_xlabel() and ax.get_ylabel()
    lo, hi = hists[0].get_xlim()  # the range follows the data, not [-1, 1]
    assert lo <= h.min().item() and hi >= h.max().item()
    if kind in ("relu", "linear", "gelu"):
        assert hi > 1.5
    images = [ax for ax in fig.axes if ax not in hists]
    if kind == "relu":
        assert (
            images[0].get_title().startswith("h = 0 at init")
            and "never fire" in images[0].get_title()
        )
    if rule is None:
        assert f"no saturation for {kind}" in fig._suptitle.get_text()


def test_summary_counts_seeds_per_variant_as_they_ran():
    """Fresh-user trial: with one variant on 1 seed and the others on 3, the summary said
    'Over 3 seeds per variant'; it gives the range instead."""
    inputs = make_inputs(["naive", "kaiming"])
    m = inputs.metrics["naive"]
    m["seeds"] = m["seeds"][:1]
    m["per_seed"] = {k: v[:1] for k, v in m["per_seed"].items()}
    assert "Over 1 to 3 seeds per variant" in rs.summary_paragraph(inputs)
    assert "Over 3 seeds per variant" in rs.summary_paragraph(make_inputs(["naive", "kaiming"]))


# ---- one report, one way: differences, layer numbers, seeds, axes (the audit) ------


def swapped_deep(inputs: rs.Inputs) -> rs.Inputs:
    """``inputs`` with deep_bn and deep_tanh's losses swapped: BatchNorm loses."""
    m = inputs.metrics
    m["deep_bn"], m["deep_tanh"] = m["deep_tanh"], m["deep_bn"]
    return inputs


NUM = r"([+-]?\d+\.\d{4})"
DIFF = "mean difference (first - second)"  # the paired table's column


@pytest.mark.parametrize("batchnorm_wins", [True, False])
def test_every_sentence_states_its_difference_as_the_paired_table_does(batchnorm_wins):
    """'B beats A by d' stands beside 'A - B = +d', and the paired table has the row
    first A, second B with mean +d and the same interval: every sentence of the report
    that states a paired difference (summary, depth verdict, the verdicts under the
    table) does it in the table's direction, higher loss minus lower loss."""
    from reporting import intervals as ri

    inputs = make_inputs() if batchnorm_wins else swapped_deep(make_inputs())
    comps = rs.comparisons(inputs)
    rows = {(r["first"], r["second"]): r for r in rv.paired_rows(comps, inputs)}

    def table_says(a: str, b: str, d: str, lo: str, hi: str) -> None:
        assert (a, b) in rows, f"the table has no row {a} - {b}: {list(rows)}"
        r = rows[(a, b)]
        assert f"{r[DIFF]:+.4f}" == d, (a, b, d)
        assert (f"{r['95% CI low']:+.4f}", f"{r['95% CI high']:+.4f}") == (lo, hi)

    assert all(r[DIFF] > 0 for r in rows.values())
    for c in comps:  # the verdicts under the table
        text = ri.verdict(c, rs.spread(inputs, c.a), rs.spread(inputs, c.b))
        m = re.search(rf"(\w+) beats (\w+) by (\d+\.\d{{4}}) nats \(95% CI of (\w+) - (\w+): "
                      rf"\[{NUM}, {NUM}\]", text)  # fmt: skip
        assert m, text
        better, worse, gap, a, b, lo, hi = m.groups()
        assert (a, b) == (worse, better), text  # 'B beats A by d': A - B
        table_says(a, b, f"+{gap}", lo, hi)
    depth = rv.depth_sentence(inputs)
    m = re.search(rf"(beats|loses to) no BatchNorm \(deep_tanh\) by (\d+\.\d{{4}}) nats of "
                  rf"val loss \((\w+) - (\w+) = {NUM}, paired 95% CI \[{NUM}, {NUM}\]\)",
                  depth)  # fmt: skip
    assert m, depth
    verb, gap, a, b, d, lo, hi = m.groups()
    assert verb == ("beats" if batchnorm_wins else "loses to")
    # 'BatchNorm beats no BatchNorm by d': without - with = +d (and the other way round)
    assert (a, b) == (("deep_tanh", "deep_bn") if batchnorm_wins else ("deep_bn", "deep_tanh"))
    assert d == f"+{gap}"
    table_says(a, b, d, lo, hi)
    summary = rs.summary_paragraph(inputs)
    m = re.search(rf"The runner-up, (\w+), is \d+\.\d{{4}} nats behind; paired by seed, "
                  rf"(\w+) - (\w+) = {NUM} \(95% CI \[{NUM}, {NUM}\]", summary)  # fmt: skip
    assert m, summary
    runner, a, b, d, lo, hi = m.groups()
    assert a == runner and d.startswith("+")
    table_says(a, b, d, lo, hi)
    assert len(comps) == 2


def figure_texts(fig) -> list[str]:
    """Every text drawn in ``fig``: titles, axis labels, legends, colour bars, notes."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def deep12_inputs() -> rs.Inputs:
    """A 12-layer BatchNorm tanh variant (past PER_LAYER_MAX and LEGEND_MAX) beside the
    defaults, its canonical seed diverged (figures then show seed index 1)."""
    raw = copy.deepcopy(PARAMS)
    raw["variants"]["deep12"] = {**DEEP, "layers": 12, "batchnorm": True}
    inputs = make_inputs()
    inputs.params = make_params(raw)
    inputs.variants.append("deep12")
    inputs.metrics["deep12"] = metrics("deep_bn")
    inputs.metrics["deep12"]["per_seed"]["diverged"] = [True, False, False]
    inputs.diagnostics["deep12"] = diagnostics(True, 5, layers=12, probe_layers=12)
    return with_batchnorm(inputs)


def every_figure(inputs: rs.Inputs):
    """(name, figure) for every figure the report draws of ``inputs``."""
    from reporting import figures as rf

    yield "loss_curves", rf.loss_curves(inputs)[0]
    yield "seed_points", rf.seed_points(inputs)[0]
    yield "knob_figure", rf.knob_figure(inputs)[0]
    yield "gradient_hist", rf.gradient_hist(inputs)[0]
    yield "update_ratio_figure", rf.update_ratio_figure(inputs)[0]
    for v in inputs.variants:
        if rf.per_layer(inputs, v):
            for layer in range(len(inputs.diagnostics[v].layers)):
                yield f"activation_figure {v} {layer}", rf.activation_figure(inputs, v, layer)[0]
        else:
            yield f"activation_depth_figure {v}", rf.activation_depth_figure(inputs, v)[0]
        if inputs.diagnostics[v].batchnorm is not None:
            yield f"batchnorm_figure {v}", rf.batchnorm_figure(inputs, v)[0]
        for draw in (rd.activation_lines, rd.gradient_lines, rd.weight_gradient_lines,
                     rd.update_ratio_lines):  # fmt: skip
            yield f"{draw.__name__} {v}", draw(inputs, v)[0]


@pytest.fixture(scope="module")
def figures_of_every_kind():
    """(inputs, [(variant or '', name, figure)]) of ``every_figure`` for the synthetic
    run plus a 12-layer BatchNorm variant (``deep12_inputs``); closed afterwards."""
    import matplotlib.pyplot as plt

    from reporting import figures as rf

    rf.setup()
    inputs = deep12_inputs()
    with plt.rc_context({"figure.max_open_warning": 0}):  # they are closed below
        out = [(name.split(" ")[1] if " " in name else "", name, fig)
               for name, fig in every_figure(inputs) if fig is not None]  # fmt: skip
    yield inputs, out
    for *_, fig in out:
        plt.close(fig)


def test_every_histogram_and_panel_labels_both_axes(figures_of_every_kind):
    """Every visible panel (colour bars aside) of every figure has an x and a y label:
    histograms say what they count and that the y axis is a density."""
    _, figures = figures_of_every_kind
    problems, hists = [], 0
    for _, name, fig in figures:
        for ax in fig.axes:
            if not ax.axison or ax.get_label() == "<colorbar>":
                continue
            if not (ax.get_xlabel() and ax.get_ylabel()):
                problems.append(f"{name} / {ax.get_title()!r}: x {ax.get_xlabel()!r}, "
                                f"y {ax.get_ylabel()!r}")  # fmt: skip
            hists += ax.get_ylabel() == "density"
    assert not problems, "\n".join(problems)
    assert hists >= 10  # the histograms were among them


def test_hidden_layers_are_numbered_1_to_L_in_every_figure(figures_of_every_kind):
    """No module index (layers.2, layers.5, ...) and no layer number outside 1..L in any
    title, label, legend or colour bar; colour bars count hidden layers from 1 and weight
    matrices as named (0: C, k: Wk, up to the output's W(L+1))."""
    from reporting.figures import WEIGHT_INDEX

    inputs, figures = figures_of_every_kind
    for v, name, fig in figures:
        texts = figure_texts(fig)
        assert not [t for t in texts if re.search(r"layers\.\d", t)], (name, texts)
        L = len(inputs.diagnostics[v].snapshots["final"].layers) if v else 12
        for t in texts:
            for n in re.findall(r"\blayer (\d+)\b", t):
                assert 1 <= int(n) <= L, (name, t)
    labels = {}
    for *_, fig in figures:
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>" and ax.get_ylabel():
                labels.setdefault(ax.get_ylabel(), set()).add(ax.get_ylim())
    assert labels["hidden layer"] == {(1.0, 12.0)}  # deep12's 12 layers
    assert labels[WEIGHT_INDEX] == {(0.0, 13.0)}  # C, W1..W12, W13 (output)
    bn = [t for v, name, fig in figures if name.startswith("batchnorm_figure deep_bn")
          for t in figure_texts(fig) if "BatchNorm" in t]  # fmt: skip
    modules = [f"BatchNorm of hidden layer {i}" for i in range(1, LAYERS + 1)]
    for words in [*modules, "BatchNorm of the output layer"]:
        assert any(words in t for t in bn), (words, bn)


def test_figures_and_tables_name_the_canonical_seed(figures_of_every_kind):
    """Seed index 0 is 'canonical seed' wherever it is shown (never 'seed #0' or 'seed
    0'), 'canonical' never stands alone, and another seed is named by its value."""
    from reporting import figures as rf

    inputs, figures = figures_of_every_kind
    texts = [t for *_, fig in figures for t in figure_texts(fig)]
    texts += [k for r in rf.gradient_rows(inputs) for k in r]
    bad = [t for t in texts if re.search(r"seed #|\bseed 0\b|canonical(?! seed)", t)]
    assert not bad, bad
    assert sum("canonical seed" in t for t in texts) >= 10
    # deep12's canonical seed diverged: its after-training panels show its second seed
    deep12 = [t for v, _, fig in figures if v == "deep12" for t in figure_texts(fig)]
    assert any(f"seed {SEEDS[1]}" in t for t in deep12), deep12
    assert rs.seed_name(inputs, "deep12", 0) == "canonical seed"
    assert rs.seed_name(inputs, "deep12", 2) == f"seed {SEEDS[2]}"


def execute_template(inputs: rs.Inputs, tmp_path: Path, monkeypatch) -> list:
    """Run the template's cells on ``inputs`` (written as an evaluate directory) in this
    process, ``display`` collecting what the page would show (no kernel, no HTML)."""
    import IPython.display
    import matplotlib.pyplot as plt

    write_eval_dir(tmp_path, inputs)
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, *a, **k: shown.append(obj))
    nb = json.loads((ROOT / "reporting" / "template.ipynb").read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    ns = {"__name__": "report"}
    exec("".join(code[0]["source"]), ns)
    ns.update(params_path=str(tmp_path / "params.yaml"), eval_dir=str(tmp_path / "eval"),
              data_dir=str(tmp_path / "processed"), runs_dir=None,
              variants=inputs.variants)  # fmt: skip
    for cell in code[1:]:
        exec("".join(cell["source"]), ns)
    plt.close("all")
    return shown


@pytest.mark.parametrize("vs", [None, ["naive", "kaiming"]])
def test_batchnorm_section_renders_only_with_a_batchnorm_variant(vs, tmp_path, monkeypatch):
    """The BatchNorm section (and so its entry in the table of contents, which follows
    the page's headings) appears exactly when some variant has BatchNorm."""
    from IPython.display import Markdown

    inputs = make_inputs(vs)
    shown = execute_template(inputs, tmp_path, monkeypatch)
    headings = [line for obj in shown if isinstance(obj, Markdown)
                for line in obj.data.splitlines() if line.startswith("## ")]  # fmt: skip
    has_bn = any(inputs.diagnostics[v].batchnorm is not None for v in inputs.variants)
    assert has_bn == (vs is None)
    assert headings == (["## BatchNorm: running statistics vs calibrated ones"] if has_bn else [])
