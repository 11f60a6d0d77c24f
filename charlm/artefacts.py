"""Typed records of what the evaluate stage hands to the report: diagnostics.pt.

One ``Diagnostics`` per variant, for S stacked models (one per seed). Hidden layers
are a list (input side first) and weight matrices a mapping keyed by the model's own
parameter names (``named_parameters()``), so a network of N layers fills the same
records as today's one-layer MLP. Not to be confused with pipeline/records.py, the
stages' run records (wall time, revision).

On disk the records are plain containers (dict, list, str, int, float, None and
tensors), which ``torch.load(path, weights_only=True)`` reads without unpickling any
class; ``to_state`` and ``from_state`` convert, and ``from_state`` refuses any other
``FORMAT``. This module does no file I/O.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT = 6  # the layout of diagnostics.pt; bump it with every change of these records


class Record(BaseModel):
    """Base: tensors allowed (checked with isinstance), unknown keys refused."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


class Curve(Record):
    """Training loss, mean of log10(minibatch loss) over windows of ``window`` steps."""

    window: int
    step: torch.Tensor  # int64 (W,), first step of each window
    log10_loss: torch.Tensor  # float64 (W, S); non-finite where a seed diverged


class InitLoss(Record):
    """Why the step-0 loss is what it is (``charlm.diagnostics.initial_logits``).

    Lists of S floats except ``uniform`` = ln V (nats) and ``output_weight``, the name
    of the matrix that maps the last hidden layer to the logits.
    """

    step0: list[float]  # the first training minibatch's loss, nats
    uniform: float
    loss: list[float]  # loss on the probe batch, training mode
    logits_std: list[float]
    logits_std_predicted: list[float]
    p_target_median: list[float]
    p_max: list[float]
    h_rms: list[float]
    output_weight: str
    output_weight_std: list[float]


class Activations(Record):
    """One hidden layer on the probe batch at one moment (P examples, H units)."""

    hpreact: torch.Tensor  # float32 (S, P, H), pre-activations
    h: torch.Tensor  # float32 (S, P, H), the nonlinearity's outputs
    # threshold (as '0.97') -> S shares saturated (diagnostics.saturated: tanh |h| > t,
    # sigmoid |2h - 1| > t, relu h == 0); empty for linear and gelu
    saturated: dict[str, list[float]]
    dead: list[int] | None  # S counts of units saturated (relu: zero) on every example
    hpreact_mean: list[float]
    hpreact_std: list[float]
    image: torch.Tensor | None  # bool (S, P, H), saturated at the largest threshold


class Layer(Record):
    """One hidden layer: its activations by moment, and the gradient at its output."""

    activations: dict[str, Activations]  # 'init' (step-0 forward, training mode), 'final'
    dh: torch.Tensor  # float32 (S, P, H), dloss/dh at init on the probe batch


class Weight(Record):
    """One weight matrix (per model a 2-d parameter), named as in ``named_parameters()``."""

    grad_mean: torch.Tensor  # float32 (S,), at init on the probe batch
    grad_std: torch.Tensor  # float32 (S,)
    grad_data_ratio: torch.Tensor  # float32 (S,), std(grad) / std(weight)
    update_ratio: torch.Tensor | None  # float32 (R, S), log10(std(lr*grad)/std(w)), or None


class BatchNormLayer(Record):
    """One BatchNorm module (named as in ``named_modules()``): per-unit statistics."""

    running_mean: torch.Tensor  # float32 (S, H)
    running_std: torch.Tensor  # 'var' form: sqrt(running_var), without eps
    calibrated_mean: torch.Tensor | None  # over the whole training split, after training
    calibrated_std: torch.Tensor | None  # (diagnostics.calibrate_batchnorm)


class BatchNorm(Record):
    """A BatchNorm model's statistics, and its split losses with each kind."""

    layers: dict[str, BatchNormLayer]
    loss_running: dict[str, list[float]]  # split -> S losses (nats), running statistics
    loss_calibrated: dict[str, list[float]] | None  # the same with the calibrated
    # statistics


class LayerSnapshot(Record):
    """One hidden nonlinearity's output in a captured training step.

    The lecture's ``layer.out`` and ``layer.out.grad`` of each Tanh (makemore part 3,
    "diagnostic tools"): the step's minibatch (B examples), all S seeds.
    """

    name: str  # module name of the nonlinearity in named_modules(), e.g. 'layers.2'
    kind: str  # the nonlinearity: 'tanh' | 'relu' | 'linear' | 'sigmoid' | 'gelu'
    out: torch.Tensor  # float32 (S, B, H), the nonlinearity's output
    out_grad: torch.Tensor  # float32 (S, B, H), dloss/dout
    mean: list[float]  # S values, mean of out
    std: list[float]  # S values, std of out (unbiased, as Tensor.std)
    saturated: list[float]  # S shares (0..1) saturated (diagnostics.saturated: relu
    # counts zeros; 0 for linear and gelu)
    grad_mean: list[float]  # S values, mean of out_grad
    grad_std: list[float]  # S values, std of out_grad


class WeightSnapshot(Record):
    """One weight matrix's gradient in a captured step (named as in named_parameters())."""

    grad: torch.Tensor  # float32 (S, fan_in, fan_out), that step's dloss/dweight
    grad_mean: list[float]  # S values
    grad_std: list[float]  # S values
    data_std: list[float]  # S values, std of the weight after that step's update
    grad_data_ratio: list[float]  # S values, grad_std / data_std (the lecture's ratio)


class Snapshot(Record):
    """A training step's forward and backward pass, as the lecture's histograms show it."""

    step: int  # 0-based step index (the lecture's snapshot: 1000, after 1,001 steps)
    threshold: float  # |out| above this counts as saturated (the lecture's 0.97)
    layers: list[LayerSnapshot]  # hidden nonlinearities, input side first
    weights: dict[str, WeightSnapshot]  # C and every Linear weight, named_parameters() order


class Diagnostics(Record):
    """Everything the report draws for one variant (the content of diagnostics.pt)."""

    format: int = FORMAT
    seeds: list[int]
    diverged_at: list[int | None]  # per seed, first non-finite training step
    probe_index: torch.Tensor  # int64 (P,), rows of the training split in the probe batch
    thresholds: list[float]  # saturation thresholds of |h|
    curve: Curve
    init_loss: InitLoss
    layers: list[Layer]  # hidden layers, input side first
    weights: dict[str, Weight]  # weight matrices in named_parameters() order
    update_steps: torch.Tensor  # int64 (R,), steps at which update ratios were recorded
    batchnorm: BatchNorm | None  # None: the model has no BatchNorm
    # captured training steps: 'snapshot' (the lecture's step 1,000, when the run is
    # that long) and 'final' (the last step)
    snapshots: dict[str, Snapshot] | None = None
    n_params: int = 0  # parameters per model (one seed), e.g. 47,024 for the lecture's deep net


def to_state(d: Diagnostics) -> dict[str, Any]:
    """Plain containers and tensors, for ``torch.save`` (tensors are not copied)."""
    return d.model_dump()


def from_state(state: Any, source: str = "diagnostics.pt") -> Diagnostics:
    """The records back from ``to_state``'s output (as ``torch.load`` returns it).

    Raises:
        ValueError: ``state`` has another format than ``FORMAT`` (written by another
            version of the evaluate stage) or does not match the records; the message
            names ``source``.
    """
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        raise ValueError(
            f"{source}: diagnostics format {found!r}, but this code reads format {FORMAT}; "
            "it was written by another version of the evaluate stage: rerun it "
            "(dvc repro evaluate)"
        )
    try:
        return Diagnostics.model_validate(state)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{source}: not valid diagnostics (format {FORMAT}): {where}") from e
