"""Typed, validated configuration of the model, one variant and the training run.

These pydantic models are what the stages build from params.yaml and hand to the
library; they read no files. Unknown keys are rejected (``extra='forbid'``), every
field is strictly typed (an int is accepted where a float is expected, not the reverse)
and NaN or infinite numbers are refused, so a typo or a wrong type fails with the key's
name. A check that involves several fields raises ``FieldError`` naming the field to
change, so that the error can point at its line in params.yaml.
"""

from __future__ import annotations

import math
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
    """A failed check that belongs to one field (``key``, dotted, relative to the model)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


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
