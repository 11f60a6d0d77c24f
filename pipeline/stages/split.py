"""Build the vocabulary, the shuffled train/val/test split and the context windows.

Reads the names file and params split.*; writes to ``--out`` (a directory):
{train,val,test}.pt (X int64 (N, block_size), Y int64 (N,)), {val,test}_unseen.pt (the
windows of the val/test names that never occur in train, same layout), vocab.json,
words.json, counts.json (sizes, and under 'duplicates' the repeated names).
With ``--record``, also the stage's run record (wall time, revision, versions).
Run: python -m pipeline.stages.split --names data/raw/names.txt --out data/processed \
    --record data/runs/split.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from charlm.data import Vocabulary, build_windows, parse_names, shuffle_split
from pipeline import outputs, params, records

SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")  # each also gets <name>_unseen.pt: its names absent from train


def duplicates(words: list[str], parts: dict[str, list[str]]) -> dict:
    """How repeated names (lines) of the file spread over the split.

    The lecture's split cuts the shuffled lines, so a name listed twice can land in
    train and in val: the val/test losses then partly measure memorised names.
    Returns 'distinct_names', 'repeated_lines' (lines minus distinct names), and per
    held-out split the number of its names (lines) that 'also_in_train' and of those
    left ('unseen'), whose windows <split>_unseen.pt holds ('unseen_windows', added by
    ``split``).
    """
    in_train = set(parts["train"])
    return {
        "distinct_names": len(set(words)),
        "repeated_lines": len(words) - len(set(words)),
        "also_in_train": {k: sum(w in in_train for w in parts[k]) for k in HELD_OUT},
        "unseen": {k: sum(w not in in_train for w in parts[k]) for k in HELD_OUT},
    }


def save_windows(path: Path, words: list[str], vocab: Vocabulary, block_size: int) -> int:
    """Write the context windows of ``words`` to ``path`` ({'X', 'Y'}); returns their count."""
    X, Y = build_windows(words, vocab, block_size)
    torch.save({"X": X, "Y": Y}, path)
    return X.shape[0]


def split(
    names: Path, out: Path, seed: int, train_frac: float, val_frac: float, block_size: int
) -> dict:
    """Do the work; returns the counts written to counts.json."""
    words = parse_names(names.read_bytes(), source=str(names))
    vocab = Vocabulary.from_words(words)
    parts = dict(zip(SPLITS, shuffle_split(words, seed, train_frac, val_frac), strict=True))
    for name, part in parts.items():
        if not part:
            raise ValueError(
                f"{names}: the {name} split is empty ({len(words)} names with "
                f"train_frac={train_frac}, val_frac={val_frac}); use more names"
            )
    counts = {
        "names": len(words),
        "vocab_size": vocab.size,
        "block_size": block_size,
        "words": {k: len(v) for k, v in parts.items()},
        "windows": {},
        "first_shuffled": parts["train"][:5],
        "duplicates": duplicates(words, parts),
    }
    in_train = set(parts["train"])
    unseen = {k: [w for w in parts[k] if w not in in_train] for k in HELD_OUT}
    with outputs.atomic_path(out) as tmp:
        tmp.mkdir()
        for name, part in parts.items():
            counts["windows"][name] = save_windows(tmp / f"{name}.pt", part, vocab, block_size)
        counts["duplicates"]["unseen_windows"] = {
            name: save_windows(tmp / f"{name}_unseen.pt", part, vocab, block_size)
            for name, part in unseen.items()
        }
        vocab_json = json.dumps({"chars": list(vocab.chars)}, ensure_ascii=False)
        (tmp / "vocab.json").write_text(vocab_json + "\n", encoding="utf-8")
        (tmp / "words.json").write_text(
            json.dumps(parts, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "counts.json").write_text(outputs.dumps_json(counts), encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--names", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    records.add_record_argument(parser)
    args = parser.parse_args()
    cfg = params.load(args.params, params.stage_keys("split"))["split"]
    counts = split(args.names, args.out, **cfg.model_dump())
    records.write_record(args.record)
    print(f"wrote {args.out}: {counts['names']} names, windows {counts['windows']}")


if __name__ == "__main__":
    outputs.run(main)
