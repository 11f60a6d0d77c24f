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
            context = [*context[1:], ix]
    if not X:
        return torch.empty((0, block_size), dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return torch.tensor(X, dtype=torch.int64), torch.tensor(Y, dtype=torch.int64)


def _allowed(ch: str) -> bool:
    """Letters (any script), combining marks, hyphen and apostrophe."""
    return unicodedata.category(ch)[0] in "LM" or ch in "-'"


def _describe_char(ch: str) -> str:
    """'\\t' (U+0009 a control character), '3' (U+0033 DIGIT THREE), ..."""
    return f"{ch!r} (U+{ord(ch):04X} {unicodedata.name(ch, '') or 'a control character'})"


def parse_names(raw: bytes, source: str = "<names>") -> list[str]:
    """Decode and normalise a names file: one name per line.

    Normalisation (each case is tested in tests/test_inputs.py):

    - a UTF-8 byte-order mark at the start is dropped;
    - line endings \\n, \\r\\n (Windows) and \\r alone are all line breaks, and a final
      line break is optional;
    - leading and trailing whitespace (spaces, tabs, no-break spaces) is stripped;
    - blank lines are skipped (they still count for line numbers);
    - names are lowercased (``str.lower``) and put in Unicode NFC form, so 'Émile'
      written with a combining accent and 'émile' give the same characters.

    Duplicates are kept: the lecture's 32,033 words include them.

    Raises:
        ValueError: naming ``source``, the 1-based line and column and the offending
            byte or character, if the bytes are not UTF-8 (a UTF-16 file or a file
            cut inside a character included), a name contains the boundary token '.'
            or a character that is not a letter (any script), a combining mark, '-' or
            "'" (digits, inner spaces, punctuation, control characters); or, naming
            ``source``, if no name is left (an empty or blank file).
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(
            f"{source}:1: starts with a UTF-16 byte-order mark; save the file as UTF-8"
        )
    # '\r' and '\n' never occur inside a UTF-8 multi-byte sequence, so this is safe
    # before decoding and keeps the line numbers of a decoding error right.
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        if e.reason == "unexpected end of data":
            what = "the file ends inside a multi-byte character (truncated?)"
        else:
            what = "not valid UTF-8 (save the file as UTF-8, e.g. iconv -f latin1 -t utf-8)"
        raise ValueError(f"{source}:{line}:{column}: byte 0x{raw[e.start]:02x}: {what}") from None
    words = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        name = line.strip()
        if not name:
            continue
        offset = len(line) - len(line.lstrip())
        for column, ch in enumerate(name, start=offset + 1):
            where = f"{source}:{lineno}:{column}"
            if ch == BOUNDARY:
                raise ValueError(
                    f"{where}: {name!r} contains the boundary token '.', which marks the "
                    "start and end of every name; remove it"
                )
            if not _allowed(ch):
                raise ValueError(
                    f"{where}: {name!r} contains {_describe_char(ch)}; names may hold "
                    "letters, combining marks, '-' and \"'\" only"
                )
        words.append(unicodedata.normalize("NFC", name.lower()))
    if not words:
        raise ValueError(f"{source}: no names found (the file is empty or blank)")
    return words
