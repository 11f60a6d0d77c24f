"""Load params.yaml into validated pydantic objects and hand each stage its own keys.

``load(path, keys)`` validates the whole file first (so a typo anywhere fails before
any work starts, naming the file, line and key), then returns only the sections listed
in ``keys`` -- the same keys the stage declares under ``params:`` in dvc.yaml.
Every key handed out is recorded in ``HANDED_OUT`` so a test can prove that each
stage declares everything it reads.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from charlm.config import ModelConfig, TrainConfig, VariantConfig, _Strict

HANDED_OUT: set[str] = set()


class DataConfig(_Strict):
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SplitConfig(_Strict):
    seed: int = 42
    train_frac: float = Field(0.8, gt=0.0, lt=1.0)
    val_frac: float = Field(0.1, gt=0.0, lt=1.0)
    block_size: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check_sum(self) -> SplitConfig:
        if self.train_frac + self.val_frac >= 1.0:
            raise ValueError(
                f"train_frac + val_frac must be < 1 to leave a test split, "
                f"got {self.train_frac} + {self.val_frac}"
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
                raise ValueError(f"variant name {name!r} must be letters, digits, '_' or '-'")
        return v

    @model_validator(mode="after")
    def _check_batchnorm_batch(self) -> Params:
        for name, v in self.variants.items():
            if v.batchnorm and self.train.batch_size < 2:
                raise ValueError(
                    f"variants.{name} uses BatchNorm, which needs train.batch_size >= 2 "
                    f"(got {self.train.batch_size})"
                )
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names file, line, key."""


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node of ``loc`` found in the YAML node tree."""
    node, line = root, None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(part):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


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


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
            if close:
                hint = f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))!r}?)"
            else:
                hint = f" (valid keys: {', '.join(parent.model_fields)})"
        return f"unknown key {key!r}{hint}"
    value = err.get("input")
    msg = err["msg"]
    if err["type"] in ("int_type", "float_type", "bool_type", "string_type", "int_parsing",
                       "float_parsing", "bool_parsing", "int_from_float", "literal_error"):
        return f"key {key!r}: value {value!r} ({type(value).__name__}) is invalid: {msg}"
    if not loc:
        return msg.removeprefix("Value error, ")
    return f"key {key!r}: {msg.removeprefix('Value error, ')} (value {value!r})"


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(v: Any) -> Any:
    """Read scientific notation that YAML 1.1 leaves as a string (``1e5``, ``5e-1``,
    as ``dvc exp run -S`` may write them) as a number; integral values without a
    decimal point or negative exponent (``2e5``) become ints."""
    if isinstance(v, dict):
        return {k: _number(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_number(x) for x in v]
    if isinstance(v, str) and _SCI.match(v.strip()):
        f = float(v)
        mantissa, exponent = v.strip().lower().split("e")
        return int(f) if "." not in mantissa and not exponent.startswith("-") else f
    return v


def validate(path: str | Path) -> Params:
    """Read and validate the whole params file.

    Raises:
        ParamsError: naming the file, the line and the key of each problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ParamsError(f"{path}: cannot read parameters: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(_number(raw))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            line = _line_of(root, tuple(err["loc"]))
            where = f"{path}:{line}" if line else f"{path}"
            lines.append(f"{where}: {_describe(err)}")
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines)) from None


def get(params: Params, key: str) -> Any:
    """The value at dotted ``key`` (``'variants.kaiming'``), recorded in HANDED_OUT."""
    node: Any = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    HANDED_OUT.add(key)
    return node


def load(path: str | Path, keys: list[str]) -> dict[str, Any]:
    """Validate ``path`` and return ``{key: value}`` for exactly the declared ``keys``.

    Raises:
        ParamsError: the file is invalid, or a key names no section or variant.
    """
    params = validate(path)
    out = {}
    for key in keys:
        try:
            out[key] = get(params, key)
        except (KeyError, AttributeError):
            raise ParamsError(f"{path}: no key {key!r}") from None
    return out
