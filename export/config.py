"""What to train, checked before any training starts.

A `ModelSpec` says what network to build for which task; a `TrainSpec` how to optimise it; a `GateSpec`
how much worse than fp32 a quantized variant may be. All three travel inside the checkpoint's metadata
and into the published manifest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["charlm", "glucose", "vowels"]
Cell = Literal["rnn", "lstm", "gru"]

# What each task's data set is, and the task name the manifest uses.
TASKS: dict[str, str] = {
    "charlm": "language_model",
    "glucose": "forecast",
    "vowels": "classification",
}


class ConfigError(ValueError):
    """A configuration that cannot be trained; raised before any data is loaded."""


class ExportError(RuntimeError):
    """The exported graph does not match the trained network, or is not worth serving: nothing is published."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """The network: a recurrent stack over the task's inputs, and the task's read-out."""

    task: Task
    cell: Cell
    layers: int = Field(default=2, ge=1, le=4)
    hidden_size: int = Field(default=128, ge=1, le=4096)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="between stacked layers, in training")
    layer_norm: bool = Field(default=False, description="normalise each gate pre-activation (Ba et al.)")
    bidirectional: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.bidirectional and self.task != "vowels":
            raise ValueError(
                f"task {self.task} streams one step at a time; a bidirectional model needs the whole "
                "sequence (use it for vowels, the classification task)"
            )
        if self.layer_norm and self.bidirectional:
            raise ValueError("layer_norm is implemented for unidirectional models only")
        if self.dropout and self.layers == 1:
            raise ValueError("dropout acts between stacked layers: it needs layers >= 2")
        return self

    @property
    def streamable(self) -> bool:
        return not self.bidirectional


class TrainSpec(_Spec):
    """Optimisation; every field is used, every field is recorded."""

    seed: int = Field(default=1234, description="seed of every random draw (weights, batches, dropout)")
    steps: int = Field(default=1000, ge=1, description="optimiser updates at most")
    batch_size: int = Field(default=64, ge=1, description="sequences per optimiser update")
    bptt: int = Field(default=128, ge=1, description="window of truncated backpropagation (streaming tasks)")
    learning_rate: float = Field(default=2e-3, gt=0, description="Adam's initial learning rate")
    clip_norm: float = Field(default=1.0, gt=0, description="global gradient-norm clip")
    eval_every: int = Field(default=100, ge=1, description="updates between evaluations on the validation split")
    lr_patience: int = Field(default=2, ge=0, description="evaluations without improvement before LR drops")
    lr_factor: float = Field(default=0.5, gt=0, lt=1, description="what the learning rate is multiplied by")
    early_stop_patience: int = Field(default=4, ge=1, description="evaluations without improvement to stop")
    torch_threads: int = Field(default=2, ge=1, description="CPU threads torch trains with")


class GateSpec(_Spec):
    """How much worse than fp32 a variant may be and still be published."""

    max_perplexity_increase_pct: float = Field(default=2.0, ge=0)
    max_rmse_increase_pct: float = Field(default=3.0, ge=0)
    max_accuracy_drop_points: float = Field(default=1.0, ge=0)


def model_spec(**fields: object) -> ModelSpec:
    """A ModelSpec, or a ConfigError that says what is wrong."""
    try:
        return ModelSpec.model_validate(fields)
    except ValueError as err:
        raise ConfigError(_first_error(err)) from err


def train_spec(**fields: object) -> TrainSpec:
    try:
        return TrainSpec.model_validate(fields)
    except ValueError as err:
        raise ConfigError(_first_error(err)) from err


def _first_error(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", err)).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(err)
