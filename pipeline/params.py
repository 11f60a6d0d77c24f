"""Load params.yaml into validated pydantic objects and hand each stage its own keys.

``load(path, keys)`` validates the whole file first (so a typo anywhere fails before
any work starts, naming the file, line and key), then returns only the sections listed
in ``keys`` -- the same keys the stage declares under ``params:`` in dvc.yaml.
Every key handed out is recorded in ``HANDED_OUT`` so a test can prove that each
stage declares everything it reads.

The file is read as DVC reads it: YAML 1.2 by ruamel.yaml with the same loader as
``dvc.utils.serialize.parse_yaml`` (which dvc.lock and ``dvc params diff`` use), so every
scalar means one thing to DVC and to the stages (``042`` is 42, ``1e-5`` a number,
``yes`` a string). Line numbers come from ruamel's round-trip parse of the same text,
and a duplicate key is ruamel's error. An integral float (``200000.0``, as
``dvc exp run -S train.max_steps=2e5`` writes it) is accepted where an integer is expected.
"""

from __future__ import annotations

import difflib
import functools
import typing
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML, MappingNode, SequenceNode
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from charlm.config import (
    AtlasConfig,
    EvaluateConfig,
    FieldError,
    ModelConfig,
    Params,
    SplitConfig,
    TrainConfig,
    VariantConfig,
)

HANDED_OUT: set[str] = set()

# The params keys each stage reads: the one declaration that the stages' ``main`` and
# the ``params:`` lists of dvc.yaml both follow (tests/test_params.py keeps them equal).
# ``{variant}`` is the foreach key of train@<variant> and evaluate@<variant>.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "download": ("data.url", "data.sha256"),
    "split": ("split",),
    "train": ("model", "train", "variants.{variant}"),
    "evaluate": ("evaluate",),
    "report": ("data", "split", "model", "train", "evaluate", "variants", "report"),
    # the depth atlas (docs/atlas.md): matrix stages over a depth list declare every
    # key that changes their cells but never that list, so adding a depth reruns only
    # the new depth's stage
    "atlas_init": (
        "model.n_embd",
        "atlas.nonlinearities",
        "atlas.batchnorm",
        "atlas.widths",
        "atlas.gain_factors",
        "atlas.extra_gains",
        "atlas.seeds",
        "atlas.init_batches",
        "atlas.batch_size",
        "atlas.batch_seed",
        "atlas.threshold",
    ),
    "atlas_width": (
        "model.n_embd",
        "atlas.width_sweep",
        "atlas.seeds",
        "atlas.init_batches",
        "atlas.batch_size",
        "atlas.batch_seed",
        "atlas.threshold",
    ),
    "atlas_train": (
        "model.n_embd",
        "atlas.extra_gains",
        "atlas.train.nonlinearities",
        "atlas.train.batchnorm",
        "atlas.train.width",
        "atlas.train.gain_factors",
        "atlas.train.seeds",
        "atlas.train.steps",
        "atlas.train.batch_size",
        "atlas.train.lr",
    ),
    "atlas_he": ("model.n_embd", "atlas.he"),
    "atlas_report": ("atlas",),
}


def stage_keys(stage: str, variant: str | None = None) -> list[str]:
    """The params keys ``stage`` declares, with ``{variant}`` filled in."""
    return [k.format(variant=variant) for k in STAGE_PARAMS[stage]]


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names file, line, key."""


class ParamsWarning(UserWarning):
    """A valid setting that is almost surely not what was meant (file, line, key, why)."""


def _where(path: Path, root: Any, loc: tuple[Any, ...]) -> str:
    """'file:line' of ``loc``, or just 'file' when the key is not in the file."""
    line = _line_of(root, loc)
    return f"{path}:{line}" if line else f"{path}"


def _invalid(lines: list[str]) -> ParamsError:
    return ParamsError("invalid parameters:\n  " + "\n  ".join(lines))


def _line_of(root: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest key of ``loc`` found in ruamel's round-trip tree."""
    node, line = root, None
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line, node = node.lc.key(part)[0] + 1, node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, node = node.lc.item(part)[0] + 1, node[part]
        else:
            break
    return line


def _duplicate(path: Path, text: str, err: MarkedYAMLError) -> ParamsError:
    """ruamel's DuplicateKeyError as 'file:line: duplicate key 'a.b' (first at line n)'.

    ruamel marks where the second key starts; its dotted name and the first key's line
    come from the node tree of the same text (composing does not check duplicates).
    """
    at = err.problem_mark.line, err.problem_mark.column
    todo: list[tuple[tuple[str, ...], Any]] = [((), YAML().compose(text))]
    while todo:
        keys, node = todo.pop()
        if isinstance(node, SequenceNode):
            todo += [((*keys, str(i)), v) for i, v in enumerate(node.value)]
        elif isinstance(node, MappingNode):
            for k, v in node.value:
                if (k.start_mark.line, k.start_mark.column) == at:
                    first = next(f for f, _ in node.value if f.value == k.value)
                    return _invalid([
                        f"{path}:{at[0] + 1}: duplicate key {'.'.join((*keys, k.value))!r} "
                        f"(first at line {first.start_mark.line + 1}); DVC refuses the file too: "
                        "keep one of them"
                    ])  # fmt: skip
                todo.append(((*keys, str(k.value)), v))
    return ParamsError(f"{path}:{at[0] + 1}: not valid YAML: {err.problem}")


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``loc`` (for 'did you mean')."""
    model: Any = Params
    parts = list(loc)
    while parts:
        field = getattr(model, "model_fields", {}).get(parts.pop(0))
        if field is None:
            return None
        ann = field.annotation
        if typing.get_origin(ann) is dict:  # dict[str, Model]: skip the entry's name
            ann = typing.get_args(ann)[1]
            if not parts:
                return None
            parts.pop(0)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


# pydantic error type -> what the key expects, for wrong-type messages
_EXPECTED = {
    "int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}  # fmt: skip

_MISSING = object()


def _value_at(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


# Variant keys of the schema before the one network (issue 14), and what replaced them:
# difflib's closest match for them is misleading (w1_scale -> lr_scale).
RENAMED = {
    "w1_scale": "renamed: 'weight_scale' (first_half recipe)",
    "b1_scale": "renamed: 'bias_scale' (first_half recipe)",
    "w2_scale": "renamed: 'out_weight_scale' (first_half recipe)",
    "b2_scale": "renamed: 'out_bias_scale' (first_half recipe)",
    "w1_init": "removed: the init recipe is 'init: first_half' (one hidden layer, the "
    "lecture's first half; 'gain' null is calculate_gain, 'weight_scale' a plain scale) or "
    "'init: second_half'; see docs/experiments.md",
    "deep": "removed: depth is 'layers' and the recipe is 'init'; see docs/experiments.md",
}


def _describe(err: dict[str, Any], loc: tuple[Any, ...], raw: Any) -> str:
    """One line for one pydantic error: the key, its value, what was expected."""
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is VariantConfig and loc[-1] in RENAMED:
            hint = f" ({RENAMED[loc[-1]]})"
        elif parent is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
            if close:
                hint = f" (did you mean {'.'.join(str(p) for p in (*loc[:-1], close[0]))!r}?)"
            else:
                hint = f" (valid keys here: {', '.join(parent.model_fields)})"
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return f"key {key!r} is required but missing"
    value = _value_at(raw, loc)
    if value is _MISSING:
        value = err.get("input")
    if kind in _EXPECTED:
        return f"key {key!r}: expected {_EXPECTED[kind]}, got {value!r} ({type(value).__name__})"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    if isinstance(value, dict) and value:  # a whole section: its key says enough
        return f"key {key!r}: {msg}"
    return f"key {key!r} = {value!r}: {msg}"


def _integral(v: Any) -> Any:
    """An integral float (``2e5``, ``200000.0``: ``dvc exp run -S train.max_steps=2e5``
    writes it so) as an int, which a float field accepts too; through dicts and lists."""
    if isinstance(v, dict):
        return {k: _integral(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_integral(x) for x in v]
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
        return int(v)
    return v


def parse(raw: Any) -> Params:
    """Validate a params mapping as read from a file (``dvc.api.params_show`` gives one
    of another revision) the way the stages do: integral floats as ints, then the
    schema (``charlm.config.Params``). The file-level checks of ``validate`` (every key
    spelled out, addressable variant names, line numbers) need the file.

    Raises:
        pydantic.ValidationError: ``raw`` does not validate.
    """
    return Params.model_validate(_integral(raw))


def _read(path: Path) -> tuple[Any, Any]:
    """The file's values exactly as DVC reads them, and ruamel's round-trip tree of it
    (for line numbers)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ParamsError(f"{path}: cannot read parameters: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text ({e.reason})") from None
    try:
        root = YAML(typ="rt").load(text)
        raw = YAML(typ="safe").load(text)  # dvc.utils.serialize.parse_yaml's loader
    except DuplicateKeyError as e:
        raise _duplicate(path, text, e) from None
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else f"{path}"
        raise ParamsError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw, root


# Sections whose every key params.yaml must spell out, although the library's
# configs have defaults: a deleted line must not silently become a default.
SPELLED_OUT: dict[str, type[BaseModel]] = {
    "split": SplitConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "atlas": AtlasConfig,
}


def _missing(path: Path, raw: Any, root: Any) -> list[str]:
    """'file:line: missing ...' for each section of SPELLED_OUT or key in it that the
    file leaves out (a section of the wrong type is left to the schema's error)."""
    if not isinstance(raw, dict):
        return []
    lines = []
    for section, model in SPELLED_OUT.items():
        given = raw.get(section)
        if given is not None and not isinstance(given, dict):
            continue
        absent = [name for name in model.model_fields if given is None or name not in given]
        if not absent:
            continue
        where = _where(path, root, (section,)) if given is not None else f"{path}"
        if given is None:
            lines.append(
                f"{where}: missing section {section!r} (keys: {', '.join(absent)}); "
                "the params file must spell out every number the pipeline uses"
            )
            continue
        for name in absent:
            default = model.model_fields[name].get_default(call_default_factory=True)
            lines.append(
                f"{where}: missing key '{section}.{name}'; the params file must spell out every "
                f"number the pipeline uses (the lecture's value: {name}: {default!r})"
            )
    return lines


@functools.cache
def _override_parser():  # hydra is imported when a params file is checked
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def unaddressable(name: str) -> str | None:
    """Why ``dvc exp run -S variants.<name>.gain=...`` cannot address variant ``name``
    (None when it can): the override is parsed with Hydra's own parser, the grammar of
    DVC's ``-S``, so the rule cannot drift. '$' is refused too: dvc.yaml pastes the name
    into each stage's shell command (``${key}``)."""
    from hydra.errors import HydraException

    key = f"variants.{name}.gain"
    try:
        parsed = _override_parser().parse_override(f"{key}=1.0")
    except HydraException as e:
        why = str(e)
    else:
        segments = parsed.key_or_group.split(".")
        if segments == ["variants", name, "gain"] and parsed.package is None:
            if "$" not in name:
                return None
            return (
                f"variant name {name!r} contains '$', which the shell would expand in the "
                "stages' commands (dvc.yaml passes --variant ${key})"
            )
        why = f"it reads the key segments {segments} and the package {parsed.package!r}"
    return (
        f"variant name {name!r} cannot be addressed by `dvc exp run -S {key}=...` (Hydra's "
        f"override grammar: {why}); use letters, digits, '_' and '-', starting with a letter "
        "or '_'"
    )


def _names(path: Path, raw: Any, root: Any) -> list[str]:
    """'file:line: ...' for each variant name that ``dvc exp run -S`` cannot address."""
    variants = raw.get("variants") if isinstance(raw, dict) else None
    lines = []
    for name in variants if isinstance(variants, dict) else ():
        why = unaddressable(str(name))
        if why:
            lines.append(f"{_where(path, root, ('variants', name))}: key 'variants.{name}': {why}")
    return lines


def _check(path: str | Path) -> tuple[Params, list[tuple[str, str]]]:
    """Validate; return the params and the advice as (dotted key, 'file:line: ...')."""
    path = Path(path)
    raw, root = _read(path)  # messages quote the values as DVC reads them
    missing = _missing(path, raw, root) + _names(path, raw, root)
    try:
        params = parse(raw)
    except ValidationError as e:
        lines = list(missing)
        for err in e.errors():
            loc = tuple(err["loc"])
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, FieldError):  # a check across fields names its field
                loc = (*loc, *cause.loc)
            lines.append(f"{_where(path, root, loc)}: {_describe(err, loc, raw)}")
        raise _invalid(lines) from None
    if missing:
        raise _invalid(missing)
    advice = []
    for name, variant in params.variants.items():
        for field, msg in variant.advice():
            loc = ("variants", name, field)
            where = _where(path, root, loc)
            advice.append((".".join(loc), f"{where}: key {'.'.join(loc)!r}: {msg}"))
    return params, advice


def validate(path: str | Path) -> Params:
    """Read and validate the whole params file; warn (ParamsWarning) about settings
    that are valid but almost surely not meant.

    Raises:
        ParamsError: naming the file, the line and the key of each problem.
    """
    params, advice = _check(path)
    for _, text in advice:
        warnings.warn(text, ParamsWarning, stacklevel=2)
    return params


def get(params: Params, key: str) -> Any:
    """The value at dotted ``key`` (``'variants.kaiming'``), recorded in HANDED_OUT."""
    node: Any = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    HANDED_OUT.add(key)
    return node


def load(path: str | Path, keys: list[str]) -> dict[str, Any]:
    """Validate ``path`` and return ``{key: value}`` for exactly the declared ``keys``.

    Warns (ParamsWarning) about doubtful settings under those keys only.

    Raises:
        ParamsError: the file is invalid, or a key names no section or variant.
    """
    params, advice = _check(path)
    out = {}
    for key in keys:
        try:
            out[key] = get(params, key)
        except (KeyError, AttributeError):
            raise ParamsError(f"{path}: no key {key!r}") from None
    for where, text in advice:
        if any(where == k or where.startswith(k + ".") for k in keys):
            warnings.warn(text, ParamsWarning, stacklevel=2)
    return out


def main() -> None:
    """``python -m pipeline.params [params.yaml]``: check the whole file, print a summary.

    ``make repro`` runs this before ``dvc repro``, so that a typo is reported before
    DVC starts removing the outputs of the stages it is about to rerun.
    """
    import argparse

    parser = argparse.ArgumentParser(description="Check a params file against the schema.")
    parser.add_argument("path", nargs="?", default="params.yaml")
    args = parser.parse_args()
    p = validate(args.path)
    print(f"{args.path}: valid ({len(p.variants)} variants: {', '.join(p.variants)})")


if __name__ == "__main__":
    from pipeline import outputs

    outputs.run(main)
