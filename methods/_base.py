"""The lifecycle every compression method follows inside one trial.

A method is applied to a model in three moments, like torchao's ``prepare``/``convert`` split:

1. :meth:`Method.prepare` transforms the model before training (insert masks, swap layers for
   quantized or cheap ones, prune one-shot).
2. The shared training loop (:mod:`methods._pipeline`) trains the method's :meth:`Method.phases`.
   A :class:`Phase` declares its own loss (adversarial, several students) if any, whether it
   trains on the task loss, the parameter groups of its optimizer, the optimizer steps it takes
   on parameters the method owns outside the model (:class:`Update`: a discriminator), and hooks
   the loop calls at its start and end, at the start and end of every epoch and after every
   optimizer step (FISTA, ADMM, multiplier updates).
3. :meth:`Method.finalize` makes the result real (physically remove structures, fold, pack) and
   phases marked ``after_finalize`` (a fine-tune of the smaller model) follow it.

The loop composes each step's loss (:func:`methods._pipeline.training_loss`): the task loss when
the phase trains on it, plus the :meth:`Method.loss` term of every method whose
:attr:`Method.loss_scope` reaches the phase (``"own"``: the method's own phases, a penalty;
``"later"``: its own phases and those of every method after it; ``"pipeline"``: every phase of
every method, as distillation), plus the phase's own loss. :class:`Step` hands the terms the
batch (several views where the task yields them), the model's outputs, the teacher's outputs and
named intermediate features, each computed once per step. A method keeps what it learns between
hooks (masks' sites, multipliers, a discriminator, its figures) in attributes set in
``__init__`` and saves and restores them through :meth:`Method.state_dict` and
:meth:`Method.load_state_dict`, so a trial resumes bit-exactly from any epoch's checkpoint.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from errors import did_you_mean

__all__ = [
    "LOSS_SCOPES",
    "NotApplicable",
    "Method",
    "MethodContext",
    "Phase",
    "Step",
    "Update",
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


#: The training overrides a method's config may carry: field, rule, whether a value keeps it,
#: and the space's setting that an unset (null) override falls back to.
_TRAINING_OVERRIDES = (
    ("epochs", "epochs >= 0", lambda value: value >= 0, "budget.epochs"),
    ("lr", "lr > 0", lambda value: value > 0, "training.lr"),
)


def check_training_overrides(config: Any) -> None:
    """Check a config's ``epochs`` and ``lr`` fields, those it has: ``epochs >= 0``, ``lr > 0``.

    Called in ``__post_init__`` after :func:`check_config_types` by every config that can set
    its own training epochs or learning rate. An unset (None) override passes; the message of
    one whose default is None says that leaving it unset uses the space's setting.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, rule, holds, fallback in _TRAINING_OVERRIDES:
        value = getattr(config, name, None)
        if name not in defaults or value is None or holds(value):
            continue
        hint = f"; leave it unset (null) to use the space's {fallback}" if defaults[name] is None else ""
        raise ValueError(f"`{rule}` must hold, but got {name}={value}{hint}.")


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
        metric: The task's headline quality metric in ``evaluate``'s result (``"accuracy"``;
            ``"psnr"`` for super-resolution; ``"bpc"`` for character text); use it to choose
            between candidates.
        metric_direction: ``"max"`` when a higher ``metric`` is better, ``"min"`` when lower is.
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
    metric_direction: str = "max"
    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    seed: int = 0
    log: Callable[[str], None] = print


class Step:
    """One training step: the batch, the model's and the teacher's outputs, captured features.

    The training loop builds one for every batch and hands it to the phase's loss, the loss terms
    and the phase's ``after_step``; each reads what it needs, and the model and the teacher each run
    at most once on the batch whoever asks.

    Batches: a loader yields ``(inputs, targets)``. ``inputs`` is a tensor, or for a task that
    gives several views of each example (two modalities, two augmentations) a tuple of tensors;
    :attr:`views` holds them all and :attr:`inputs` is the first. :attr:`outputs`,
    :attr:`teacher_outputs` and the features are computed on the first view;
    :meth:`view_outputs` runs the model on another view (once). The labels are moved to the
    device only when read, so a label-free phase never touches them.

    Args:
        model: The model being trained.
        inputs: The batch's inputs (on the device): a tensor or a tuple of views.
        targets: The batch's labels (moved to ``ctx.device`` when first read).
        ctx: The trial's context.
        loss_terms: The :meth:`Method.loss` terms that apply in this phase, in pipeline order.
        iteration: Optimizer steps taken in this phase before this one.
        epoch: The phase's epoch, from 0.
        capture: Names of modules whose outputs the step records during the model's and the
            teacher's forward pass (:meth:`features`, :meth:`teacher_features`).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        targets: Any,
        ctx: MethodContext,
        loss_terms: Iterable[Callable[[Step], torch.Tensor | None]] = (),
        iteration: int = 0,
        epoch: int = 0,
        capture: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.views: tuple[torch.Tensor, ...] = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        self.ctx = ctx
        self.loss_terms = list(loss_terms)
        self.iteration = iteration
        self.epoch = epoch
        self._targets = targets
        self._targets_read = False
        self._capture = list(dict.fromkeys(capture))
        self._view_outputs: dict[int, torch.Tensor] = {}
        self._features: dict[str, torch.Tensor] | None = None
        self._teacher_outputs: torch.Tensor | None = None
        self._teacher_features: dict[str, torch.Tensor] = {}

    @property
    def inputs(self) -> torch.Tensor:
        """The first view of the batch."""
        return self.views[0]

    @property
    def targets(self) -> Any:
        """The batch's labels on the device."""
        if not self._targets_read:
            self._targets = self._targets.to(self.ctx.device)
            self._targets_read = True
        return self._targets

    @property
    def outputs(self) -> torch.Tensor:
        """The trained model's outputs on the first view (computed once, capturing the features)."""
        if 0 not in self._view_outputs:
            self._view_outputs[0], self._features = _run_capturing(self.model, self.inputs, self._capture)
        return self._view_outputs[0]

    @outputs.setter
    def outputs(self, value: torch.Tensor) -> None:
        # A phase loss that runs the model itself (several heads at once, as od does) hands over
        # the outputs it got, so the loss terms reading them do not run the model a second time.
        self._view_outputs[0] = value

    def view_outputs(self, index: int) -> torch.Tensor:
        """The trained model's outputs on view ``index`` (computed once; view 0 is :attr:`outputs`)."""
        if index == 0:
            return self.outputs
        if index not in self._view_outputs:
            self._view_outputs[index] = self.model(self.views[index])
        return self._view_outputs[index]

    @property
    def teacher_outputs(self) -> torch.Tensor:
        """The frozen baseline's outputs on the first view (computed once, no gradient)."""
        if self._teacher_outputs is None:
            with torch.no_grad():
                self._teacher_outputs, self._teacher_features = _run_capturing(self.ctx.teacher, self.inputs, self._capture)
        return self._teacher_outputs

    def features(self, name: str) -> torch.Tensor:
        """The output of the trained model's module ``name`` in the pass that gave :attr:`outputs`.

        The loop captures the modules that :meth:`Method.feature_modules` names; a name asked
        before the model has run on this step is captured too.

        Raises:
            ValueError: ``name`` was not captured (the model has no such module, or it ran
                before the name was asked and no method declared it).
        """
        if self._features is None and 0 not in self._view_outputs:
            self._capture.append(name)
            self.outputs  # noqa: B018  runs the model, capturing the features
        return _captured(self._features or {}, name, "model", self.model)

    def teacher_features(self, name: str) -> torch.Tensor:
        """The output of the teacher's module ``name`` in the pass that gave :attr:`teacher_outputs` (no gradient).

        Raises:
            ValueError: As :meth:`features`, for the teacher.
        """
        if self._teacher_outputs is None and name not in self._capture:
            self._capture.append(name)
        self.teacher_outputs  # noqa: B018  runs the teacher unless it already ran
        return _captured(self._teacher_features, name, "teacher", self.ctx.teacher)


def _run_capturing(net: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``net(x)`` and the output of each named module of ``net`` in that pass (the first call of each)."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        try:
            module = net.get_submodule(name)
        except AttributeError:
            continue  # reported by `_captured` if someone asks for it
        handles.append(module.register_forward_hook(partial(_keep_first, found, name)))
    try:
        return net(x), found
    finally:
        for handle in handles:
            handle.remove()


def _keep_first(found: dict[str, torch.Tensor], name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
    found.setdefault(name, output)


def _captured(found: dict[str, torch.Tensor], name: str, which: str, net: nn.Module) -> torch.Tensor:
    if name in found:
        return found[name]
    try:
        net.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the {which} has no module '{name}' whose features a loss asked for; name a module of the {which}.") from None
    raise ValueError(
        f"the features of '{name}' were not captured: the {which} ran on this step before they were asked for "
        "(or a phase loss ran it itself). Return the name from the method's `feature_modules()` so the step "
        "captures it in the pass that computes the outputs."
    )


@dataclass(frozen=True)
class Update:
    """An optimizer step the loop takes in every step of a phase, before the model's own.

    For parameters outside the trained model that a method owns and trains against it (GAL's
    discriminator). The loop builds the optimizer when the phase starts, keeps its learning rate
    constant, and saves and restores its state with the phase's checkpoint.

    Attributes:
        name: Unique within the phase; keys the optimizer's state in the checkpoint.
        params: ``params() -> list of optimizer groups``; called when the phase starts and when
            a run resumes inside it.
        loss: ``loss(step) -> Tensor``; called every step before the phase's loss. Detach what
            it must not train (the student's outputs, for a discriminator).
        lr: Learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        weight_decay: None for the context's weight decay.
    """

    name: str
    params: Callable[[], list[dict[str, Any]]]
    loss: Callable[[Step], torch.Tensor]
    lr: float
    optimizer: str = "sgd"
    weight_decay: float | None = None


@dataclass
class Phase:
    """A stretch of training that a method owns.

    The loop's loss for each step is composed by :func:`methods._pipeline.training_loss`: the
    task loss (when ``task_loss``), plus every loss term whose scope reaches this phase, plus
    ``loss``. Hooks are called in this order: ``on_start``; per epoch ``on_epoch_start``, per
    step every ``updates``' step then the model's step then ``after_step``, ``on_epoch_end``,
    then validation and the checkpoint; ``on_end`` after the last epoch. A run resumed inside the
    phase skips ``on_start`` (its effects are in the checkpointed model and method state) and
    calls ``on_end`` even when it resumes after the last epoch. A phase of zero epochs calls no
    hook.

    Attributes:
        name: Shown in logs and metrics (``stage``), unique within the method.
        epochs: Passes over the training data.
        lr: Learning rate of the model's parameters (None: the space's ``training.lr``).
        loss: ``loss(step) -> Tensor``, the phase's own objective (None: nothing beyond the task
            loss and the loss terms). It runs before the others, so it may run the model itself
            and set ``step.outputs``.
        task_loss: The phase trains on the task loss (and so reads the labels).
        param_groups: ``param_groups(model) -> list of optimizer groups``; None means all
            trainable parameters of the model at ``lr``. Called when the phase starts.
        updates: Optimizer steps on parameters the method owns, taken before the model's.
        on_start: ``on_start(model)``, when the phase starts, before its optimizers are built.
        on_epoch_start: ``on_epoch_start(model, epoch)``, after the loop has put the model in
            training mode (to freeze batch-norm statistics, for example).
        after_step: ``after_step(step)``, after every optimizer step of the model (FISTA, ADMM).
        on_epoch_end: ``on_epoch_end(model, epoch)``, after an epoch's last step, before validation.
        on_end: ``on_end(model)``, after the last epoch.
        after_finalize: Run after :meth:`Method.finalize` instead of before it (fine-tunes).
        optimizer: ``"sgd"``, ``"adam"`` or None for the space's choice.
    """

    name: str
    epochs: int
    lr: float | None = None
    loss: Callable[[Step], torch.Tensor] | None = None
    task_loss: bool = True
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    updates: tuple[Update, ...] = ()
    on_start: Callable[[nn.Module], None] | None = None
    on_epoch_start: Callable[[nn.Module, int], None] | None = None
    after_step: Callable[[Step], None] | None = None
    on_epoch_end: Callable[[nn.Module, int], None] | None = None
    on_end: Callable[[nn.Module], None] | None = None
    after_finalize: bool = False
    optimizer: str | None = None


class NotApplicable(ValueError):
    """Raised by :meth:`Method.prepare` for a model the method cannot compress (nothing it acts on).

    The message names the method, what it acts on and a model that has it ("wavelet found no
    square linear map ..."). The contract suite runs a method only on the models it names in
    :attr:`Method.example_models`, and fails it where it raises this for one of them.
    """


#: Where a method's :meth:`Method.loss` term applies (:attr:`Method.loss_scope`).
LOSS_SCOPES = ("own", "later", "pipeline")


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
        restructured_only_by: The kinds of method that may change the architecture after it
            (None: any). A method whose layers later pruning cannot see into (kse's clustered
            convolutions) admits only quantization; methods that keep the architecture (kd)
            may always follow.
        loss_scope: Where :meth:`loss` applies: ``"own"`` (the method's own phases: a penalty on
            its own variables), ``"later"`` (its own phases and those of every method after it:
            a term that keeps structures it leaves in the model valid), ``"pipeline"`` (every
            phase of every method, wherever it stands: distillation).
        loss_only: The method only adds a loss term; its own phases run only when no other
            method in the pipeline trains, so "prune + kd" is one distilled fine-tune (and, among
            loss-only methods alone, a ``"pipeline"``-scoped one's phases run only when no
            loss-only method precedes it: "vcd + vml" is one fine-tune with both terms). Its
            ``loss_scope`` must then reach the other methods' phases
            (:func:`methods._pipeline.check_pipeline` refuses a pipeline where it cannot).
        task_kinds: The kinds of task it applies to (``"classification"``,
            ``"super_resolution"``); None for any. A space pairing it with another kind of task
            is rejected when loaded.
        example_models: Registered models it compresses: the method contract suite
            (``tests/methods/test_contract.py``) checks the method on each, its one-step and
            resume checks on the first.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    kind: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = True
    changes_architecture: ClassVar[bool] = False
    must_be_last: ClassVar[bool] = False
    restructured_only_by: ClassVar[tuple[str, ...] | None] = None
    loss_only: ClassVar[bool] = False
    loss_scope: ClassVar[str] = "own"
    task_kinds: ClassVar[tuple[str, ...] | None] = None
    example_models: ClassVar[tuple[str, ...]] = ("digits_cnn", "resnet20")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.loss_scope not in LOSS_SCOPES:
            raise TypeError(f"`{cls.__name__}.loss_scope` must be one of {', '.join(LOSS_SCOPES)}, but got {cls.loss_scope!r}.")

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """This method is called once before the method's phases; it returns the model to train."""
        return model

    def phases(self, ctx: MethodContext) -> list[Phase]:
        """This method is called after :meth:`prepare`; it lists the training the method owns.

        The default is one fine-tune of ``ctx.epochs`` on the task loss.
        """
        return [Phase(name="finetune", epochs=ctx.epochs)]

    def loss(self, step: Step) -> torch.Tensor | None:
        """This method is called every step of every phase that :attr:`loss_scope` reaches.

        It returns the method's loss term (None: nothing this step), which the loop adds to the
        step's loss.
        """
        return None

    def feature_modules(self) -> tuple[str, ...]:
        """This method is called when a phase starts in which :meth:`loss` or the method's phase loss runs.

        It names the modules whose outputs :meth:`Step.features` and :meth:`Step.teacher_features`
        must return: the step records them during the forward pass that computes the outputs.
        """
        return ()

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

    def artifacts(self, model: nn.Module, ctx: MethodContext, folder: Path) -> list[Path]:
        """This method is called once the whole pipeline has run and the final model is measured.

        It writes files about the result (a report, plots) into ``folder``, which it creates,
        and returns their paths; the trial keeps them with its exported model. The default
        writes nothing.
        """
        return []

    def state_dict(self) -> dict[str, Any]:
        """This method is called at every checkpoint; it returns what the method has learnt so far.

        Everything the method keeps between hooks (not in the model): decisions, owned modules'
        weights, multipliers, figures. Values are tensors, plain Python data, or nested dicts of
        them. The default (a method that keeps nothing) is ``{}``.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This method is called when a run resumes, on a method built from the recipe, with :meth:`state_dict`'s value.

        The method is not prepared again: the checkpointed model already is.
        """
        if state:
            raise ValueError(f"method '{self.name}' keeps no state, but the checkpoint holds {sorted(state)}.")


def trainable_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in module.parameters() if p.requires_grad)
