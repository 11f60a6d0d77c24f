"""Load params.yaml into validated pydantic objects and hand each stage its own keys.

``load(path, keys)`` validates the whole file first (so a typo anywhere fails before
any work starts, naming the file, line and key), then returns only the sections listed
in ``keys`` -- the same keys the stage declares under ``params:`` in dvc.yaml.
Every key handed out is recorded in ``HANDED_OUT`` so a test can prove that each
stage declares everything it reads.

Numbers are read as ``dvc exp run -S`` and YAML writers write them: scientific
notation that YAML 1.1 leaves as a string (``1e-05``, ``5e-1``, ``1e5``) is a number,
and an integral float (``200000.0``) is accepted where an integer is expected.
Duplicate keys, which YAML would silently resolve to the last one, are an error.
"""

from __future__ import annotations

import difflib
import re
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from charlm.config import FieldError, ModelConfig, TrainConfig, VariantConfig, _Strict

HANDED_OUT: set[str] = set()


class DataConfig(_Strict):
    url: str
    sha256: str

    @field_validator("sha256", mode="before")
    @classmethod
    def _check_sha256(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", v):
                raise ValueError(
                    "sha256 must be 64 hexadecimal digits, as `sha256sum names.txt` prints"
                )
        return v


class SplitConfig(_Strict):
    seed: int = 42
    train_frac: float = Field(0.8, gt=0.0, lt=1.0)
    val_frac: float = Field(0.1, gt=0.0, lt=1.0)
    block_size: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check_sum(self) -> SplitConfig:
        if self.train_frac + self.val_frac >= 1.0:
            raise FieldError(
                "val_frac",
                f"train_frac + val_frac must be < 1 to leave a test split, "
                f"got {self.train_frac} + {self.val_frac}",
            )
        return self


class EvaluateConfig(_Strict):
    probe_seed: int = 7
    probe_size: int = Field(32, ge=2)
    sample_seed: int = 2147483657
    n_samples: int = Field(20, ge=0)
    n_novelty: int = Field(1000, ge=0)
    curve_window: int = Field(1000, ge=1)
    saturation: list[float] = Field(default_factory=lambda: [0.97, 0.99], min_length=1)

    @field_validator("saturation")
    @classmethod
    def _check_saturation(cls, v: list[float]) -> list[float]:
        for t in v:
            if not 0.0 < t < 1.0:
                raise ValueError(f"each saturation threshold must lie in (0, 1), got {t}")
        return v


class Reference(_Strict):
    init_loss: float | None = None
    train: float | None = None
    val: float | None = None
    test: float | None = None
    tol: float = Field(1e-4, gt=0.0)


class ReportConfig(_Strict):
    reference: dict[str, Reference] = Field(default_factory=dict)


class Params(_Strict):
    data: DataConfig
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    variants: dict[str, VariantConfig] = Field(min_length=1)
    report: ReportConfig = ReportConfig()

    @field_validator("variants")
    @classmethod
    def _check_names(cls, v: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise FieldError(name, f"variant name {name!r} must be letters, digits, '_' or '-'")
        return v

    @model_validator(mode="after")
    def _check_batchnorm_batch(self) -> Params:
        for name, v in self.variants.items():
            try:  # the variant's train overrides, merged over the global section
                train = v.train_config(self.train)
            except (ValueError, FieldError) as e:
                raise FieldError(f"variants.{name}.train", f"variants.{name}.train: {e}") from e
            if (v.batchnorm or v.batchnorm_output) and train.batch_size < 2:
                raise FieldError(
                    "train.batch_size",
                    f"variants.{name} uses BatchNorm, which needs train.batch_size >= 2 "
                    f"(got {train.batch_size})",
                )
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names file, line, key."""


class ParamsWarning(UserWarning):
    """A valid setting that is almost surely not what was meant (file, line, key, why)."""


def _where(path: Path, root: yaml.Node | None, loc: tuple[Any, ...]) -> str:
    """'file:line' of ``loc``, or just 'file' when the key is not in the file."""
    line = _line_of(root, loc)
    return f"{path}:{line}" if line else f"{path}"


def _invalid(lines: list[str]) -> ParamsError:
    return ParamsError("invalid parameters:\n  " + "\n  ".join(lines))


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node of ``loc`` found in the YAML node tree."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _duplicates(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """(line, message) for every key given twice in one mapping."""
    out = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key, line = str(k.value), k.start_mark.line + 1
            dotted = ".".join((*prefix, key))
            if key in seen:
                out.append(
                    (
                        line,
                        f"duplicate key {dotted!r} (first at line {seen[key]}); "
                        "YAML would silently keep only the last one",
                    )
                )
            else:
                seen[key] = line
            out += _duplicates(v, (*prefix, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicates(v, (*prefix, str(i)))
    return out


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


def _describe(err: dict[str, Any], loc: tuple[Any, ...], raw: Any) -> str:
    """One line for one pydantic error: the key, its value, what was expected."""
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is not None:
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
    return f"key {key!r} = {value!r}: {msg}"


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(v: Any) -> Any:
    """Numbers as ``dvc exp run -S`` and YAML writers write them, read as numbers.

    Scientific notation that YAML 1.1 leaves as a string (``1e5``, ``5e-1``,
    ``1e-05``) becomes a float, and an integral float (``2e5``, ``200000.0`` -- dvc
    writes ``-S train.max_steps=2e5`` so) becomes an int, which a float field accepts
    too. Applies to every value of nested dicts and lists.
    """
    if isinstance(v, dict):
        return {k: _number(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_number(x) for x in v]
    if isinstance(v, str) and _SCI.match(v.strip()):
        v = float(v)
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
        return int(v)
    return v


def _read(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ParamsError(f"{path}: cannot read parameters: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text ({e.reason})") from None
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else f"{path}"
        raise ParamsError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    dups = _duplicates(root)
    if dups:
        raise _invalid([f"{path}:{line}: {msg}" for line, msg in dups])
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    # data holds strings only (a sha256 of digits and one 'e' must stay a string)
    return {k: v if k == "data" else _number(v) for k, v in raw.items()}, root


# Sections whose every key params.yaml must spell out, although the library's
# configs have defaults: a deleted line must not silently become a default.
SPELLED_OUT: dict[str, type[BaseModel]] = {
    "split": SplitConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}


def _missing(path: Path, raw: Any, root: yaml.Node | None) -> list[str]:
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


def _check(path: str | Path) -> tuple[Params, list[tuple[str, str]]]:
    """Validate; return the params and the advice as (dotted key, 'file:line: ...')."""
    path = Path(path)
    raw, root = _read(path)
    missing = _missing(path, raw, root)
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        lines = list(missing)
        for err in e.errors():
            loc = tuple(err["loc"])
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, FieldError):  # a check across fields names its field
                loc = (*loc, *cause.key.split("."))
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
    """``python -m stages.params [params.yaml]``: check the whole file, print a summary.

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
    from stages import io

    io.run(main)
