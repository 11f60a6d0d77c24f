"""Names, vocabulary, train/val/test split and context windows.

Recipe (DESIGN.md, after Karpathy's makemore lectures): the vocabulary is the sorted
set of characters with the boundary token '.' at index 0; the words are shuffled with
Python's ``random.seed(seed); random.shuffle(words)`` and cut at int(0.8 n) and
int(0.9 n); every character of ``word + '.'`` yields one example whose context is the
``block_size`` previous indices, starting from ``[0] * block_size``.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass

import torch

BOUNDARY = "."


@dataclass(frozen=True)
class Vocabulary:
    """Maps characters to indices; index 0 is the boundary token '.'.

    Attributes:
        chars: the characters of the data in sorted order, boundary excluded, so
            that ``chars[i]`` has index ``i + 1``.
    """

    chars: tuple[str, ...]

    @classmethod
    def from_words(cls, words: list[str]) -> Vocabulary:
        """Build the vocabulary from the set of characters in ``words``.

        Raises:
            ValueError: if a word contains the boundary token '.'.
        """
        chars = sorted(set("".join(words)))
        if BOUNDARY in chars:
            raise ValueError(f"the boundary token {BOUNDARY!r} may not appear inside a word")
        return cls(tuple(chars))

    @property
    def size(self) -> int:
        """Number of tokens, boundary included (27 for lowercase a-z)."""
        return len(self.chars) + 1

    @property
    def stoi(self) -> dict[str, int]:
        return {BOUNDARY: 0, **{ch: i + 1 for i, ch in enumerate(self.chars)}}

    @property
    def itos(self) -> dict[int, str]:
        return {i: ch for ch, i in self.stoi.items()}

    def encode(self, word: str) -> list[int]:
        """Indices of the characters of ``word``. Raises KeyError on an unknown one."""
        stoi = self.stoi
        return [stoi[ch] for ch in word]

    def decode(self, indices: list[int]) -> str:
        itos = self.itos
        return "".join(itos[i] for i in indices)


def shuffle_split(
    words: list[str], seed: int, train_frac: float, val_frac: float
) -> tuple[list[str], list[str], list[str]]:
    """Shuffle a copy of ``words`` with Python's ``random`` and cut it in three.

    ``random.seed(seed); random.shuffle(words)``, then n1 = int(train_frac * n) and
    n2 = int((train_frac + val_frac) * n): train = words[:n1], val = words[n1:n2],
    test = words[n2:]. With seed 42 and 0.8/0.1 this is the lecture's split.
    """
    words = list(words)
    random.seed(seed)
    random.shuffle(words)
    n = len(words)
    n1 = int(train_frac * n)
    n2 = int((train_frac + val_frac) * n)
    return words[:n1], words[n1:n2], words[n2:]


def build_windows(
    words: list[str], vocab: Vocabulary, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context windows and next-character targets.

    Returns:
        X: int64 tensor of shape (N, block_size), the previous ``block_size`` indices.
        Y: int64 tensor of shape (N,), the index to predict.
        N is the number of characters in the words plus one boundary per word.
    """
    stoi = vocab.stoi
    X: list[list[int]] = []
    Y: list[int] = []
    for word in words:
        context = [0] * block_size
        for ch in word + BOUNDARY:
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    if not X:
        return torch.empty((0, block_size), dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return torch.tensor(X, dtype=torch.int64), torch.tensor(Y, dtype=torch.int64)


def _allowed(ch: str) -> bool:
    """Letters (any script), combining marks, hyphen and apostrophe."""
    return unicodedata.category(ch)[0] in "LM" or ch in "-'"


def parse_names(raw: bytes, source: str = "<names>") -> list[str]:
    """Decode and normalise a names file: one name per line.

    Normalisation: a UTF-8 byte-order mark is dropped; line endings \\n, \\r\\n and \\r
    are all accepted; leading and trailing whitespace is stripped; blank lines are
    skipped; names are lowercased and put in Unicode NFC form.

    Raises:
        ValueError: naming ``source``, the 1-based line and the offending character, if
            the bytes are not UTF-8, a name contains the boundary token '.', or a
            character that is not a letter, a combining mark, '-' or "'"; or if no name
            is left.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{source}:{line}: byte 0x{raw[e.start]:02x} is not valid UTF-8 "
            "(save the file as UTF-8)"
        ) from None
    words = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        word = unicodedata.normalize("NFC", line.strip().lower())
        if not word:
            continue
        for ch in word:
            if ch == BOUNDARY:
                raise ValueError(
                    f"{source}:{lineno}: {word!r} contains the boundary token '.', "
                    "which marks the start and end of every name"
                )
            if not _allowed(ch):
                raise ValueError(
                    f"{source}:{lineno}: {word!r} contains {ch!r} "
                    f"(U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}); names may hold "
                    "letters, combining marks, '-' and \"'\""
                )
        words.append(word)
    if not words:
        raise ValueError(f"{source}: no names found (the file is empty or blank)")
    return words
