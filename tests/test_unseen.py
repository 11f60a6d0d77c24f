"""Repeated names: the split counts them, and evaluate adds the loss on unseen names.

names.txt repeats some names, and the lecture's split cuts shuffled lines, so part of
val and test also occurs in train. The split stage counts this (counts.json
'duplicates') and writes the windows of the val/test names absent from train; the
evaluate stage reports the loss on those (val_unseen, test_unseen) without changing any
other number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from charlm.config import EvaluateConfig, ModelConfig, TrainConfig, VariantConfig
from charlm.evaluate import split_loss
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import split as split_stage
from pipeline.stages import train as train_stage


@pytest.fixture(scope="module")
def lecture_split(names_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unseen") / "processed"
    split_stage.split(names_path, out, seed=42, train_frac=0.8, val_frac=0.1, block_size=3)
    return out


def test_repeated_names_are_counted_exactly(lecture_split: Path):
    counts = json.loads((lecture_split / "counts.json").read_text(encoding="utf-8"))
    assert counts["names"] == 32_033 and counts["words"] == {
        "train": 25_626,
        "val": 3_203,
        "test": 3_204,
    }
    d = counts["duplicates"]
    assert d["distinct_names"] == 29_494
    assert d["repeated_lines"] == 2_539
    assert d["also_in_train"] == {"val": 424, "test": 377}
    assert d["unseen"] == {"val": 3_203 - 424, "test": 3_204 - 377}
    for k in ("val", "test"):
        windows = torch.load(lecture_split / f"{k}_unseen.pt")
        assert d["unseen_windows"][k] == windows["X"].shape[0] == windows["Y"].shape[0]
    # the lecture's windows are untouched
    assert counts["windows"] == {"train": 182_625, "val": 22_655, "test": 22_866}


def hand_windows(words: list[str], stoi: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's build_dataset, written out again (block size 3)."""
    X, Y = [], []
    for w in words:
        context = [0, 0, 0]
        for ch in w + ".":
            X.append(context)
            Y.append(stoi[ch])
            context = [*context[1:], stoi[ch]]
    return torch.tensor(X), torch.tensor(Y)


def test_unseen_loss_is_the_loss_on_hand_filtered_windows(lecture_split: Path, tmp_path: Path):
    train_cfg = TrainConfig(
        seeds=[2147483647, 5], max_steps=200, lr_decay_step=100, record_every=50
    )
    # params.yaml's batchnorm variant: the first half's 'std' form, momentum 0.001
    variant = VariantConfig(
        init="first_half", batchnorm=True, batchnorm_form="std", momentum=0.001,
        out_weight_scale=0.01, out_bias_scale=0.0,
    )  # fmt: skip
    models = tmp_path / "model"
    train_stage.train("batchnorm", lecture_split, models, ModelConfig(), train_cfg, variant)
    cfg = EvaluateConfig(n_samples=1, n_novelty=0, curve_window=50)
    metrics = evaluate_stage.evaluate(
        lecture_split, models, tmp_path / "eval", cfg, tmp_path / "c.csv"
    )
    # evaluate writes the DVC-plot curve: a header and one row per 50-step window
    rows = (tmp_path / "c.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,log10_loss"
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "50", "100", "150"]

    words = json.loads((lecture_split / "words.json").read_text(encoding="utf-8"))
    chars = json.loads((lecture_split / "vocab.json").read_text(encoding="utf-8"))["chars"]
    stoi = {ch: i + 1 for i, ch in enumerate(chars)} | {".": 0}
    model = evaluate_stage.load_model(torch.load(models / "model.pt")).eval()
    seen = set(words["train"])
    for k in ("val", "test"):
        X, Y = hand_windows([w for w in words[k] if w not in seen], stoi)
        with torch.no_grad():
            logits, _ = model(X.expand(2, -1, -1))  # (S, N, V)
        expected = [F.cross_entropy(logits[s].double(), Y).item() for s in range(2)]
        assert metrics["per_seed"][f"{k}_unseen"] == pytest.approx(expected, rel=1e-6)
        assert metrics["canonical"][f"{k}_unseen"] == metrics["per_seed"][f"{k}_unseen"][0]
        # the existing split losses are those of the whole split, as before
        full = torch.load(lecture_split / f"{k}.pt")
        assert metrics["per_seed"][k] == split_loss(model, full["X"], full["Y"]).tolist()
    assert list(metrics["canonical"])[:4] == ["train", "val", "test", "init_loss"]
    assert set(metrics["mean"]) == set(metrics["std"]) == set(metrics["canonical"])
