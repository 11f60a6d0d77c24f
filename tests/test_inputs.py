"""Bad input: every class of problem with the names file, normalised or rejected.

Each class is decided once (DESIGN of the decisions: the docstring of
``charlm.data.parse_names`` and of ``stages.download``) and tested here: a normalised
input must give exactly the expected names; a rejected one must fail with a message
that names the file, the line (and column) and the offending byte or character.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import NAMES_SHA256, ROOT, run

from charlm.config import EvaluateConfig, ModelConfig, TrainConfig, VariantConfig
from charlm.data import Vocabulary, parse_names
from pipeline.stages.download import download
from pipeline.stages.evaluate import evaluate
from pipeline.stages.split import split
from pipeline.stages.train import train

SHA_OF_NOTHING = hashlib.sha256(b"").hexdigest()

# (class, raw bytes, the names parse_names must return)
NORMALISED = [
    ("blank lines and a trailing newline", b"anna\n\nbob\n\n", ["anna", "bob"]),
    ("no final newline", b"anna\nbob", ["anna", "bob"]),
    ("whitespace-only lines", b"anna\n   \n\t\nbob\n", ["anna", "bob"]),
    ("Windows line endings", b"anna\r\nbob\r\n", ["anna", "bob"]),
    ("old Mac line endings", b"anna\rbob\r", ["anna", "bob"]),
    ("mixed line endings", b"anna\r\nbob\ncarl\r", ["anna", "bob", "carl"]),
    ("UTF-8 byte-order mark", b"\xef\xbb\xbfanna\nbob\n", ["anna", "bob"]),
    ("BOM and CRLF together", b"\xef\xbb\xbfAnna\r\nBob\r\n", ["anna", "bob"]),
    ("uppercase letters", b"Anna\nBOB\nmcDonald\n", ["anna", "bob", "mcdonald"]),
    ("uppercase accented letters", "ÉMILE\nZOË\n".encode(), ["émile", "zoë"]),
    ("leading and trailing spaces", b"  anna\n bob  \n", ["anna", "bob"]),
    ("leading and trailing tabs", b"\tanna\t\n", ["anna"]),
    ("no-break spaces at the ends", "\u00a0anna\u00a0\n".encode(), ["anna"]),
    ("decomposed accent (NFD) -> NFC", "E\u0301mile\n".encode(), ["\u00e9mile"]),
    ("hyphen and apostrophe", b"anne-marie\no'neil\n", ["anne-marie", "o'neil"]),
    ("other scripts", "łukasz\nсаша\nχλόη\n".encode(), ["łukasz", "саша", "χλόη"]),
    ("duplicates are kept", b"anna\nanna\n", ["anna", "anna"]),
]

# (class, raw bytes, regex the message must match: file:line[:column]: ... character)
REJECTED = [
    ("empty file", b"", r"^names\.txt: no names found \(the file is empty or blank\)$"),
    ("blank file", b"\n  \r\n\t\n", r"^names\.txt: no names found"),
    ("BOM only", b"\xef\xbb\xbf", r"^names\.txt: no names found"),
    (
        "non-UTF-8 byte (Latin-1 file)",
        "anna\nrenée\n".encode("latin-1"),
        r"^names\.txt:2:4: byte 0xe9: not valid UTF-8 \(save the file as UTF-8",
    ),
    (
        "non-UTF-8 byte after CRLF lines",
        b"anna\r\nbob\r\nj\xffrg\r\n",
        r"^names\.txt:3:2: byte 0xff: not valid UTF-8",
    ),
    (
        "file cut inside a character (truncated)",
        "anna\nzoë".encode()[:-1],
        r"^names\.txt:2:3: byte 0xc3: the file ends inside a multi-byte character",
    ),
    (
        "UTF-16 file",
        "anna\n".encode("utf-16"),
        r"^names\.txt:1: starts with a UTF-16 byte-order mark; save the file as UTF-8",
    ),
    (
        "boundary token '.' inside a name",
        b"anna\nj.r.r\n",
        r"^names\.txt:2:2: 'j\.r\.r' contains the boundary token '\.'",
    ),
    (
        "boundary token alone on a line",
        b"anna\n\n.\n",
        r"^names\.txt:3:1: '\.' contains the boundary token",
    ),
    ("digit", b"anna\nbob2\n", r"^names\.txt:2:4: 'bob2' contains '2' \(U\+0032 DIGIT TWO\)"),
    (
        "space inside a name",
        b"mary ann\n",
        r"^names\.txt:1:5: 'mary ann' contains ' ' \(U\+0020 SPACE\); names may hold letters",
    ),
    (
        "column after leading spaces",
        b"   ann_a\n",
        r"^names\.txt:1:7: 'ann_a' contains '_' \(U\+005F LOW LINE\)",
    ),
    (
        "a second column (CSV)",
        b"anna,1\n",
        r"^names\.txt:1:5: 'anna,1' contains ',' \(U\+002C COMMA\)",
    ),
    (
        "tab inside (TSV)",
        b"anna\t12\n",
        r"^names\.txt:1:5: 'anna\\t12' contains '\\t' \(U\+0009 a control character\)",
    ),
    ("NUL byte", b"an\x00na\n", r"^names\.txt:1:3: .* \(U\+0000 a control character\)"),
    (
        "byte-order mark inside the file",
        "anna\n\ufeffbob\n".encode(),
        r"^names\.txt:2:1: .* \(U\+FEFF ZERO WIDTH NO-BREAK SPACE\)",
    ),
    (
        "zero-width space",
        "an\u200bna\n".encode(),
        r"^names\.txt:1:3: .* \(U\+200B ZERO WIDTH SPACE\)",
    ),
    (
        "typographic apostrophe",
        "o\u2019neil\n".encode(),
        r"^names\.txt:1:2: .* \(U\+2019 RIGHT SINGLE QUOTATION MARK\)",
    ),
    ("emoji", "anna🙂\n".encode(), r"^names\.txt:1:5: .* \(U\+1F642 SLIGHTLY SMILING FACE\)"),
    (
        "HTML page instead of the list",
        b"<!DOCTYPE html>\n<html>\n",
        r"^names\.txt:1:1: '<!DOCTYPE html>' contains '<'",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in NORMALISED],
                         ids=[c[0] for c in NORMALISED])  # fmt: skip
def test_normalised(raw: bytes, expected: list[str]):
    assert parse_names(raw, source="names.txt") == expected


@pytest.mark.parametrize(("raw", "pattern"), [c[1:] for c in REJECTED],
                         ids=[c[0] for c in REJECTED])  # fmt: skip
def test_rejected(raw: bytes, pattern: str):
    with pytest.raises(ValueError) as info:
        parse_names(raw, source="names.txt")
    assert re.search(pattern, str(info.value)), str(info.value)


def test_line_numbers_count_blank_lines():
    raw = b"\xef\xbb\xbf\r\nanna\r\n\r\n  \r\nb0b\r\n"
    with pytest.raises(ValueError, match=r"^f:5:2: 'b0b' contains '0'"):
        parse_names(raw, source="f")


def test_vocabulary_comes_from_the_data():
    words = parse_names("Zoë-Ann\nO'Neil\nJosé\n".encode())
    vocab = Vocabulary.from_words(words)
    assert vocab.chars == tuple(sorted(set("zoë-annoneiljosé'")))
    assert vocab.stoi["."] == 0 and vocab.size == len(vocab.chars) + 1


def test_real_names_file_is_clean(names_path: Path):
    words = parse_names(names_path.read_bytes(), source=str(names_path))
    assert len(words) == 32_033
    assert "".join(sorted(set("".join(words)))) == "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------- download stage


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url(tmp_path: Path):
    url = f"http://127.0.0.1:{_closed_port()}/names.txt"
    out = tmp_path / "raw" / "names.txt"
    with pytest.raises(OSError, match=r"cannot fetch http://127\.0\.0\.1:\d+/names\.txt: .*"
                                      r"Offline\? Set NAMES_MIRROR to a local copy"):  # fmt: skip
        download(url, SHA_OF_NOTHING, out)
    assert not out.exists()


def test_missing_mirror_is_an_error_not_a_fallback(tmp_path: Path):
    out = tmp_path / "raw" / "names.txt"
    mirror = tmp_path / "nowhere" / "names.txt"
    with pytest.raises(OSError, match=r"NAMES_MIRROR=.*nowhere/names\.txt is set but cannot be "
                                      r"read; point it at a copy"):  # fmt: skip
        download("http://127.0.0.1:1/unused", SHA_OF_NOTHING, out, mirror=str(mirror))
    assert not out.exists()


def test_unsupported_scheme(tmp_path: Path):
    with pytest.raises(OSError, match="unsupported URL scheme 'ftp'"):
        download("ftp://example.invalid/names.txt", SHA_OF_NOTHING, tmp_path / "n.txt")


@pytest.mark.parametrize("content", [b"anna\nbob\n", b"", b"anna\nbo"],
                         ids=["another file", "empty download", "truncated download"])  # fmt: skip
def test_checksum_mismatch_writes_nothing(tmp_path: Path, content: bytes):
    expected = hashlib.sha256(b"anna\nbob\ncarl\n").hexdigest()
    mirror = tmp_path / "mirror.txt"
    mirror.write_bytes(content)
    out = tmp_path / "raw" / "names.txt"
    got = hashlib.sha256(content).hexdigest()
    with pytest.raises(ValueError) as info:
        download("unused", expected, out, mirror=str(mirror))
    msg = str(info.value)
    assert f"expected sha256 {expected} (params data.sha256)" in msg
    assert f"got {got} ({len(content)} bytes)" in msg
    assert "set data.sha256 to the second hash" in msg
    assert not out.exists() and not list(out.parent.glob(".*"))


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file URL"])
def test_mirror_with_its_checksum_is_copied_byte_for_byte(tmp_path: Path, as_uri: bool):
    content = b"\xef\xbb\xbfAnna\r\nBob\r\n"  # checked as raw bytes, normalised later
    mirror = tmp_path / "mirror.txt"
    mirror.write_bytes(content)
    out = tmp_path / "raw" / "names.txt"
    source = mirror.as_uri() if as_uri else str(mirror)
    assert download("unused", hashlib.sha256(content).hexdigest(), out, source) == source
    assert out.read_bytes() == content


def _stage(tmp_path: Path, module: str, *args: str, env: dict | None = None):
    cmd = [sys.executable, "-m", f"pipeline.stages.{module}", "--params", "params.yaml"]
    return run([*cmd, *args],
               cwd=tmp_path, env={"PYTHONPATH": str(ROOT), **(env or {})}, check=False)  # fmt: skip


def test_stage_commands_report_bad_input_in_one_line(tmp_path: Path):
    """The stage processes exit 1 with a one-line message and leave no output."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    mirror = tmp_path / "nowhere.txt"
    proc = _stage(tmp_path, "download", "--out", "data/raw/names.txt",
                  env={"NAMES_MIRROR": str(mirror)})  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot fetch file://") and "Traceback" not in proc.stderr
    assert f"NAMES_MIRROR={mirror} is set but cannot be read" in proc.stderr
    assert not (tmp_path / "data" / "raw" / "names.txt").exists()

    names = tmp_path / "data" / "raw" / "names.txt"
    names.parent.mkdir(parents=True)
    names.write_bytes(b"anna\r\nbob\r\nj.r\r\n")
    proc = _stage(tmp_path, "split", "--names", "data/raw/names.txt", "--out", "data/processed")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: data/raw/names.txt:3:2: 'j.r' contains the boundary token '.', which marks "
        "the start and end of every name; remove it"
    )
    assert not (tmp_path / "data" / "processed").exists()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.endswith(".tmp")]


def test_too_few_names_for_three_splits(tmp_path: Path):
    names = tmp_path / "names.txt"
    names.write_bytes(b"anna\nbob\ncarl\n")
    with pytest.raises(ValueError, match=r"names\.txt: the val split is empty \(3 names"):
        split(names, tmp_path / "processed", seed=42, train_frac=0.8, val_frac=0.1, block_size=3)
    assert not (tmp_path / "processed").exists()


# A user's own list: accents, hyphens, apostrophes, capitals, Windows line endings, BOM.
USER_NAMES = [
    "José", "Zoë", "Anne-Marie", "O'Neil", "Émile", "Łukasz", "Søren", "François",
    "Noémie", "Jean-Luc", "Björk", "Ñuño", "Chloé", "Hélène", "Jürgen", "Saoirse",
    "Mary-Kate", "D'Arcy", "Inés", "Bartłomiej",
]  # fmt: skip


def test_own_names_with_another_alphabet_run_through(tmp_path: Path):
    """download -> split -> train -> evaluate on a user's list, once its sha256 is set."""
    raw = b"\xef\xbb\xbf" + "\r\n".join(USER_NAMES * 5).encode() + b"\r\n"
    mirror = tmp_path / "my_names.txt"
    mirror.write_bytes(raw)
    out = tmp_path / "data" / "raw" / "names.txt"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download("unused", NAMES_SHA256, out, mirror=str(mirror))
    download("unused", hashlib.sha256(raw).hexdigest(), out, mirror=str(mirror))

    processed = tmp_path / "data" / "processed"
    counts = split(out, processed, seed=42, train_frac=0.8, val_frac=0.1, block_size=3)
    chars = json.loads((processed / "vocab.json").read_text(encoding="utf-8"))["chars"]
    expected = sorted(set("".join(USER_NAMES).lower()))
    assert chars == expected and "-" in chars and "'" in chars and "é" in chars
    assert counts["vocab_size"] == len(expected) + 1 and counts["names"] == 100

    models = tmp_path / "data" / "models" / "mine"
    cfg = TrainConfig(seeds=[3, 4], max_steps=50, lr_decay_step=25, record_every=10,
                      device="cpu")  # fmt: skip
    summary, _ = train("mine", processed, models, ModelConfig(), cfg, VariantConfig())
    assert summary["diverged_at"] == [None, None]
    checkpoint = torch.load(models / "model.pt")
    assert checkpoint["vocab"] == expected
    assert checkpoint["state_dict"]["C"].shape == (2, len(expected) + 1, 10)

    ev = tmp_path / "data" / "eval" / "mine"
    metrics = evaluate(processed, models, ev, EvaluateConfig(n_samples=5, n_novelty=10),
                       tmp_path / "curve.csv")  # fmt: skip
    assert all(v is not None for v in metrics["canonical"].values())
    samples = json.loads((ev / "samples.json").read_text(encoding="utf-8"))["samples"]
    assert set("".join(w for seed in samples for w in seed)) <= set(expected)
