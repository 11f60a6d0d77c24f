"""Evaluate one trained variant: split losses, step-0 loss, diagnostics and samples.

Reads params evaluate.*, ``--data`` (the split) and ``--model`` (train's directory);
writes to ``--out`` (a directory): metrics.json (per-seed and summary split losses,
val_unseen/test_unseen: the windows of val/test names absent from train),
diagnostics.pt (``charlm.artefacts.Diagnostics``: activations, gradients, BatchNorm
statistics, the snapshots of the captured training steps read from
``--model``/snapshots.pt) and samples.json; and ``--curve``, the canonical seed's loss
curve CSV (a DVC plot, windows of ``evaluate.curve_window`` steps as in the report).
metrics.json also holds ``n_params`` (per
model) and ``depth``: per snapshot the seed means of the first and last hidden layer's
output std, the largest saturated share (%) and the gradient stds.
Run: python -m pipeline.stages.evaluate --data data/processed --model data/models/kaiming \
    --out data/eval/kaiming --curve reports/curves/kaiming.csv \
    --record data/runs/evaluate@kaiming.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from charlm import artefacts
from charlm import diagnostics as diag
from charlm.config import EvaluateConfig, ModelConfig, VariantConfig
from charlm.data import Vocabulary
from charlm.evaluate import sample, split_loss
from charlm.model import MLP, new_model
from pipeline import outputs, params, records

SPLITS = ("train", "val", "test")
# windows of the val/test names that never occur in train (written by the split stage)
UNSEEN = ("val_unseen", "test_unseen")


def load_model(checkpoint: dict, which: str = "state_dict") -> MLP:
    """Rebuild the trained (or, with ``which='init_state_dict'``, initial) models."""
    model_cfg = ModelConfig(**checkpoint["model"])
    variant = VariantConfig.model_validate(checkpoint["variant"], strict=False)
    model = new_model(
        model_cfg,
        variant,
        len(checkpoint["vocab"]) + 1,
        checkpoint["block_size"],
        len(checkpoint["seeds"]),
    )
    model.load_state_dict(checkpoint[which])
    return model


def curve_rows(loss: torch.Tensor, window: int) -> list[str]:
    """CSV rows step,log10_loss of seed 0 (``diagnostics.loss_curve`` over ``window``).

    A window holding a non-finite loss (the seed diverged) has no row: the curve stops.
    """
    steps, means = diag.loss_curve(loss[:, :1], window)
    return [
        f"{s},{v:.6f}"
        for s, v in zip(steps.tolist(), means[:, 0].tolist(), strict=True)
        if math.isfinite(v)
    ]


def summarise(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std over the finite values (None when there are too few)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else None
    std = statistics.stdev(finite) if len(finite) >= 2 else None
    return mean, std


def depth_summary(snapshots: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """metrics.json's ``depth``: per snapshot label, means over the seeds with finite
    values of 'std_first' and 'std_last' (output std of the first and last hidden
    layer), 'saturated_max' (largest saturated share over the layers, %),
    'grad_std_first' and 'grad_std_last' (std of the gradient at those outputs)."""
    out = {}
    for label, snap in snapshots.items():
        first, last = snap["layers"][0], snap["layers"][-1]
        per_layer = [la["saturated"] for la in snap["layers"]]
        saturated = [max(v) * 100 for v in zip(*per_layer, strict=True)]  # S values, %
        out[label] = {
            "std_first": summarise(first["std"])[0],
            "std_last": summarise(last["std"])[0],
            "saturated_max": summarise(saturated)[0],
            "grad_std_first": summarise(first["grad_std"])[0],
            "grad_std_last": summarise(last["grad_std"])[0],
        }
    return out


def batchnorm_records(model: MLP, splits: dict, losses: dict) -> dict | None:
    """``artefacts.BatchNorm`` fields: running statistics per BatchNorm module, the
    calibrated ones (the lecture's calibration, every BatchNorm in layer order) and
    the split losses with them; None without BatchNorm."""
    modules = diag.batchnorm_layers(model)
    if not modules:
        return None
    calibrated = diag.calibrate_batchnorm(model, splits["train"]["X"])
    recal = diag.with_batchnorm_stats(model, calibrated)
    loss_calibrated = {
        k: split_loss(recal, splits[k]["X"], splits[k]["Y"]).tolist() for k in SPLITS
    }
    return {
        "layers": {
            name: {
                "running_mean": bn.running_mean.clone(),
                "running_std": diag.running_std(bn),
                "calibrated_mean": calibrated[name]["mean"],
                "calibrated_std": calibrated[name]["std"],
            }
            for name, bn in modules.items()
        },
        "loss_running": losses,
        "loss_calibrated": loss_calibrated,
    }


def diagnose(
    model: MLP,
    init: MLP,
    history: dict,
    probe: tuple[torch.Tensor, torch.Tensor],
    splits: dict,
    losses: dict[str, list[float]],
    cfg: EvaluateConfig,
    captures: dict[str, dict] | None = None,
) -> dict:
    """Everything the report draws, computed here so the notebook only reads.

    Returns the fields of ``charlm.artefacts.Diagnostics`` but the run's identity
    (seeds, divergence, probe rows): the windowed log10 training loss, the step-0 loss
    and the logits behind it, per hidden layer the activations at 'init' (the step-0
    forward pass, training mode) and 'final' (eval mode) on the probe batch and the
    gradient at its output at init, per weight matrix (named by the model) its gradient
    at init and its update ratio over training, for a BatchNorm model the running vs
    calibrated statistics with the split ``losses`` (eval mode, running statistics)
    beside those recomputed with the calibrated ones (``batchnorm_records``), the
    ``captures`` of train's snapshots.pt as ``snapshots``
    (``diag.snapshot``, saturation at ``cfg.saturation[0]``, the lecture's 0.97), and
    the parameter count per model.
    """
    probe_x, probe_y = probe
    steps, log10_loss = diag.loss_curve(history["loss"], cfg.curve_window)
    grads = diag.gradients(init, probe_x, probe_y)
    moments = {}
    for when, m in (("init", init), ("final", model)):
        moments[when] = [
            {
                **a,
                **diag.activation_summary(
                    a["h"], a["hpreact"], tuple(cfg.saturation), model.nonlinearity
                ),
            }
            for a in diag.activations(m, probe_x, train_mode=(when == "init"))
        ]
    out: dict = {
        "thresholds": list(cfg.saturation),
        "curve": {
            "window": min(cfg.curve_window, history["loss"].shape[0]),
            "step": steps,
            "log10_loss": log10_loss,
        },
        "init_loss": {
            "step0": history["loss"][0].double().tolist(),
            "uniform": math.log(model.vocab_size),
            **diag.initial_logits(init, probe_x, probe_y),
        },
        "layers": [
            {"activations": {when: moments[when][i] for when in moments}, "dh": dh}
            for i, dh in enumerate(grads["dh"])
        ],
        "weights": {
            name: {**g, "update_ratio": history["update_ratio"].get(name)}
            for name, g in grads["weights"].items()
        },
        "update_steps": history["record_steps"],
        "batchnorm": batchnorm_records(model, splits, losses),
        "n_params": diag.n_params(model),
        "snapshots": None,
    }
    if captures is not None:
        threshold = cfg.saturation[0]
        out["snapshots"] = {
            label: diag.snapshot(model, c, threshold) for label, c in captures.items()
        }
    return out


def evaluate(data: Path, model_dir: Path, out: Path, cfg: EvaluateConfig, curve: Path) -> dict:
    """Do the work; returns the metrics written to metrics.json. ``curve``: the DVC-plot
    CSV of the canonical seed's loss, averaged as the report's (``cfg.curve_window``)."""
    checkpoint = torch.load(model_dir / "model.pt")
    history = torch.load(model_dir / "history.pt")
    captures = torch.load(model_dir / "snapshots.pt")
    summary = json.loads((model_dir / "train.json").read_text(encoding="utf-8"))
    splits = {k: torch.load(data / f"{k}.pt") for k in (*SPLITS, *UNSEEN)}
    words = json.loads((data / "words.json").read_text(encoding="utf-8"))
    vocab = Vocabulary(tuple(checkpoint["vocab"]))
    model, init = load_model(checkpoint), load_model(checkpoint, "init_state_dict")
    S, seeds = model.n_models, checkpoint["seeds"]
    diverged_at = summary["diverged_at"]

    losses = {k: split_loss(model, splits[k]["X"], splits[k]["Y"]).tolist() for k in SPLITS}
    # A seed diverged when its training loss became non-finite (diverged_at: the step) or
    # when a split loss of the trained model is not finite (overflow; diverged_at None).
    diverged = [
        d is not None or not all(math.isfinite(losses[k][s]) for k in SPLITS)
        for s, d in enumerate(diverged_at)
    ]
    unseen = {k: split_loss(model, splits[k]["X"], splits[k]["Y"]).tolist() for k in UNSEEN}
    per_seed: dict[str, list[float | None]] = {}
    for k, ls in {**losses, **unseen}.items():  # a diverged seed has none (null in the JSON)
        per_seed[k] = [None if bad else v for v, bad in zip(ls, diverged, strict=True)]
    per_seed["init_loss"] = history["loss"][0].double().tolist()

    # one fixed probe batch from the training split, drawn by its own generator
    g = torch.Generator().manual_seed(cfg.probe_seed)
    pick = torch.randint(0, splits["train"]["X"].shape[0], (cfg.probe_size,), generator=g)
    probe = (
        splits["train"]["X"][pick].expand(S, -1, -1),  # (S, P, T)
        splits["train"]["Y"][pick].expand(S, -1),
    )  # (S, P)
    diagnostics = artefacts.Diagnostics(
        seeds=seeds,
        diverged_at=diverged_at,
        probe_index=pick,
        **diagnose(model, init, history, probe, splits, losses, cfg, captures),
    )

    g = torch.Generator().manual_seed(cfg.sample_seed)
    shown = sample(model, vocab, cfg.n_samples, g)
    novelty = sample(model, vocab, cfg.n_novelty, g) if cfg.n_novelty else [[] for _ in range(S)]
    train_words = set(words["train"])
    in_train = [sum(w in train_words for w in ws) / len(ws) if ws else None for ws in novelty]

    reported = ("train", "val", "test", "init_loss", *UNSEEN)
    metrics = {
        "seeds": seeds,
        "canonical": {k: per_seed[k][0] for k in reported},
        "mean": {},
        "std": {},
        "per_seed": {
            **per_seed,
            "diverged_at": diverged_at,
            "diverged": diverged,
        },
        "n_diverged": sum(diverged),
        "share_samples_in_train": in_train,
        "device": summary["device"],
        "n_params": diagnostics.n_params,
    }
    metrics["depth"] = depth_summary(artefacts.to_state(diagnostics)["snapshots"])
    for k in reported:
        metrics["mean"][k], metrics["std"][k] = summarise(per_seed[k])
    rows = curve_rows(history["loss"], cfg.curve_window)
    with outputs.atomic_path(out) as tmp, outputs.atomic_path(curve) as curve_tmp:
        tmp.mkdir()
        curve_tmp.write_text("step,log10_loss\n" + "\n".join(rows) + "\n", encoding="utf-8")
        (tmp / "metrics.json").write_text(outputs.dumps_json(metrics), encoding="utf-8")
        (tmp / "samples.json").write_text(
            outputs.dumps_json({"seeds": seeds, "samples": shown, "share_in_train": in_train}),
            encoding="utf-8",
        )
        torch.save(artefacts.to_state(diagnostics), tmp / "diagnostics.pt")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--curve", type=Path, required=True)
    records.add_record_argument(parser)
    args = parser.parse_args()
    cfg = params.load(args.params, params.stage_keys("evaluate"))["evaluate"]
    m = evaluate(args.data, args.model, args.out, cfg, args.curve)
    records.write_record(args.record)
    c = {k: "diverged" if v is None else f"{v:.4f}" for k, v in m["canonical"].items()}
    print(
        f"wrote {args.out}: canonical seed train {c['train']} val {c['val']} "
        f"test {c['test']} (step 0: {c['init_loss']}); {m['n_diverged']} seed(s) diverged"
    )


if __name__ == "__main__":
    outputs.run(main)
