"""The lifecycle every compression method follows inside one trial.

A method is applied to a model in three moments, like torchao's ``prepare``/``convert`` split:

1. :meth:`Method.prepare` transforms the model before training (insert masks, swap layers for
   quantized or cheap ones, prune one-shot).
2. The method's :meth:`Method.phases` are trained by the shared training loop. A phase may use the
   default loss (the task loss plus every method's :meth:`Method.loss` term) or its own
   (adversarial, several students), add parameter groups (masks, clipping bounds, a discriminator)
   and update state after each optimizer step (FISTA, ADMM).
3. :meth:`Method.finalize` makes the result real (physically remove structures, fold, pack) and
   phases marked ``after_finalize`` (a fine-tune of the smaller model) follow it.

Deciding (scores, masks, bits) stays apart from doing (surgery, export): methods keep their
decision logic in small functions that tests can call directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "Method",
    "MethodContext",
    "Phase",
    "Step",
    "Range",
    "hyperparameter",
    "hyperparameters",
]


# ----------------------------------------------------------------------------------------------
# Hyperparameters: a frozen dataclass per method; each field carries its help text and its
# default search range, so `slimtune methods` and YAML spaces read one declaration.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The default search distribution of one hyperparameter.

    Either ``choices`` (categorical) or ``low``/``high`` (uniform, or log-uniform with ``log``;
    integers when the field is an ``int``; ``step`` for a grid).
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if len(self.choices) == 0:
                raise ValueError("`choices` must name at least one value, but got an empty list.")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"a range needs `low` and `high` or `choices`, but got {self}.")
        if not self.low <= self.high:
            raise ValueError(f"`low <= high` must hold, but got (low={self.low}, high={self.high}).")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs `low > 0`, but got low={self.low}.")

    def as_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


def hyperparameter(default: Any, help: str, search: Range | None = None) -> Any:
    """Declare a field of a method's config with its help text and default search range."""
    return field(default=default, metadata={"help": help, "search": search})


@dataclass(frozen=True)
class HyperparameterInfo:
    name: str
    type: type
    default: Any
    help: str
    search: Range | None


def hyperparameters(config_cls: type) -> list[HyperparameterInfo]:
    """List the hyperparameters of a method's config class, in declaration order."""
    hints = {"float": float, "int": int, "bool": bool, "str": str}
    out = []
    for f in dataclasses.fields(config_cls):
        typ = f.type if isinstance(f.type, type) else hints.get(str(f.type), str)
        out.append(
            HyperparameterInfo(
                name=f.name,
                type=typ,
                default=f.default,
                help=f.metadata.get("help", ""),
                search=f.metadata.get("search"),
            )
        )
    return out


def check_config_types(config: Any) -> None:
    """Check each field's value against its annotation; raise ValueError naming the field.

    :func:`methods.create_method` calls this, so a config from YAML or Optuna fails where it is
    built, not deep inside training. Range checks specific to a method live in its config's
    ``__post_init__``.
    """
    for info in hyperparameters(type(config)):
        value = getattr(config, info.name)
        checked = check_value_type(info.name, info.type, value)
        if checked is not value:
            object.__setattr__(config, info.name, checked)


def check_value_type(name: str, typ: type, value: Any) -> Any:
    """Return ``value`` as a ``typ`` (an int is a float, a whole float an int); ValueError naming ``name`` otherwise.

    :func:`methods.create_method` calls this on each given value before building the config, so
    a value of the wrong type gets this message rather than a TypeError from the config's own
    range checks (``0 <= 'high'``).
    """
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ValueError(f"`{name}` must be of type {typ.__name__}, but got {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, but got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------
# What a method sees during a trial.
# ----------------------------------------------------------------------------------------------


@dataclass
class MethodContext:
    """Everything a method may use in a trial; built by the trial, read by methods.

    Attributes:
        teacher: The frozen uncompressed baseline (eval mode, on ``device``).
        train_loader: Batches of (inputs, targets) for training.
        val_loader: Batches used to choose between candidates (for example the best student).
        task_loss: The task's loss, ``task_loss(outputs, targets)``.
        evaluate: ``evaluate(model) -> {"accuracy": ..., "loss": ...}`` on the validation data.
        metric: The task's headline quality metric in ``evaluate``'s result, higher is better
            (``"accuracy"``; ``"psnr"`` for super-resolution); use it to choose between candidates.
        example_input: One input batch of size 1 on ``device``, for tracing and torch-pruning.
        device: Where the trial trains.
        epochs: Default length of a method's training phase (the space's ``budget.epochs``).
        lr: Default learning rate (the space's ``training.lr``).
        optimizer: ``"sgd"`` or ``"adam"`` (the space's ``training.optimizer``).
        weight_decay: Default weight decay of the optimizer.
        seed: The trial's seed.
        log: ``log(message)`` writes a line to the trial's log.
    """

    teacher: nn.Module
    train_loader: Any
    val_loader: Any
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    example_input: torch.Tensor
    device: torch.device
    metric: str = "accuracy"
    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    seed: int = 0
    log: Callable[[str], None] = print


class Step:
    """One training step: the batch, the model's outputs and cached teacher outputs.

    Methods read what they need; the teacher runs at most once per step whoever asks.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        ctx: MethodContext,
        loss_terms: list[Callable[[Step], torch.Tensor | None]],
        iteration: int,
        epoch: int,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.targets = targets
        self.ctx = ctx
        self.iteration = iteration
        self.epoch = epoch
        self._loss_terms = loss_terms
        self._outputs: torch.Tensor | None = None
        self._teacher_outputs: torch.Tensor | None = None
        self.logged: dict[str, float] = {}

    @property
    def outputs(self) -> torch.Tensor:
        """The trained model's outputs on this batch (computed once)."""
        if self._outputs is None:
            self._outputs = self.model(self.inputs)
        return self._outputs

    @outputs.setter
    def outputs(self, value: torch.Tensor) -> None:
        # A phase loss that runs the model itself (several heads at once, as od does) hands over
        # the outputs it got, so the loss terms reading them do not run the model a second time.
        self._outputs = value

    @property
    def teacher_outputs(self) -> torch.Tensor:
        """The frozen baseline's outputs on this batch (computed once, no gradient)."""
        if self._teacher_outputs is None:
            with torch.no_grad():
                self._teacher_outputs = self.ctx.teacher(self.inputs)
        return self._teacher_outputs

    def default_loss(self) -> torch.Tensor:
        """The task loss plus the loss term of every method in the pipeline that adds one."""
        loss = self.ctx.task_loss(self.outputs, self.targets)
        for term in self._loss_terms:
            extra = term(self)
            if extra is not None:
                loss = loss + extra
        return loss


@dataclass
class Phase:
    """A stretch of training that a method owns.

    Attributes:
        name: Shown in logs and metrics (``stage``), unique within the method.
        epochs: Passes over the training data.
        lr: Learning rate of the model's parameters (None: the space's ``training.lr``).
        loss: ``loss(step) -> Tensor``; None means :meth:`Step.default_loss`.
        param_groups: ``param_groups(model) -> list of optimizer groups``; None means all
            trainable parameters of the model at ``lr``.
        after_step: Called after every optimizer step with the step (FISTA, ADMM updates).
        after_finalize: Run after :meth:`Method.finalize` instead of before it (fine-tunes).
        optimizer: ``"sgd"``, ``"adam"`` or None for the space's choice.
    """

    name: str
    epochs: int
    lr: float | None = None
    loss: Callable[[Step], torch.Tensor] | None = None
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    after_step: Callable[[Step], None] | None = None
    after_finalize: bool = False
    optimizer: str | None = None


class Method:
    """Base class of a compression method. Subclasses set the class attributes and override hooks.

    Class attributes (capability flags, read without building the method):
        name: Registry name, as written in a search space.
        Config: Frozen dataclass of hyperparameters (fields made with :func:`hyperparameter`).
        kind: ``"pruning"``, ``"quantization"``, ``"distillation"`` or ``"reparameterisation"``.
        needs_teacher: Uses the frozen baseline during training.
        needs_labels: Uses the task's labels during training.
        changes_architecture: Changes the model's structure (shapes or module types).
        must_be_last: Nothing may follow it in a pipeline (quantized weights are final).
        aggressive: For each hyperparameter whose high or low end compresses more, that end
            (``{"ratio": "high"}``); ``slimtune check`` pre-flights the space at those ends.
        loss_only: The method only adds a loss term (:meth:`loss`); its own phases run only when
            no other method in the pipeline trains, so "prune + kd" is one distilled fine-tune.
        task_kinds: The kinds of task it applies to (``"classification"``,
            ``"super_resolution"``); None for any. A space pairing it with another kind of task
            is rejected when loaded.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    kind: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = True
    changes_architecture: ClassVar[bool] = False
    must_be_last: ClassVar[bool] = False
    loss_only: ClassVar[bool] = False
    aggressive: ClassVar[dict[str, str]] = {}
    task_kinds: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """This method is called once before the method's phases; it returns the model to train."""
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        """This method is called after :meth:`prepare`; it lists the training the method owns.

        The default is one fine-tune of ``ctx.epochs`` with the default loss.
        """
        return [Phase(name="finetune", epochs=ctx.epochs)]

    def loss(self, step: Step) -> torch.Tensor | None:
        """This method is called every step of every phase that uses the default loss.

        Distillation methods return their term here; it shapes the training of every method in
        the pipeline.
        """
        return None

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """This method is called once after the method's phases; it returns the final model."""
        return model

    def metrics(self) -> dict[str, float]:
        """This method is called after :meth:`finalize`; it reports the method's own figures."""
        return {}

    def cost(self, model: nn.Module, ctx: MethodContext) -> dict[str, float]:
        """This method is called once the whole pipeline has run, with the final model.

        It returns cost figures that the FLOP counter cannot see, keyed by cost metric
        (``{"macs": ...}`` for a clustered convolution's real work, a gated network's expected
        MACs on the validation data); they replace the measured values in the trial's metrics.
        The default reports nothing.
        """
        return {}


def trainable_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in module.parameters() if p.requires_grad)
