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
import re
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The hidden nonlinearities a variant (or an atlas cell) may use: charlm.layers.NONLINEARITIES.
Nonlinearity = Literal["tanh", "relu", "linear", "sigmoid", "gelu"]

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
    """How one variant builds, initialises and trains its network: three separate parts.

    Architecture (``charlm.model.MLP``): ``layers`` hidden blocks Linear ->
    [BatchNorm1d] -> ``nonlinearity`` of ``n_hidden`` units (default
    ``model.n_hidden``), then an output Linear -> [BatchNorm1d if ``batchnorm_output``].
    A Linear followed by BatchNorm has no bias. BatchNorm's ``batchnorm_form`` is the
    lecture's second half ('var': unbiased variance + ``eps``, running variance) or its
    first half ('std': unbiased std, no eps, running std), each with PyTorch's momentum
    convention (``charlm.layers.BatchNorm1d``); ``momentum`` defaults to PyTorch's 0.1.

    Init recipe (``charlm.init.RECIPES``): ``init`` names it. 'first_half' draws every
    tensor N(0, 1) and scales it: hidden weights by ``weight_scale`` or, when null,
    ``gain / sqrt(fan_in)`` (Kaiming), hidden biases by ``bias_scale``, the output
    weight and bias by ``out_weight_scale`` and ``out_bias_scale``. 'second_half' draws
    each Linear weight ``randn / sqrt(fan_in)``, zero biases, multiplies the last layer
    (its BatchNorm's gamma, or its weight) by ``last_scale`` and the other weights by
    ``gain``. ``gain`` null means ``torch.nn.init.calculate_gain(nonlinearity)``: 5/3
    for tanh, sqrt(2) for relu, 1 for linear and sigmoid; gelu has no entry there, so
    a gelu variant must give a number.

    Training: ``train`` overrides keys of the global ``train`` section for this variant
    only (``train_config``); ``lr_scale`` multiplies its learning rates.

    Depth never changes the recipe, the BatchNorm form or its momentum, and every
    nonlinearity works at every depth. A key that the variant's choices would ignore
    (a first-half scale under the second-half recipe, ``eps`` of the 'std' form,
    ``gain`` beside ``weight_scale``, ...) is an error, not silently dropped.
    """

    # architecture
    layers: int = Field(1, ge=1)
    n_hidden: int | None = Field(None, ge=1)
    nonlinearity: Nonlinearity = "tanh"
    batchnorm: bool = False
    batchnorm_output: bool = False
    batchnorm_form: Literal["var", "std"] = "var"
    momentum: float = Field(0.1, gt=0.0, le=1.0)
    eps: float | None = Field(None, ge=0.0)
    # init recipe
    init: Literal["first_half", "second_half"] = "second_half"
    gain: float | None = None
    weight_scale: float | None = Field(None, ge=0.0)
    bias_scale: float = Field(0.01, ge=0.0)
    out_weight_scale: float = Field(0.01, ge=0.0)
    out_bias_scale: float = Field(0.0, ge=0.0)
    last_scale: float = Field(0.1, ge=0.0)
    # training
    lr_scale: float = Field(1.0, gt=0.0)
    train: dict[str, Any] | None = None

    @field_validator("gain", mode="before")
    @classmethod
    def _check_gain(cls, v: object) -> object:
        # before the union's own validation, so that a bad gain gives one clear error
        if v is None:
            return v
        if isinstance(v, str):
            raise ValueError(
                f"gain must be a number > 0 or null (null: calculate_gain(nonlinearity), "
                f"e.g. 5/3 for tanh); got the string {v!r}: write null instead of a name"
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"gain must be a number > 0 or null; got {v!r} ({type(v).__name__})")
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"gain must be a finite number > 0, got {v}")
        return float(v)

    @field_validator("train")
    @classmethod
    def _check_train_keys(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            unknown = sorted(set(v) - set(TrainConfig.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown train key(s) {unknown}; known: {list(TrainConfig.model_fields)}"
                )
        return v

    @property
    def has_batchnorm(self) -> bool:
        """True if any layer is normalised (``batchnorm`` or ``batchnorm_output``)."""
        return self.batchnorm or self.batchnorm_output

    @model_validator(mode="after")
    def _check_unused(self) -> VariantConfig:
        given, unused = self.model_fields_set, []
        other = {"first_half": "second_half", "second_half": "first_half"}[self.init]
        for key in RECIPE_KEYS[other] - RECIPE_KEYS[self.init]:
            if key in given:
                unused.append(f"{key} (init: {other} only; this variant's init is {self.init})")
        if self.init == "first_half" and self.weight_scale is not None and "gain" in given:
            unused.append("gain (weight_scale sets the hidden weights' std; drop one)")
        if self.init == "first_half" and self.batchnorm and "bias_scale" in given:
            unused.append("bias_scale (hidden Linears before BatchNorm have no bias)")
        if not self.has_batchnorm:
            for key in ("batchnorm_form", "momentum", "eps"):
                if key in given:
                    unused.append(f"{key} (used only with BatchNorm)")
        elif self.batchnorm_form == "std" and "eps" in given:
            unused.append("eps (the 'std' form has no eps)")
        if unused:
            raise FieldError(
                unused[0].split()[0],
                "key(s) that this variant would ignore: " + "; ".join(unused),
            )
        return self

    def advice(self) -> list[tuple[str, str]]:
        """Settings that are valid but almost surely not meant: (field, message) pairs.

        ``momentum`` above 0.5: BatchNorm here follows PyTorch's convention,
        running = (1 - momentum) * running + momentum * batch, where the lecture's
        update is momentum = 0.001 (first half) or 0.1 (second half); Keras writes the
        former as momentum = 0.999.
        """
        out = []
        m = self.momentum
        if self.has_batchnorm and m > MOMENTUM_WARN:
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
        """The gain as a number: ``gain``, or for null ``calculate_gain(nonlinearity)``
        (gelu, which torch lacks: ``charlm.theory.default_gain``, 1.5335)."""
        if self.gain is not None:
            return float(self.gain)
        if self.nonlinearity == "gelu":
            from charlm.theory import default_gain  # scipy: only for gelu

            return default_gain("gelu")
        return float(torch.nn.init.calculate_gain(self.nonlinearity))

    @property
    def eps_value(self) -> float:
        """BatchNorm's eps under the square root ('var' form): ``eps``, else 1e-5."""
        return 1e-5 if self.eps is None else self.eps

    def hidden_size(self, model: ModelConfig) -> int:
        """Units per hidden layer: the variant's ``n_hidden``, else ``model.n_hidden``."""
        return model.n_hidden if self.n_hidden is None else self.n_hidden

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with this variant's ``train`` overrides; validated by TrainConfig.

        Raises:
            pydantic.ValidationError or FieldError: an override of the wrong type or
            out of range (e.g. ``max_steps`` 0).
        """
        if not self.train:
            return base
        return TrainConfig.model_validate({**base.model_dump(), **self.train})


# The keys each init recipe reads (besides gain): a key of the other recipe is an error.
RECIPE_KEYS = {
    "first_half": {"weight_scale", "bias_scale", "out_weight_scale", "out_bias_scale"},
    "second_half": {"last_scale"},
}


class TrainConfig(_Strict):
    """The SGD run: seeds, steps, batch size and the step learning-rate schedule.

    The learning rate is ``lr`` for steps < ``lr_decay_step`` and ``lr_decayed`` after
    (DESIGN.md: 0.1, then 0.01 from step 100,000 of 200,000). ``lr_decay_step >=
    max_steps`` is allowed and means the run never decays: the deep variants keep the
    lecture's decay at step 150,000 whatever their length, so that a shortened run (e.g.
    the lecture's 1,001 steps) is the first part of the full one.

    ``kernels`` picks, for the ops that have two (tanh; the 'var' BatchNorm's variance
    and backward), 'exact' (autograd's kernels in autograd's order: bitwise the
    lecture's loop) or 'fast' (tanh as 2 sigmoid(2x) - 1, float32 variance, the
    closed-form backward: within ~1e-6 relative, faster); see ``charlm.ops``.
    """

    seeds: list[int] = Field(default_factory=lambda: [2147483647], min_length=1)
    max_steps: int = Field(200_000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0.0)
    lr_decay_step: int = Field(100_000, ge=0)
    lr_decayed: float = Field(0.01, gt=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    record_every: int = Field(1000, ge=1)
    kernels: Literal["exact", "fast"] = "exact"

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        for s in v:
            if not 0 <= s < 2**63:
                raise ValueError(f"seed {s} is outside [0, 2**63)")
        return v

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


def _distinct(v: list) -> list:
    if len(set(v)) != len(v):
        raise ValueError(f"entries must be distinct, got {v}")
    return v


# list entries of the atlas's grids: a depth or width is a count of layers or units, a
# gain scales a std (a gain <= 0 would flip or zero every weight)
Depth = Annotated[int, Field(ge=1)]
Width = Annotated[int, Field(ge=1)]
Gain = Annotated[float, Field(gt=0.0)]


class AtlasWidthConfig(_Strict):
    """The atlas's width sweep: signal propagation at init for one depth and
    nonlinearity, without BatchNorm, over ``widths`` (finite-width corrections to the
    mean-field theory shrink as the width grows). Gains: ``gain_factors`` x the
    nonlinearity's ``calculate_gain``."""

    depth: int = Field(8, ge=1)
    nonlinearity: Nonlinearity = "tanh"
    widths: list[Width] = Field(default_factory=lambda: [25, 100, 400, 1600], min_length=1)
    gain_factors: list[Gain] = Field(default_factory=lambda: [0.6, 1.0], min_length=1)

    @field_validator("widths")
    @classmethod
    def _check_distinct(cls, v: list) -> list:
        return _distinct(v)


class AtlasTrainConfig(_Strict):
    """The trainability map: short training runs over depth x gain for every
    (nonlinearity, BatchNorm) family, each model classified trained / stalled /
    diverged (``charlm.trainability``). Constant ``lr``, no decay; the engine's fast
    kernels. Gains: ``gain_factors`` x ``calculate_gain`` plus atlas.extra_gains."""

    depths: list[Depth] = Field(default_factory=lambda: [1, 4, 16], min_length=1)
    nonlinearities: list[Nonlinearity] = Field(
        default_factory=lambda: ["tanh", "relu"], min_length=1
    )
    batchnorm: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    width: int = Field(100, ge=1)
    gain_factors: list[Gain] = Field(
        default_factory=lambda: [0.5, 0.75, 1.0, 1.5, 2.0], min_length=1
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(0.1, gt=0.0)

    @field_validator("depths", "nonlinearities", "batchnorm", "seeds")
    @classmethod
    def _check_distinct(cls, v: list) -> list:
        return _distinct(v)


class AtlasHeConfig(_Strict):
    """He et al. 2015's analogue (sec. 2.2, figs. 2-3): a relu net of ``depth`` hidden
    layers without BatchNorm, trained at each of ``gains`` (1: their "Xavier" std
    sqrt(1/fan_in); sqrt 2: theirs) at ``lr``, and both arms again at ``lower_lr`` (the
    page uses the lower lr when an arm diverges at ``lr``, and says so)."""

    depth: int = Field(30, ge=1)
    width: int = Field(100, ge=1)
    gains: list[Gain] = Field(default_factory=lambda: [1.0, 2.0**0.5], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0.0)
    lower_lr: float = Field(0.01, gt=0.0)

    @field_validator("gains", "seeds")
    @classmethod
    def _check_distinct(cls, v: list) -> list:
        return _distinct(v)


class AtlasConfig(_Strict):
    """The depth atlas (issue 15; docs/atlas.md): signal propagation at init over
    depth x nonlinearity x BatchNorm x width x gain x seed on real minibatches of the
    training split, a width sweep, trainability runs and He et al.'s analogue.

    One architecture (depth, nonlinearity, BatchNorm, width) is one cell: all its
    gains x seeds are one batched model. The DVC stages are matrices over the depth
    lists, so adding a depth reruns only that depth's cells. Gains of a nonlinearity:
    ``gain_factors`` x its ``calculate_gain`` (``charlm.theory.default_gain``) plus
    ``extra_gains``. The init recipe is 'second_half' (W ~ N(0, gain^2 / fan_in), zero
    biases, the output layer x 0.1), the theory's assumptions for hidden layers.
    """

    depths: list[Depth] = Field(default_factory=lambda: [1, 4, 16, 64], min_length=1)
    nonlinearities: list[Nonlinearity] = Field(
        default_factory=lambda: ["tanh", "relu", "linear", "sigmoid", "gelu"], min_length=1
    )
    batchnorm: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    widths: list[Width] = Field(default_factory=lambda: [100], min_length=1)
    gain_factors: list[float] = Field(
        default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 2.0], min_length=1
    )
    extra_gains: list[float] = Field(default_factory=lambda: [1.0])
    seeds: list[int] = Field(default_factory=lambda: list(range(10)), min_length=1)
    init_batches: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2)
    batch_seed: int = 1234
    threshold: float = Field(0.97, gt=0.0, lt=1.0)
    width_sweep: AtlasWidthConfig = AtlasWidthConfig()
    train: AtlasTrainConfig = AtlasTrainConfig()
    he: AtlasHeConfig = AtlasHeConfig()

    @field_validator("depths", "nonlinearities", "batchnorm", "widths", "seeds")
    @classmethod
    def _check_distinct(cls, v: list) -> list:
        return _distinct(v)

    @field_validator("gain_factors", "extra_gains")
    @classmethod
    def _check_positive(cls, v: list[float]) -> list[float]:
        if any(g <= 0 for g in v):
            raise ValueError(f"gains must be > 0, got {v}")
        return v


class Params(_Strict):
    data: DataConfig
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    variants: dict[str, VariantConfig] = Field(min_length=1)
    report: ReportConfig = ReportConfig()
    atlas: AtlasConfig = AtlasConfig()

    @model_validator(mode="after")
    def _check_batchnorm_batch(self) -> Params:
        for name, v in self.variants.items():
            try:  # the variant's train overrides, merged over the global section
                train = v.train_config(self.train)
            except (ValueError, FieldError) as e:
                raise FieldError(f"variants.{name}.train", f"variants.{name}.train: {e}") from e
            if v.has_batchnorm and train.batch_size < 2:
                raise FieldError(
                    "train.batch_size",
                    f"variants.{name} uses BatchNorm, which needs train.batch_size >= 2 "
                    f"(got {train.batch_size})",
                )
        return self
