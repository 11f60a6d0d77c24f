"""Parameters: validated before any work starts; errors name file, line and key.

Each case edits one line of a copy of the project's params.yaml and checks the
message (or the value read). The last tests prove that every stage in dvc.yaml
declares exactly the keys its module reads (tests/test_faults.py checks the same
on a real run, from the keys each stage process was handed).
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from support import ROOT, covered, dvc_stages, run

from pipeline import params
from pipeline.params import ParamsError, ParamsWarning

BASE = (ROOT / "params.yaml").read_text(encoding="utf-8")


def line_of_key(text: str, dotted: str) -> int:
    """0-based index of the line that holds the dotted key in YAML ``text``."""
    node = yaml.compose(text)
    for part in dotted.split("."):
        key, node = next((k, v) for k, v in node.value if k.value == part)
    return key.start_mark.line


def edit(tmp_path: Path, dotted: str, new: str) -> tuple[Path, int]:
    """A copy of params.yaml whose line of ``dotted`` is replaced by ``new`` (one or
    more lines, indented like the original); returns the path and the 1-based line."""
    lines = BASE.splitlines()
    i = line_of_key(BASE, dotted)
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i : i + 1] = [indent + part for part in new.split("\n")]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, i + 1


def error_of(path: Path) -> str:
    with pytest.raises(ParamsError) as info:
        params.validate(path)
    return str(info.value)


def test_project_params_are_valid():
    p = params.validate(ROOT / "params.yaml")
    assert p.train.max_steps >= 1 and p.variants


# ----------------------------------------------------------------- numbers

# (key, its new line, the value read, of that type)
NUMBERS = [
    ("train.lr", "lr: 1e-05", 1e-05),
    ("train.lr", "lr: 1.0e-5", 1e-05),
    ("train.lr", "lr: 1.0E-5", 1e-05),
    ("train.lr", "lr: 5e-1", 0.5),
    ("train.lr", "lr: .5", 0.5),
    ("train.lr", "lr: 1", 1.0),  # an int where a float is expected reads as that float
    ("train.max_steps", "max_steps: 1e5", 100_000),
    ("train.max_steps", "max_steps: 2e+5", 200_000),
    ("train.max_steps", "max_steps: 200000.0", 200_000),  # dvc exp run -S max_steps=2e5
    ("train.max_steps", "max_steps: 1.0e5", 100_000),
    ("train.max_steps", "max_steps: 200_000", 200_000),
    ("variants.batchnorm.momentum", "momentum: 1e-3", 0.001),
    ("split.train_frac", "train_frac: 8e-1", 0.8),
]


@pytest.mark.parametrize(("key", "new", "expected"), NUMBERS, ids=[n[1] for n in NUMBERS])
def test_numbers_as_yaml_and_dvc_write_them(tmp_path, key, new, expected):
    value = params.get(params.validate(edit(tmp_path, key, new)[0]), key)
    assert value == expected and type(value) is type(expected)


def test_dvc_exp_run_set_round_trip(tmp_path):
    """Values written by dvc's own -S machinery read back as the numbers meant."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(BASE, encoding="utf-8")
    apply_overrides(path, ["train.lr=1e-05", "train.max_steps=2e5", "train.lr_decay_step=1e5",
                           "train.lr_decayed=5e-1", "variants.kaiming.gain=1.0",
                           "variants.batchnorm.momentum=1e-2", "train.seeds=[1,2,3]"])  # fmt: skip
    p = params.validate(path)
    assert (p.train.lr, p.train.max_steps, p.train.lr_decay_step) == (1e-05, 200_000, 100_000)
    assert (p.train.lr_decayed, p.train.seeds) == (0.5, [1, 2, 3])
    assert p.variants["kaiming"].gain_value == 1.0
    assert p.variants["batchnorm"].momentum == 0.01


# ------------------------------------------------- YAML 1.2, as DVC reads it

# Scalars that YAML 1.1 (PyYAML) and YAML 1.2 (ruamel.yaml, DVC's parser) read apart:
# (key, scalar, the value DVC reads). A value the key's type refuses is refused as DVC
# reads it (a string 'yes' for a boolean), never read as something else.
YAML12 = [
    ("split.seed", "042", 42),  # YAML 1.1: octal 34
    ("split.seed", "-042", -42),
    ("split.seed", "017", 17),  # YAML 1.1: 15
    ("split.seed", "08", 8),  # YAML 1.1: the string '08'
    ("split.seed", "0o17", 15),  # YAML 1.1: the string '0o17'
    ("split.seed", "0x1F", 31),
    ("split.seed", "0b101", 5),
    ("split.seed", "1_000", 1000),
    ("split.seed", "+1", 1),
    ("split.seed", "1:20", "1:20"),  # YAML 1.1: sexagesimal 80
    ("train.lr", "1e-5", 1e-05),  # YAML 1.1: the string '1e-5'
    ("train.lr", "1E-5", 1e-05),
    ("train.lr", "+.5", 0.5),  # YAML 1.1: the string '+.5'
    ("train.lr", ".5", 0.5),
    ("train.lr", "1.", 1.0),
    ("train.lr", "5e-1", 0.5),
    ("data.url", "yes", "yes"),  # YAML 1.1: yes/no/on/off/y/n are booleans
    ("data.url", "no", "no"),
    ("data.url", "on", "on"),
    ("data.url", "off", "off"),
    ("data.url", "y", "y"),
    ("data.url", "1e5", 100000.0),  # YAML 1.1: the string '1e5'
    ("variants.batchnorm.batchnorm", "yes", "yes"),
    ("variants.batchnorm.batchnorm", "on", "on"),
    ("variants.batchnorm.batchnorm", "off", "off"),
    ("variants.batchnorm.batchnorm", "True", True),
    ("variants.batchnorm.batchnorm", "TRUE", True),
]


def dvc_reads(path: Path, key: str):
    """The value of dotted ``key`` as DVC reads it (``dvc params diff`` and dvc.lock
    load params files with ``dvc.utils.serialize.load_path``)."""
    from dvc.fs import LocalFileSystem
    from dvc.utils.serialize import load_path

    value = load_path(str(path), LocalFileSystem())
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize(
    ("key", "scalar", "value"), YAML12, ids=[f"{k}: {s}" for k, s, _ in YAML12]
)
def test_the_stage_reads_what_dvc_reads(tmp_path, key, scalar, value):
    path, line = edit(tmp_path, key, f"{key.rpartition('.')[2]}: {scalar}")
    seen = dvc_reads(path, key)
    assert seen == value and type(seen) is type(value)
    expected = {"split.seed": int, "train.lr": float, "data.url": str}.get(key, bool)
    if type(value) is expected or (expected is float and type(value) is int):
        got = params.get(params.validate(path), key)
        assert got == value and type(got) is expected
    else:  # refused, as the value DVC records
        assert f"{path}:{line}: key {key!r}: expected " in error_of(path)
        assert f"got {value!r} ({type(value).__name__})" in error_of(path)


def test_dvc_lock_records_the_seed_the_stage_used(tmp_path):
    """The issue's input: ``seed: 042`` under split. DVC records 42 in dvc.lock; a stage
    reading its keys through pipeline.params must use 42 too (PyYAML read octal 34)."""
    (tmp_path / "params.yaml").write_text(
        BASE.replace("  seed: 42 ", "  seed: 042"), encoding="utf-8"
    )
    used = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pipeline import params; "
        "print(params.load('params.yaml', ['split'])['split'].seed)"
    )
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {"stages": {"split": {"cmd": f'python -c "{used}" > seed.txt',
                                  "params": ["split"], "outs": ["seed.txt"]}}}
        ),
        encoding="utf-8",
    )  # fmt: skip
    run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path)
    run(["dvc", "repro", "-q"], cwd=tmp_path)
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text(encoding="utf-8"))
    recorded = lock["stages"]["split"]["params"]["params.yaml"]["split"]["seed"]
    assert (recorded, (tmp_path / "seed.txt").read_text().strip()) == (42, "42")


# ----------------------------------------------------------------- errors

# (key, its new line, pattern of the message after "file:line: ")
ERRORS = [
    # unknown keys: the key and the closest valid one
    ("train.batch_size", "batch_sise: 32",
     r"unknown key 'train\.batch_sise' \(did you mean 'train\.batch_size'\?\)"),
    ("train", "trian:", r"unknown key 'trian' \(did you mean 'train'\?\)"),
    ("variants.kaiming.gain", "gian: tanh",
     r"unknown key 'variants\.kaiming\.gian' \(did you mean 'variants\.kaiming\.gain'\?\)"),
    ("model.n_embd", "n_emb: 10", r"unknown key 'model\.n_emb' \(did you mean 'model\.n_embd'\?\)"),
    ("model.n_embd", "zzz: 10", r"unknown key 'model\.zzz' \(valid keys here: n_embd, n_hidden\)"),
    # wrong types: key, value, expected type
    ("train.batch_size", "batch_size: '32'",
     r"key 'train\.batch_size': expected an integer, got '32' \(str\)"),
    ("train.max_steps", "max_steps: 1000.5",
     r"key 'train\.max_steps': expected an integer, got 1000\.5 \(float\)"),
    ("train.lr", "lr: fast", r"key 'train\.lr': expected a number, got 'fast' \(str\)"),
    ("train.lr", "lr: .nan", r"key 'train\.lr': expected a finite number, got nan \(float\)"),
    ("train.lr", "lr: true", r"key 'train\.lr': expected a number, got True \(bool\)"),
    ("variants.batchnorm.batchnorm", "batchnorm: 1",
     r"key 'variants\.batchnorm\.batchnorm': expected true or false, got 1 \(int\)"),
    ("train.seeds", "seeds: 42", r"key 'train\.seeds': expected a list, got 42 \(int\)"),
    ("train.seeds", "seeds: [1, two]",
     r"key 'train\.seeds\.1': expected an integer, got 'two' \(str\)"),
    ("train.device", "device: gpu",
     r"key 'train\.device' = 'gpu': Input should be 'auto', 'cpu' or 'cuda'"),
    ("variants.kaiming.gain", "gain: [1]",
     r"key 'variants\.kaiming\.gain' = \[1\]: gain must be a number > 0 or null; .* \(list\)"),
    # ranges
    ("train.batch_size", "batch_size: 1",
     r"key 'train\.batch_size' = 1: variants\.batchnorm uses BatchNorm, which needs "
     r"train\.batch_size >= 2"),
    ("train.batch_size", "batch_size: 0",
     r"key 'train\.batch_size' = 0: Input should be greater than or equal to 1"),
    ("variants.batchnorm.momentum", "momentum: 0",
     r"key 'variants\.batchnorm\.momentum' = 0: Input should be greater than 0"),
    ("variants.batchnorm.momentum", "momentum: 1.5",
     r"key 'variants\.batchnorm\.momentum' = 1\.5: Input should be less than or equal to 1"),
    ("split.train_frac", "train_frac: 1.0",
     r"key 'split\.train_frac' = 1\.0: Input should be less than 1"),
    ("split.val_frac", "val_frac: 0",
     r"key 'split\.val_frac' = 0: Input should be greater than 0"),
    ("split.val_frac", "val_frac: 0.2",
     r"key 'split\.val_frac' = 0\.2: train_frac \+ val_frac must be < 1 to leave a test split"),
    ("train.max_steps", "max_steps: 0",
     r"key 'train\.max_steps' = 0: Input should be greater than or equal to 1"),
    ("train.lr", "lr: -0.1", r"key 'train\.lr' = -0\.1: Input should be greater than 0"),
    ("train.lr_decayed", "lr_decayed: 0",
     r"key 'train\.lr_decayed' = 0: Input should be greater than 0"),
    ("train.lr_decay_step", "lr_decay_step: -1",
     r"key 'train\.lr_decay_step' = -1: Input should be greater than or equal to 0"),
    ("variants.kaiming.gain", "gain: 0",
     r"key 'variants\.kaiming\.gain' = 0: gain must be a finite number > 0"),
    ("variants.kaiming.gain", "gain: tanh",
     r"key 'variants\.kaiming\.gain' = 'tanh': gain must be a number > 0 or null .*"
     r"got the string 'tanh': write null instead of a name"),
    ("split.block_size", "block_size: 0",
     r"key 'split\.block_size' = 0: Input should be greater than or equal to 1"),
    ("model.n_embd", "n_embd: 0",
     r"key 'model\.n_embd' = 0: Input should be greater than or equal to 1"),
    ("model.n_hidden", "n_hidden: -5",
     r"key 'model\.n_hidden' = -5: Input should be greater than or equal to 1"),
    ("train.seeds", "seeds: [1, 2, 1]",
     r"key 'train\.seeds' = \[1, 2, 1\]: seeds must be distinct"),
    ("variants.kaiming.out_weight_scale", "out_weight_scale: -0.01",
     r"key 'variants\.kaiming\.out_weight_scale' = -0\.01: Input should be greater than or "
     r"equal to 0"),
    # keys removed by the unified schema are unknown now
    ("variants.kaiming.bias_scale", "b1_scale: 0.01",
     r"unknown key 'variants\.kaiming\.b1_scale'"),
    ("variants.deep_bn.layers", "deep: true", r"unknown key 'variants\.deep_bn\.deep'"),
    ("data.sha256", "sha256: 0a30b5",
     r"key 'data\.sha256' = '0a30b5': sha256 must be 64 hexadecimal digits"),
    ("train.record_every", "record_every: 0",
     r"key 'train\.record_every' = 0: Input should be greater than or equal to 1"),
    # the atlas's grids: each entry in range, before any stage starts
    ("atlas.depths", "depths: [0, 4]",
     r"key 'atlas\.depths\.0' = 0: Input should be greater than or equal to 1"),
    ("atlas.widths", "widths: [100, 0]",
     r"key 'atlas\.widths\.1' = 0: Input should be greater than or equal to 1"),
    ("atlas.depths", "depths: [2, 2]",
     r"key 'atlas\.depths' = \[2, 2\]: entries must be distinct"),
    ("atlas.train.depths", "depths: [1, -4]",
     r"key 'atlas\.train\.depths\.1' = -4: Input should be greater than or equal to 1"),
    ("atlas.train.nonlinearities", "nonlinearities: []",
     r"key 'atlas\.train\.nonlinearities' = \[\]: List should have at least 1 item"),
    ("atlas.train.gain_factors", "gain_factors: [1.0, 0]",
     r"key 'atlas\.train\.gain_factors\.1' = 0: Input should be greater than 0"),
    ("atlas.he.gains", "gains: [-1.0]",
     r"key 'atlas\.he\.gains\.0' = -1\.0: Input should be greater than 0"),
    ("atlas.width_sweep.widths", "widths: [25, 0]",
     r"key 'atlas\.width_sweep\.widths\.1' = 0: Input should be greater than or equal to 1"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "new", "pattern"), ERRORS, ids=[e[1] for e in ERRORS])
def test_error_names_file_line_and_key(tmp_path, key, new, pattern):
    path, line = edit(tmp_path, key, new)
    msg = error_of(path)
    assert re.search(re.escape(f"{path}:{line}: ") + f"(?:{pattern})", msg), msg


# (variant, key after which to add a line, the added line, its key, words of the message)
IGNORED = [
    ("batchnorm", "batchnorm", "bias_scale: 0.5", "bias_scale", "before BatchNorm have no bias"),
    ("batchnorm", "batchnorm_form", "eps: 0.001", "eps", "the 'std' form has no eps"),
    ("kaiming", "out_bias_scale", "last_scale: 0.2", "last_scale", "init: second_half only"),
    ("deep_tanh", "n_hidden", "out_weight_scale: 0.1", "out_weight_scale",
     "init: first_half only"),
    ("deep_tanh", "n_hidden", "momentum: 0.1", "momentum", "used only with BatchNorm"),
    ("naive", "weight_scale", "gain: 1.0", "gain", "weight_scale sets the hidden weights"),
]  # fmt: skip


@pytest.mark.parametrize(("variant", "after", "new", "key", "words"), IGNORED,
                         ids=[f"{e[0]}-{e[3]}" for e in IGNORED])  # fmt: skip
def test_key_a_variant_would_ignore(tmp_path, variant, after, new, key, words):
    """A key that the variant's recipe, BatchNorm form or architecture would not read is
    an error on its own line, not silently dropped."""
    lines = BASE.splitlines()
    i = line_of_key(BASE, f"variants.{variant}.{after}")
    path, line = edit(tmp_path, f"variants.{variant}.{after}", f"{lines[i].strip()}\n{new}")
    msg = error_of(path)
    value = new.split(": ")[1]
    assert f"{path}:{line + 1}: key 'variants.{variant}.{key}' = {value}: " in msg, msg
    assert words in msg, msg


def test_every_error_is_listed(tmp_path):
    path = tmp_path / "params.yaml"
    text = BASE.replace("  lr: 0.1", "  lr: -1").replace("  n_embd: 10", "  n_emdb: 10")
    path.write_text(text, encoding="utf-8")
    msg = error_of(path)
    assert "key 'train.lr' = -1" in msg and "unknown key 'model.n_emdb'" in msg


def test_a_deleted_line_is_an_error_not_a_silent_default(tmp_path):
    """The configs have the lecture's defaults, but params.yaml must spell out every
    number: a key or a whole section left out is named, with its line and value."""
    path = tmp_path / "params.yaml"
    path.write_text(BASE.replace("  batch_size: 32\n", ""), encoding="utf-8")
    msg = error_of(path)
    section = line_of_key(BASE, "train") + 1
    assert f"{path}:{section}: missing key 'train.batch_size'" in msg, msg
    assert "(the lecture's value: batch_size: 32)" in msg
    start = BASE.index("\nevaluate:")
    path.write_text(BASE[:start] + BASE[BASE.index("\n\n", start + 1) :], encoding="utf-8")
    msg = error_of(path)
    assert f"{path}: missing section 'evaluate' (keys: probe_seed, probe_size," in msg, msg


@pytest.mark.parametrize(("key", "new", "dotted", "below"), [
    ("train.lr", "lr: 0.1\nlr: 0.2", "train.lr", 1),
    ("report.reference.naive", "naive: {init_loss: 1, tol: 0.1, init_loss: 2}",
     "report.reference.naive.init_loss", 0),
])  # fmt: skip
def test_duplicate_key(tmp_path, key, new, dotted, below):
    """ruamel's DuplicateKeyError, named with the file, line and dotted key; DVC refuses
    the same file (dvc.lock and `dvc params diff` could not read it)."""
    from dvc.utils.serialize import YAMLFileCorruptedError

    path, first = edit(tmp_path, key, new)
    msg = error_of(path)
    assert f"{path}:{first + below}: duplicate key {dotted!r} (first at line {first})" in msg
    with pytest.raises(YAMLFileCorruptedError):
        dvc_reads(path, key)


def test_yaml_syntax_error(tmp_path):
    path, _ = edit(tmp_path, "train.seeds", "seeds: [1, 2")
    assert re.search(rf"^{re.escape(str(path))}:\d+:\d+: not valid YAML: ", error_of(path))


@pytest.mark.parametrize(("text", "pattern"), [
    ("", "expected a mapping of sections at the top level"),
    ("- a\n- b\n", "expected a mapping of sections at the top level"),
    ("split: {}\nvariants: {a: {}}\n", r"params\.yaml: key 'data' is required but missing"),
    ("data: {url: x, sha256: " + "0" * 63 + "a}\nvariants: {}\n",
     r"params\.yaml:2: key 'variants' = \{\}: Dictionary should have at least 1 item"),
], ids=["empty", "list", "missing section", "no variant"])  # fmt: skip
def test_file_level_errors(tmp_path, text, pattern):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert re.search(pattern, error_of(path)), error_of(path)


# ----------------------------------------------------------- variant names

# Names that `dvc exp run -S variants.<name>.gain=...` can address: Hydra's override
# grammar, which DVC parses -S with, reads a key as '.'-separated segments, each a letter,
# '_' or '$' followed by letters, digits, '_', '-' or '$', or an integer without leading
# zeros ('$' is refused for the shell, see below). Each list is checked against DVC.
# (Each name replaces the variant kaiming, so none may be another default variant.)
ADDRESSABLE = ["kaiming", "wide_bn", "A", "x2", "_a", "a-b", "bn-", "7", "1_0"]
UNADDRESSABLE = ["2x", "-a", "a b", "a.b", "a@b", "a:b", "a/b", "a+b", "é", "01", ""]


def with_variant(tmp_path: Path, name: str) -> tuple[Path, int]:
    """params.yaml with the variant 'kaiming' renamed ``name``; the path and its line."""
    path = tmp_path / "params.yaml"
    path.write_text(BASE.replace("\n  kaiming:\n", f"\n  {json.dumps(name)}:\n"), encoding="utf-8")
    return path, line_of_key(BASE, "variants.kaiming") + 1


@pytest.mark.parametrize("name", ADDRESSABLE)
def test_an_accepted_variant_name_is_addressable_by_dvc_exp_run_set(tmp_path, name):
    from dvc.utils.hydra import apply_overrides

    path, _ = with_variant(tmp_path, name)
    assert name in params.validate(path).variants
    apply_overrides(path, [f"variants.{name}.gain=1.0"])  # what `dvc exp run -S` does
    assert dvc_reads(path, "variants")[name]["gain"] == 1.0
    assert params.validate(path).variants[name].gain_value == 1.0


@pytest.mark.parametrize("name", UNADDRESSABLE)
def test_a_variant_name_dvc_exp_run_set_cannot_address_is_refused(tmp_path, name):
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    path, line = with_variant(tmp_path, name)
    msg = error_of(path)
    assert f"{path}:{line}: key 'variants.{name}': variant name {name!r} cannot be addressed by " \
        f"`dvc exp run -S variants.{name}.gain=...`" in msg, msg  # fmt: skip
    with pytest.raises(InvalidArgumentError):
        apply_overrides(path, [f"variants.{name}.gain=1.0"])


def test_variant_name_2x_says_why(tmp_path):
    """The issue's input: the variant 'kaiming' renamed '2x'."""
    path, line = with_variant(tmp_path, "2x")
    assert f"{path}:{line}: key 'variants.2x': variant name '2x' cannot be addressed by `dvc " \
        "exp run -S variants.2x.gain=...` (Hydra's override grammar: extraneous input 'x.gain' " \
        "expecting EQUAL); use letters, digits, '_' and '-', starting with a letter or '_'" \
        in error_of(path)  # fmt: skip


def test_a_variant_name_the_shell_would_expand_is_refused(tmp_path):
    """Hydra can address '$a', but dvc.yaml pastes the name into the stage's command."""
    path, line = with_variant(tmp_path, "$a")
    assert f"{path}:{line}: key 'variants.$a': variant name '$a' contains '$'" in error_of(path)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match=r"nothere\.yaml: cannot read parameters"):
        params.validate(tmp_path / "nothere.yaml")


def test_a_decay_step_past_the_run_means_no_decay(tmp_path):
    """lr_decay_step >= max_steps is valid (it was an error): the run never decays, as
    the deep variants' lecture schedule (decay at 150,000) in a shorter run."""
    p = params.validate(edit(tmp_path, "train.lr_decay_step", "lr_decay_step: 100000000")[0])
    cfg = p.train
    assert cfg.lr_decay_step > cfg.max_steps
    assert cfg.lr_at(cfg.max_steps - 1) == cfg.lr


def test_uppercase_sha256_is_accepted(tmp_path):
    sha = "0A30B5557F192F32AB962680889AAC5F6FDA0F4CECF40A6D0B5694F58EA8CC4D"
    p = params.validate(edit(tmp_path, "data.sha256", f"sha256: {sha}")[0])
    assert p.data.sha256 == sha.lower()


@pytest.mark.parametrize(("momentum", "meant"), [
    ("0.999", "0.999 meant as 0.001"), ("0.9", "0.9 meant as 0.1"), ("0.51", "0.51 meant as 0.49"),
    ("1", "1 would mean no update at all"),
])  # fmt: skip
def test_momentum_in_the_keras_convention_warns(tmp_path, momentum, meant):
    path, line = edit(tmp_path, "variants.batchnorm.momentum", f"momentum: {momentum}")
    with pytest.warns(ParamsWarning) as record:
        params.validate(path)
    (w,) = record
    assert str(w.message).startswith(f"{path}:{line}: key 'variants.batchnorm.momentum': ")
    assert f"almost surely the Keras convention: {meant}" in str(w.message)
    # a stage is warned only about keys it reads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params.load(path, ["train", "variants.kaiming"])
    with pytest.warns(ParamsWarning, match="Keras convention"):
        params.load(path, ["variants.batchnorm"])


def test_stage_prints_the_warning_then_works(tmp_path):
    """A stage shows the warning as one plain line on stderr (here it then fails on
    its missing input, as it would have without the warning)."""
    path, line = edit(tmp_path, "variants.batchnorm.momentum", "momentum: 0.999")
    proc = run([sys.executable, "-m", "pipeline.stages.train", "--params", str(path), "--variant",
                "batchnorm", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m")],
               cwd=ROOT, check=False)  # fmt: skip
    assert proc.stderr.startswith(f"warning: {path}:{line}: key 'variants.batchnorm.momentum': ")
    assert proc.returncode == 1 and "error: [Errno 2] No such file" in proc.stderr


@pytest.mark.parametrize("momentum", ["0.001", "0.1", "0.5"])
def test_momentum_without_warning(tmp_path, momentum):
    path, _ = edit(tmp_path, "variants.batchnorm.momentum", f"momentum: {momentum}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params.validate(path)


def test_unknown_variant_requested(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(BASE, encoding="utf-8")
    with pytest.raises(ParamsError, match=r"params\.yaml: no key 'variants\.nope'"):
        params.load(path, ["variants.nope"])


# ----------------------------------------------------- declared params (dvc.yaml)


STAGES = dvc_stages()


@pytest.mark.parametrize("stage", list(STAGES))
def test_declared_params_equal_the_module_params(stage):
    module, declared = STAGES[stage]
    variant = stage.partition("@")[2]
    assert declared == params.stage_keys(module.rpartition(".")[2], variant or None)


@pytest.mark.parametrize("stage", list(STAGES))
def test_load_hands_out_only_declared_keys(stage, monkeypatch):
    """params.load as the stage calls it records in HANDED_OUT only declared keys."""
    module, declared = STAGES[stage]
    variant = stage.partition("@")[2]
    keys = params.stage_keys(module.rpartition(".")[2], variant or None)
    monkeypatch.setattr(params, "HANDED_OUT", set())
    values = params.load(ROOT / "params.yaml", keys)
    assert set(values) == set(keys)
    assert params.HANDED_OUT and all(covered(k, declared) for k in params.HANDED_OUT)


def test_the_command_line_check_names_the_line_and_exits_1(tmp_path):
    """``python -m pipeline.params``, which ``make repro`` runs before ``dvc repro``."""
    good = run([sys.executable, "-m", "pipeline.params", "params.yaml"], cwd=ROOT)
    assert (
        "params.yaml: valid (5 variants: naive, kaiming, batchnorm, deep_bn, deep_tanh)"
        in good.stdout
    )
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    line = text[: text.index("batch_size:")].count("\n") + 1
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace("batch_size:", "batch_sise:", 1), encoding="utf-8")
    proc = run([sys.executable, "-m", "pipeline.params", str(bad)], cwd=ROOT, check=False)
    assert proc.returncode == 1
    assert f"{bad}:{line}: unknown key 'train.batch_sise'" in proc.stderr
    assert "did you mean 'train.batch_size'?" in proc.stderr and "Traceback" not in proc.stderr
