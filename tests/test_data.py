"""charlm.data: vocabulary, shuffled split and context windows.

Small inputs are checked against tensors written out by hand; the real names file
against the facts of DESIGN.md ("The recipe the reference numbers come from").
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from charlm.data import Vocabulary, build_windows, parse_names, shuffle_split

# ---------------------------------------------------------------- vocabulary


def test_vocabulary_sorted_with_boundary_at_zero():
    vocab = Vocabulary.from_words(["emma", "ava", "mia"])
    assert vocab.chars == ("a", "e", "i", "m", "v")
    assert vocab.size == 6
    assert vocab.stoi == {".": 0, "a": 1, "e": 2, "i": 3, "m": 4, "v": 5}
    assert vocab.itos == {0: ".", 1: "a", 2: "e", 3: "i", 4: "m", 5: "v"}
    assert vocab.encode("emma") == [2, 4, 4, 1]
    assert vocab.decode([2, 4, 4, 1, 0]) == "emma."


def test_vocabulary_rejects_boundary_inside_a_word():
    with pytest.raises(ValueError, match="boundary"):
        Vocabulary.from_words(["ann.a"])


def test_vocabulary_encode_unknown_character_raises():
    with pytest.raises(KeyError):
        Vocabulary.from_words(["ab"]).encode("abc")


# ------------------------------------------------------------------- windows


def test_build_windows_one_word_block_3():
    vocab = Vocabulary.from_words(["emma"])  # . a e m -> 0 1 2 3
    X, Y = build_windows(["emma"], vocab, block_size=3)
    # ... -> e, ..e -> m, .em -> m, emm -> a, mma -> .
    expected_X = torch.tensor(
        [[0, 0, 0], [0, 0, 2], [0, 2, 3], [2, 3, 3], [3, 3, 1]], dtype=torch.int64
    )
    expected_Y = torch.tensor([2, 3, 3, 1, 0], dtype=torch.int64)
    assert torch.equal(X, expected_X)
    assert torch.equal(Y, expected_Y)


def test_build_windows_context_resets_between_words_block_2():
    vocab = Vocabulary.from_words(["ab", "b"])  # . a b -> 0 1 2
    X, Y = build_windows(["ab", "b"], vocab, block_size=2)
    expected_X = torch.tensor([[0, 0], [0, 1], [1, 2], [0, 0], [0, 2]], dtype=torch.int64)
    expected_Y = torch.tensor([1, 2, 0, 2, 0], dtype=torch.int64)
    assert torch.equal(X, expected_X)
    assert torch.equal(Y, expected_Y)


def test_build_windows_block_1_is_bigram_pairs():
    vocab = Vocabulary.from_words(["abc"])
    X, Y = build_windows(["abc"], vocab, block_size=1)
    assert torch.equal(X, torch.tensor([[0], [1], [2], [3]]))
    assert torch.equal(Y, torch.tensor([1, 2, 3, 0]))


def test_build_windows_empty_list_has_the_right_shape():
    X, Y = build_windows([], Vocabulary.from_words(["a"]), block_size=3)
    assert X.shape == (0, 3) and X.dtype == torch.int64
    assert Y.shape == (0,) and Y.dtype == torch.int64


# --------------------------------------------------------------------- split


def test_shuffle_split_is_pythons_random_shuffle_cut_80_10_10():
    words = [f"w{i}" for i in range(101)]
    original = list(words)
    train, val, test = shuffle_split(words, seed=42, train_frac=0.8, val_frac=0.1)
    assert words == original, "the input list must not be shuffled in place"
    # the lecture, written independently
    expected = list(original)
    random.seed(42)
    random.shuffle(expected)
    n1, n2 = int(0.8 * 101), int(0.9 * 101)
    assert (n1, n2) == (80, 90)
    assert train == expected[:n1]
    assert val == expected[n1:n2]
    assert test == expected[n2:]
    assert sorted(train + val + test) == sorted(original)


def test_shuffle_split_depends_on_seed_and_is_repeatable():
    words = [f"w{i}" for i in range(50)]
    assert shuffle_split(words, 1, 0.8, 0.1) == shuffle_split(words, 1, 0.8, 0.1)
    assert shuffle_split(words, 1, 0.8, 0.1)[0] != shuffle_split(words, 2, 0.8, 0.1)[0]


# ------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def real_words(names_path: Path) -> list[str]:
    return parse_names(names_path.read_bytes(), source=str(names_path))


def test_real_file_parses_like_the_lecture(real_words, names_path):
    # the lecture: words = open('names.txt', 'r').read().splitlines()
    assert real_words == names_path.read_text(encoding="utf-8").splitlines()
    assert len(real_words) == 32_033


def test_real_file_vocabulary(real_words):
    vocab = Vocabulary.from_words(real_words)
    assert vocab.size == 27
    assert vocab.stoi["."] == 0
    assert vocab.chars == tuple("abcdefghijklmnopqrstuvwxyz")


def test_real_file_split_and_windows(real_words):
    vocab = Vocabulary.from_words(real_words)
    train, val, test = shuffle_split(real_words, seed=42, train_frac=0.8, val_frac=0.1)
    assert train[:5] == ["yuheng", "diondre", "xavien", "jori", "juanluis"]
    assert len(train) == 25_626  # n1
    assert len(train) + len(val) == 28_829  # n2
    assert len(test) == 32_033 - 28_829
    sizes = []
    for part in (train, val, test):
        X, Y = build_windows(part, vocab, block_size=3)
        assert X.dtype == Y.dtype == torch.int64
        assert X.shape[1] == 3 and X.shape[0] == Y.shape[0]
        assert int(X.min()) >= 0 and int(X.max()) < 27 and int(Y.max()) < 27
        sizes.append(X.shape[0])
    assert sizes == [182_625, 22_655, 22_866]
