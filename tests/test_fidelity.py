"""Fidelity: the default pipeline on the real names reproduces DESIGN.md's numbers.

The reference values are read from params.yaml (``report.reference``, what the report
shows) and cross-checked against the constants below, copied from DESIGN.md, so that
editing params.yaml cannot make this test pass.
The full run takes minutes (3 variants x 8 seeds x 200,000 steps; the deep ones, which
have no published numbers at their default length, run short: ``SHORT_DEEP``); it is part
of the default ``make test`` run. It then runs the
lecture's deep BatchNorm network for its 1,001 steps on the canonical seed, as an
experiment (issue 10's acceptance command, ``DEEP_EXPERIMENT``), and checks the figures
the lecture prints against DESIGN.md's table ("The deep network").
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from support import make_repo, run, strict_json

from charlm import artefacts

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")

# DESIGN.md, "Reference numbers (CPU, torch 2.13.0, default parameters, seed 2147483647)".
# None: no published value. tol applies to train/val/test; init_loss is always 1e-4.
DESIGN_REFERENCE = {
    "naive": {"init_loss": 27.8817, "train": 2.1245, "val": 2.1682, "test": None, "tol": 0.005},
    "kaiming": {"init_loss": 3.3179, "train": 2.0377, "val": 2.1070, "test": None, "tol": 1e-4},
    "batchnorm": {"init_loss": 3.3239, "train": 2.0674, "val": 2.1057, "test": 2.1070,
                  "tol": 1e-4},
}  # fmt: skip
INIT_LOSS_TOL = 1e-4
# the training run the reference numbers come from (DESIGN.md, "SGD" and "randomness")
DEFAULT_TRAIN = {"max_steps": 200_000, "batch_size": 32, "lr": 0.1, "lr_decay_step": 100_000,
                 "lr_decayed": 0.01}  # fmt: skip
CANONICAL_SEED = 2147483647

# DESIGN.md, "The deep network": the lecture's printed output after 1,001 steps of deep_bn.
DEEP_EXPERIMENT = ["-S", "++variants.deep_bn.train.max_steps=1001",
                   "-S", f"++variants.deep_bn.train.seeds=[{CANONICAL_SEED}]"]  # fmt: skip
DEEP_REFERENCE = {
    "n_params": 47_024,
    "init_loss": 3.2870,
    "train": 2.4003,
    "val": 2.3982,
    "tanh_std": [0.63, 0.64, 0.65, 0.65, 0.65],  # printed to 2 decimals
    "saturated_pct": [2.78, 2.56, 2.25, 1.69, 1.88],  # printed to 2 decimals
    "grad_std": [2.640702e-03, 2.245584e-03, 2.045742e-03, 1.983134e-03, 1.952382e-03],
    "grad_data": [8.012630e-03, 4.881091e-02, 6.964619e-02, 6.073741e-02, 5.631483e-02,
                  5.570125e-02, 1.160106e-01],
}  # fmt: skip
DEEP_LOSS_TOL = 1e-4  # absolute, nats
DEEP_REL = 1e-4  # relative, on the gradient stds and grad:data ratios


def check_defaults(params_path: Path) -> None:
    """The run is the default one: canonical seed first, the lecture's schedule."""
    train = yaml.safe_load(params_path.read_text(encoding="utf-8"))["train"]
    assert train["seeds"][0] == CANONICAL_SEED
    assert {k: train[k] for k in DEFAULT_TRAIN} == DEFAULT_TRAIN


def reference_from_params(params_path: Path) -> dict:
    """report.reference of ``params_path``, checked against DESIGN_REFERENCE."""
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    reference = params["report"]["reference"]
    assert set(reference) == set(DESIGN_REFERENCE)
    for variant, expected in DESIGN_REFERENCE.items():
        got = {k: reference[variant].get(k) for k in expected}
        assert got == expected, f"{params_path}: report.reference.{variant} != DESIGN.md"
    return reference


def check_metrics(metrics: dict, reference: dict) -> list[str]:
    """Every way ``metrics`` misses ``reference``, as readable lines (empty: match)."""
    misses = []
    for variant, ref in reference.items():
        got = metrics[variant]
        for k in (*SPLITS, "init_loss"):
            value = got.get(k)
            if not (isinstance(value, float) and math.isfinite(value)):
                misses.append(f"{variant}.{k} = {value!r} is not a finite number")
                continue
            tol = INIT_LOSS_TOL if k == "init_loss" else ref["tol"]
            if ref[k] is not None and abs(value - ref[k]) > tol:
                misses.append(
                    f"{variant}.{k} = {value:.6f}, reference {ref[k]} (|diff| "
                    f"{abs(value - ref[k]):.6f} > {tol})"
                )
    return misses


def check_deep(metrics: dict, d: artefacts.Diagnostics) -> list[str]:
    """Every way deep_bn's reports/metrics.json entry and diagnostics.pt snapshot miss
    ``DEEP_REFERENCE`` (empty: match). Seed 0 of the 'snapshot' record (step 1,000)."""
    ref, misses = DEEP_REFERENCE, []
    for k in ("init_loss", "train", "val"):
        v = metrics.get(k)
        if not isinstance(v, float) or abs(v - ref[k]) > DEEP_LOSS_TOL:
            misses.append(f"deep_bn.{k} = {v!r}, reference {ref[k]} (tol {DEEP_LOSS_TOL})")
    if metrics.get("n_params") != ref["n_params"] or d.n_params != ref["n_params"]:
        misses.append(f"n_params = {metrics.get('n_params')}/{d.n_params}, not 47,024")
    snap = (d.snapshots or {}).get("snapshot")
    if snap is None or snap.step != 1000:
        return [*misses, "no snapshot of step 1,000 in diagnostics.pt"]
    got = {
        "tanh_std": [round(la.std[0], 2) for la in snap.layers],
        "saturated_pct": [round(la.saturated[0] * 100, 2) for la in snap.layers],
        "grad_std": [la.grad_std[0] for la in snap.layers],
        "grad_data": [w.grad_data_ratio[0] for w in snap.weights.values()],
    }
    for k in ("tanh_std", "saturated_pct"):
        if got[k] != ref[k]:
            misses.append(f"{k} = {got[k]}, reference {ref[k]}")
    for k in ("grad_std", "grad_data"):
        if len(got[k]) != len(ref[k]) or any(
            not abs(a - b) <= DEEP_REL * abs(b) for a, b in zip(got[k], ref[k], strict=False)
        ):
            misses.append(f"{k} = {got[k]}, reference {ref[k]} (rel {DEEP_REL})")
    return misses


def test_params_reference_matches_design():
    """Cheap guard (no pipeline run): the numbers the report shows are DESIGN.md's."""
    reference_from_params(ROOT / "params.yaml")


def test_check_metrics_can_fail():
    """The comparison itself: exact reference passes; a miss beyond tol is reported."""
    reference = DESIGN_REFERENCE
    exact = {v: {k: (r[k] if r[k] is not None else 2.2) for k in (*SPLITS, "init_loss")}
             for v, r in reference.items()}  # fmt: skip
    assert check_metrics(exact, reference) == []
    off = json.loads(json.dumps(exact))
    off["kaiming"]["val"] += 2e-4  # beyond 1e-4
    off["naive"]["train"] += 0.004  # within the naive band
    off["naive"]["init_loss"] += 0.001  # init_loss is always held to 1e-4
    off["batchnorm"]["test"] = None  # missing
    misses = check_metrics(off, reference)
    assert [m.split(" ")[0] for m in misses] == [
        "naive.init_loss", "kaiming.val", "batchnorm.test"
    ]  # fmt: skip


# The deep variants' default length (8 seeds x 20,000 steps) has no published numbers;
# here they run short (about 1.5 minutes less) and the experiment below gives deep_bn the
# lecture's 1,001 steps. The one-layer variants run their full defaults.
SHORT_DEEP = {"variants": {v: {"train": {"seeds": [CANONICAL_SEED, 1], "max_steps": 1500}}
                           for v in ("deep_bn", "deep_tanh")}}  # fmt: skip


@pytest.mark.fidelity
@pytest.mark.slow
def test_default_pipeline_reproduces_reference_numbers(tmp_path, repo_env):
    root = make_repo(tmp_path / "repo", SHORT_DEEP)  # the one-layer variants' defaults
    check_defaults(root / "params.yaml")
    reference = reference_from_params(root / "params.yaml")

    run(["dvc", "repro"], cwd=root, env=repo_env, timeout=3 * 3600)

    metrics = strict_json(root / "reports" / "metrics.json")
    misses = check_metrics(metrics, reference)
    assert not misses, "metrics.json differs from DESIGN.md:\n  " + "\n  ".join(misses)
    # the report says so in its opening paragraph
    html = (root / "reports" / "report.html").read_text(encoding="utf-8")
    assert "The canonical seed matches 10 of 10 published numbers" in html
    assert "Outside the tolerance" not in html

    # the lecture's deep run: 1,001 steps of deep_bn, canonical seed, as an experiment
    run("git add dvc.lock reports && git commit -qm baseline", cwd=root, env=repo_env)
    proc = run(["dvc", "exp", "run", *DEEP_EXPERIMENT], cwd=root, env=repo_env, timeout=3600)
    ran = set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))
    assert ran == {"train@deep_bn", "evaluate@deep_bn", "report"}
    metrics = strict_json(root / "reports" / "metrics.json")
    state = torch.load(root / "data/eval/deep_bn/diagnostics.pt", weights_only=True)
    misses = check_deep(metrics["deep_bn"], artefacts.from_state(state))
    assert not misses, "deep_bn differs from DESIGN.md:\n  " + "\n  ".join(misses)


def test_check_deep_can_fail():
    """The deep comparison on made-up records: the reference passes; misses are named."""
    ref = DEEP_REFERENCE
    layers = [
        {"name": f"layers.{i}", "kind": "tanh", "out": torch.zeros(1, 1, 1),
         "out_grad": torch.zeros(1, 1, 1), "mean": [0.0], "std": [s], "saturated": [p / 100],
         "grad_mean": [0.0], "grad_std": [g]}
        for i, s, p, g in zip([2, 5, 8, 11, 14], ref["tanh_std"], ref["saturated_pct"],
                              ref["grad_std"], strict=True)
    ]  # fmt: skip
    weights = {
        f"w{i}": {"grad": torch.zeros(1, 1, 1), "grad_mean": [0.0], "grad_std": [r],
                  "data_std": [1.0], "grad_data_ratio": [r]}
        for i, r in enumerate(ref["grad_data"])
    }  # fmt: skip
    snap = artefacts.Snapshot(step=1000, threshold=0.97, layers=layers, weights=weights)
    d = artefacts.Diagnostics.model_construct(snapshots={"snapshot": snap}, n_params=47_024)
    metrics = {k: ref[k] for k in ("init_loss", "train", "val", "n_params")}
    assert check_deep(metrics, d) == []
    snap.layers[1].grad_std[0] *= 1 + 2e-4  # beyond rel 1e-4
    snap.layers[0].std[0] = 0.6251  # prints 0.63 -> 0.63 still; 0.6249 would not
    metrics["val"] += 2e-4
    misses = check_deep(metrics, d)
    assert [m.split(" ")[0] for m in misses] == ["deep_bn.val", "grad_std"]
    snap.layers[0].std[0] = 0.6249
    assert any(m.startswith("tanh_std") for m in check_deep(metrics, d))
