"""Train one variant over all seeds at once.

Reads params model, train and variants.<variant>, and the split in ``--data``; writes
to ``--out`` (a directory): model.pt (final and initial state with the config and
vocabulary they were built from), history.pt (per-step loss (steps, S), update:data
ratios), train.json (divergence) and snapshots.pt ('snapshot' and 'final', see
``capture_steps``: each the captured step's 'step' and ``engine.TrainResult.captures``).
The training run is the global ``train`` section with the variant's ``train`` overrides
(``VariantConfig.train_config``).
Run: python -m pipeline.stages.train --variant kaiming --data data/processed \
    --out data/models/kaiming --record data/runs/train@kaiming.json
The run record (``--record``) holds the wall time, device, worker threads, microseconds
per model-step, revision and versions: nothing in ``--out`` varies from run to run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from charlm import engine
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from charlm.cpus import available_cpus
from charlm.init import build_mlp
from pipeline import outputs, params, records

# The lecture's snapshot (makemore part 3: the statistics printed after 1,001 steps are
# those of step 1,000's forward and backward pass).
SNAPSHOT_STEP = 1000


def capture_steps(max_steps: int) -> dict[str, int]:
    """Label -> 0-based step captured: 'snapshot' (``SNAPSHOT_STEP``,
    when the run is that long) and 'final' (the last step)."""
    steps = {"snapshot": SNAPSHOT_STEP, "final": max_steps - 1}
    return {k: v for k, v in steps.items() if v < max_steps}


def diverged_steps(
    result: engine.TrainResult, model: torch.nn.Module, max_steps: int
) -> list[int | None]:
    """Per seed, the first step with a non-finite loss; ``max_steps`` when only the
    last update made a parameter non-finite (no loss saw it); else None."""
    out = list(result.diverged_at)
    for p in model.parameters():
        finite = torch.isfinite(p.detach().reshape(p.shape[0], -1)).all(1).tolist()  # (S,)
        for s, ok in enumerate(finite):
            if not ok and out[s] is None:
                out[s] = max_steps
    return out


def train(
    variant: str,
    data: Path,
    out: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    variant_cfg: VariantConfig,
) -> tuple[dict, dict]:
    """Do the work; returns the summary written to train.json, and the timing of the
    training loop (device, worker threads, seconds, microseconds per model-step) for the
    run record. ``train_cfg`` is the global section; the run uses it merged with the
    variant's overrides, and the checkpoint records the merged one."""
    train_cfg = variant_cfg.train_config(train_cfg)
    steps = capture_steps(train_cfg.max_steps)
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))
    counts = json.loads((data / "counts.json").read_text(encoding="utf-8"))
    split = torch.load(data / "train.pt")
    device = engine.resolve_device(train_cfg.device)
    generators = [torch.Generator().manual_seed(s) for s in train_cfg.seeds]
    model = build_mlp(
        model_cfg, variant_cfg, counts["vocab_size"], counts["block_size"], generators
    )
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    bar = tqdm(
        total=train_cfg.max_steps,
        desc=f"train@{variant}",
        unit="step",
        unit_scale=True,
        mininterval=2.0,
    )

    def progress(done: int, loss: torch.Tensor) -> None:
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{float(loss[0]):.4f}", refresh=False)

    # the outputs are bitwise the same whatever the worker count (tests/test_engine_batch.py)
    workers = available_cpus() if device.type == "cpu" else 1
    result = engine.train(
        model,
        split["X"],
        split["Y"],
        generators,
        train_cfg,
        variant_cfg.lr_scale,
        progress,
        workers=workers,
        capture_steps=tuple(sorted(set(steps.values()))),
    )
    bar.close()
    summary = {
        "variant": variant,
        "seeds": train_cfg.seeds,
        "device": str(device),
        "diverged_at": diverged_steps(result, model, train_cfg.max_steps),
    }
    checkpoint = {
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "init_state_dict": init_state,
        "model": model_cfg.model_dump(),
        "variant": variant_cfg.model_dump(exclude_unset=True),
        "train": train_cfg.model_dump(),
        "vocab": vocab["chars"],
        "block_size": counts["block_size"],
        "seeds": train_cfg.seeds,
    }
    history = {
        "loss": result.loss,
        "record_steps": result.record_steps,
        "update_ratio": result.update_ratio,
    }
    with outputs.atomic_path(out) as tmp:
        tmp.mkdir()
        torch.save(checkpoint, tmp / "model.pt")
        torch.save(history, tmp / "history.pt")
        snapshots = {k: {"step": i, **result.captures[i]} for k, i in steps.items()}
        torch.save(snapshots, tmp / "snapshots.pt")
        (tmp / "train.json").write_text(outputs.dumps_json(summary), encoding="utf-8")
    timing = {
        "device": str(device),
        "workers": workers,
        "train_loop_seconds": round(result.seconds, 3),
        "us_per_model_step": round(result.seconds / train_cfg.max_steps / len(generators) * 1e6, 3),
    }
    return summary, timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    records.add_record_argument(parser)
    args = parser.parse_args()
    keys = params.stage_keys("train", args.variant)
    p = params.load(args.params, keys)
    _, timing = train(args.variant, args.data, args.out, p["model"], p["train"], p[keys[2]])
    records.write_record(args.record, **timing)
    print(
        f"wrote {args.out}: training loop {timing['train_loop_seconds']:.1f} s "
        f"({timing['us_per_model_step']:.1f} us per model-step on {timing['device']})"
    )


if __name__ == "__main__":
    outputs.run(main)
