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
import enum
import functools
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from errors import did_you_mean

__all__ = [
    "Method",
    "MethodContext",
    "Phase",
    "Step",
    "Range",
    "hyperparameter",
    "hyperparameters",
    "HyperparameterInfo",
    "check_config_types",
    "check_value_type",
]


# ----------------------------------------------------------------------------------------------
# Hyperparameters: a frozen dataclass per method; each field carries its type, help text,
# default search range, which end compresses more and whether it is a training budget, so
# `slimtune methods`, YAML spaces and `slimtune check` read one declaration.
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


def hyperparameter(
    default: Any,
    help: str,
    search: Range | None = None,
    *,
    compresses: str | None = None,
    budget: bool = False,
) -> Any:
    """Declare a field of a method's config.

    The field's annotation is its type: ``int``, ``float``, ``bool``, ``str``, a ``Literal`` of
    str or int choices, an enum whose members are str or int (``class Kind(str, Enum)``, so a
    recipe stays JSON), a ``tuple[X, ...]`` or ``tuple[X, Y]`` of those, or any of them
    ``| None``. A ``None`` default means "use the space's setting" (``budget.epochs``,
    ``training.lr``); the field's help says which.

    Args:
        default: The value when neither the space nor the recipe sets one.
        help: One line, shown by ``slimtune methods``.
        search: The default search distribution (``params: {name: search}`` in a space).
        compresses: Which end of the field's values compresses more, ``"high"`` or ``"low"``;
            None when neither does. Numbers are ordered by value, ``Literal`` and enum choices
            in the order the type lists them: list them from least to most compressing (or the
            reverse, with ``compresses="low"``). ``slimtune check`` pre-flights each searched
            field at its compressing end, and at its low end when ``compresses`` is None.
        budget: The field counts epochs or iterations of training; ``slimtune check`` caps it
            at 1.
    """
    if compresses not in (None, "high", "low"):
        raise ValueError(f"`compresses` must be 'high', 'low' or None, but got {compresses!r}.")
    return field(default=default, metadata={"help": help, "search": search, "compresses": compresses, "budget": budget})


@dataclass(frozen=True)
class HyperparameterInfo:
    """One field of a method's config, as :func:`hyperparameter` declared it.

    Attributes:
        name: The field's name.
        annotation: Its resolved type (``int``, ``int | None``, ``tuple[int, ...]``,
            ``Literal["a", "b"]``, an enum).
        type: The type of a value other than None: ``int``, ``float``, ``bool``, ``str``,
            ``tuple`` or the enum; for a ``Literal``, the type of its choices.
        optional: None is a valid value.
        choices: The values a ``Literal`` or enum field allows (an enum's member values), in the
            order the type lists them; None for other fields.
        default: As given to :func:`hyperparameter`, and so are the attributes below.
        help: One line for ``slimtune methods``.
        search: The default search distribution, or None.
        compresses: ``"high"``, ``"low"`` or None.
        budget: The field counts epochs or iterations.
    """

    name: str
    annotation: Any
    type: type
    optional: bool
    choices: tuple[Any, ...] | None
    default: Any
    help: str
    search: Range | None
    compresses: str | None
    budget: bool

    @property
    def type_name(self) -> str:
        """The type as ``slimtune methods`` shows it (``int``, ``tuple[int, ...]``), None and choices apart."""
        return _type_name(_without_none(self.annotation))


def hyperparameters(config_cls: type) -> list[HyperparameterInfo]:
    """List the hyperparameters of a method's config class, in declaration order.

    Raises:
        TypeError: A field's annotation is not one of the types :func:`hyperparameter` lists.
    """
    return list(_hyperparameters(config_cls))


@functools.cache
def _hyperparameters(config_cls: type) -> tuple[HyperparameterInfo, ...]:
    # String annotations (`from __future__ import annotations`) resolve in the config's module.
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        annotation = hints[f.name]
        if not _supported(annotation):
            raise TypeError(
                f"{config_cls.__name__}.{f.name}: a hyperparameter is int, float, bool, str, a Literal of str or int "
                f"choices, an enum of str or int values, a tuple of those, or any of them | None, but got {annotation!r}."
            )
        inner = _without_none(annotation)
        choices = _choices(inner)
        if typing.get_origin(inner) is Literal:
            value_type = type(choices[0])
        elif typing.get_origin(inner) is tuple:
            value_type = tuple
        else:
            value_type = inner
        out.append(
            HyperparameterInfo(
                name=f.name,
                annotation=annotation,
                type=value_type,
                optional=inner is not annotation,
                choices=choices,
                default=f.default,
                help=f.metadata.get("help", ""),
                search=f.metadata.get("search"),
                compresses=f.metadata.get("compresses"),
                budget=f.metadata.get("budget", False),
            )
        )
    return tuple(out)


def check_config_types(config: Any) -> None:
    """Check each field's value against its annotation, converting where :func:`check_value_type` does.

    Every config calls this first in its ``__post_init__``, so a config from YAML, Optuna or a
    JSON recipe fails where it is built with a message naming the field, before its own range
    checks (which would fail on a string with a bare TypeError: ``0 <= 'high'``).
    """
    for info in hyperparameters(type(config)):
        value = getattr(config, info.name)
        checked = check_value_type(info.name, info.annotation, value)
        if checked is not value:
            object.__setattr__(config, info.name, checked)


def check_value_type(name: str, annotation: Any, value: Any) -> Any:
    """Return ``value`` as a value of ``annotation``; ValueError naming ``name`` otherwise.

    The only conversions are those JSON and YAML make necessary: an int is a float, a whole
    float an int, a list a tuple, an enum's value its member. ``"3"`` is not an int and ``1``
    is not ``True``.
    """
    # Hand-written rather than pydantic: pydantic's lax mode turns "3" into 3 and "yes" into
    # True (a typo in a space would pass), its strict mode refuses JSON's lists for tuples, and
    # either way its messages would need rewriting into this one form.
    inner = _without_none(annotation)
    if value is None:
        if inner is not annotation:
            return None
        raise ValueError(f"`{name}` must be {_describe(annotation)}, but got None.")
    choices = _choices(inner)
    if choices is not None:
        if isinstance(inner, type) and isinstance(value, inner):
            return value
        candidate = int(value) if isinstance(value, float) and value.is_integer() else value
        for choice in choices:
            if candidate == choice and type(candidate) is type(choice):
                return inner(choice) if isinstance(inner, type) else choice
        hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ValueError(f"`{name}` must be {_describe(annotation)}, but got {value!r}.{hint}")
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        if not isinstance(value, (list, tuple)) or (items[-1] is not Ellipsis and len(value) != len(items)):
            raise ValueError(f"`{name}` must be {_describe(annotation)}, but got {value!r}.")
        if items[-1] is Ellipsis:
            items = (items[0],) * len(value)
        return tuple(check_value_type(f"{name}[{i}]", item, v) for i, (item, v) in enumerate(zip(items, value)))
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif inner is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, inner) or (inner is not bool and isinstance(value, bool)):
        raise ValueError(f"`{name}` must be {_describe(annotation)}, but got {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, but got {value!r}.")
    return value


_SCALARS = (int, float, bool, str)


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``), ``annotation`` itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` or an enum allows, in declared order; None for other types."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(member.value for member in annotation)
    return None


def _supported(annotation: Any, top: bool = True) -> bool:
    inner = _without_none(annotation) if top else annotation
    choices = _choices(inner)
    if choices is not None:
        kinds = {type(c) for c in choices}
        return len(kinds) == 1 and kinds <= {str, int}
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        if items[-1:] == (Ellipsis,):
            items = items[:-1]
        return len(items) >= 1 and all(_supported(item, top=False) for item in items)
    return inner in _SCALARS


def _type_name(annotation: Any) -> str:
    choices = _choices(annotation)
    if choices is not None:
        return type(choices[0]).__name__
    if typing.get_origin(annotation) is tuple:
        return "tuple[" + ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(annotation)) + "]"
    return annotation.__name__


def _describe(annotation: Any) -> str:
    """What a value must be, for error messages: ``of type int``, ``one of a, b``, ``a list of int``."""
    inner = _without_none(annotation)
    choices = _choices(inner)
    items = typing.get_args(inner)
    if choices is not None:
        text = f"one of {', '.join(str(c) for c in choices)}"
    elif typing.get_origin(inner) is tuple and items[-1] is Ellipsis:
        text = f"a list of {_type_name(items[0])}"
    elif typing.get_origin(inner) is tuple:
        text = f"a list of {len(items)} values ({', '.join(_type_name(a) for a in items)})"
    else:
        text = f"of type {inner.__name__}"
    return text + (" or null (None)" if inner is not annotation else "")


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
        Config: Frozen dataclass of hyperparameters (fields made with :func:`hyperparameter`,
            which also says which end of each compresses more); its ``__post_init__`` calls
            :func:`check_config_types` first.
        kind: ``"pruning"``, ``"quantization"``, ``"distillation"`` or ``"reparameterisation"``.
        needs_teacher: Uses the frozen baseline during training.
        needs_labels: Uses the task's labels during training.
        changes_architecture: Changes the model's structure (shapes or module types).
        must_be_last: Nothing may follow it in a pipeline (quantized weights are final).
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
