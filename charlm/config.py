"""Typed, validated configuration of the model, one variant and the training run.

These pydantic models are what the stages build from params.yaml and hand to the
library; they read no files. Unknown keys are rejected (``extra='forbid'``), every
field is strictly typed (an int is accepted where a float is expected, not the reverse)
and NaN or infinite numbers are refused, so a typo or a wrong type fails with the key's
name. A check that involves several fields raises ``FieldError`` naming the field to
change, so that the error can point at its line in params.yaml.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Names accepted by torch.nn.init.calculate_gain without an extra parameter.
NONLINEARITIES = (
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "sigmoid", "tanh", "relu", "selu",
)  # fmt: skip


# Momentum above this is almost surely meant in the Keras convention (see advice()).
MOMENTUM_WARN = 0.5


class FieldError(ValueError):
    """A failed check that belongs to one field (``key``, dotted, relative to the model;
    a tuple of keys when one holds a '.', as a mapping's entry name may)."""

    def __init__(self, key: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.key = key
        self.loc = tuple(key.split(".")) if isinstance(key, str) else key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Sizes of the MLP: embedding width n_embd and hidden width n_hidden."""

    n_embd: int = Field(10, ge=1)
    n_hidden: int = Field(200, ge=1)


class VariantConfig(_Strict):
    """How one variant initialises and normalises its hidden layer.

    Draw order and scales follow DESIGN.md ("init"): every tensor is drawn N(0, 1) from
    the seed's generator, then multiplied by its scale. W1's scale is ``w1_scale`` when
    ``w1_init == 'normal'`` and ``gain / sqrt(fan_in)`` when ``w1_init == 'kaiming'``
    (He et al. 2015, "Delving Deep into Rectifiers", eq. 10, with the gain of
    ``torch.nn.init.calculate_gain``). With ``batchnorm`` the hidden bias b1 is neither
    drawn nor used; BatchNorm's gain starts at 1 and its bias at 0.
    """

    w1_init: Literal["normal", "kaiming"] = "kaiming"
    gain: float | str = "tanh"
    w1_scale: float = Field(1.0, ge=0.0)
    b1_scale: float = Field(0.01, ge=0.0)
    w2_scale: float = Field(0.01, ge=0.0)
    b2_scale: float = Field(0.0, ge=0.0)
    batchnorm: bool = False
    momentum: float = Field(0.001, gt=0.0, le=1.0)
    lr_scale: float = Field(1.0, gt=0.0)

    @field_validator("gain", mode="before")
    @classmethod
    def _check_gain(cls, v: object) -> object:
        # before the union's own validation, so that a bad gain gives one clear error
        names = ", ".join(NONLINEARITIES)
        if isinstance(v, str):
            if v not in NONLINEARITIES:
                raise ValueError(f"gain must be a number > 0 or one of {names}; got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(
                f"gain must be a number > 0 or one of {names}; got {v!r} ({type(v).__name__})"
            )
        elif not (v > 0 and math.isfinite(v)):
            raise ValueError(f"gain must be a finite number > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check_unused(self) -> VariantConfig:
        unused = []
        if self.w1_init == "kaiming" and "w1_scale" in self.model_fields_set:
            unused.append("w1_scale (used only when w1_init is 'normal'; set gain instead)")
        if self.w1_init == "normal" and "gain" in self.model_fields_set:
            unused.append("gain (used only when w1_init is 'kaiming'; set w1_scale instead)")
        if self.batchnorm and "b1_scale" in self.model_fields_set:
            unused.append("b1_scale (a BatchNorm variant has no b1)")
        if not self.batchnorm and "momentum" in self.model_fields_set:
            unused.append("momentum (used only when batchnorm is true)")
        if unused:
            raise FieldError(
                unused[0].split()[0],
                "key(s) that this variant would ignore: " + "; ".join(unused),
            )
        return self

    def advice(self) -> list[tuple[str, str]]:
        """Settings that are valid but almost surely not meant: (field, message) pairs.

        ``momentum`` above 0.5: BatchNorm1d here follows PyTorch's convention,
        running = (1 - momentum) * running + momentum * batch, where the lecture's
        update is momentum = 0.001; Keras writes the same update as momentum = 0.999.
        """
        out = []
        m = self.momentum
        if self.batchnorm and m > MOMENTUM_WARN:
            meant = f"{m} meant as {1 - m:.6g}" if m < 1 else "1 would mean no update at all"
            out.append(
                (
                    "momentum",
                    f"momentum {m} is almost surely the Keras convention: {meant}. Here "
                    "running = (1 - momentum) * running + momentum * batch (PyTorch's "
                    "convention); the lecture's running = 0.999 * running + 0.001 * batch "
                    "is momentum: 0.001",
                )
            )
        return out

    @property
    def gain_value(self) -> float:
        """The gain as a number: ``calculate_gain(name)`` for a name (tanh -> 5/3)."""
        if isinstance(self.gain, str):
            return float(torch.nn.init.calculate_gain(self.gain))
        return float(self.gain)


class TrainConfig(_Strict):
    """The SGD run: seeds, steps, batch size and the step learning-rate schedule.

    The learning rate is ``lr`` for steps < ``lr_decay_step`` and ``lr_decayed`` after
    (DESIGN.md: 0.1, then 0.01 from step 100,000 of 200,000).
    """

    seeds: list[int] = Field(default_factory=lambda: [2147483647], min_length=1)
    max_steps: int = Field(200_000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0.0)
    lr_decay_step: int = Field(100_000, ge=0)
    lr_decayed: float = Field(0.01, gt=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    record_every: int = Field(1000, ge=1)

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        for s in v:
            if not 0 <= s < 2**63:
                raise ValueError(f"seed {s} is outside [0, 2**63)")
        return v

    @model_validator(mode="after")
    def _check_decay(self) -> TrainConfig:
        if self.lr_decay_step > self.max_steps:
            raise FieldError(
                "lr_decay_step",
                f"lr_decay_step ({self.lr_decay_step}) must lie inside the run "
                f"(<= max_steps = {self.max_steps})",
            )
        return self

    def lr_at(self, step: int, lr_scale: float = 1.0) -> float:
        """Learning rate at ``step`` (0-based), times the variant's ``lr_scale``."""
        return (self.lr if step < self.lr_decay_step else self.lr_decayed) * lr_scale


# ---------------------------------------------------------------- pipeline sections
# The rest of params.yaml: what the data, split, evaluate and report stages read, and
# the whole file (``Params``). pipeline.params reads the YAML and validates it here.


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


@functools.cache
def _override_parser():  # hydra is imported when a params file is checked
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def unaddressable(name: str) -> str | None:
    """Why ``dvc exp run -S variants.<name>.gain=...`` cannot address the variant
    ``name``, or None when it can.

    DVC parses ``-S`` with Hydra's override grammar (hydra/grammar/OverrideLexer.g4):
    a key is '.'-separated segments, each a letter, '_' or '$' then letters, digits,
    '_', '-' or '$', or an integer without leading zeros. The name is tried with
    Hydra's own parser, so the rule cannot drift from what DVC accepts. '$' is refused
    as well: dvc.yaml pastes the name into each stage's shell command (``${key}``).
    """
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
            why = unaddressable(name)
            if why:
                raise FieldError((name,), why)
        return v

    @model_validator(mode="after")
    def _check_batchnorm_batch(self) -> Params:
        for name, v in self.variants.items():
            if v.batchnorm and self.train.batch_size < 2:
                raise FieldError(
                    "train.batch_size",
                    f"variants.{name} uses BatchNorm, which needs train.batch_size >= 2 "
                    f"(got {self.train.batch_size})",
                )
        return self
