"""What the training loop and a method hand each other: the step, the phases, the extra updates.

:class:`Step` is one batch as the loss terms and hooks see it (the model's and the teacher's
outputs and captured features, each computed once); :class:`Phase` is a stretch of training a
method owns, with its loss, optimizer groups and hooks; :class:`Update` is an optimizer step on
parameters the method owns outside the model. They are the vocabulary of the training loop
(:mod:`methods._pipeline`), which builds the steps and runs the phases, and live apart from the
method's lifecycle (:mod:`methods._base`), which only returns phases and reads steps: a reader of
the loop finds here everything it exchanges, and a reader of :class:`methods.Method` is not
walked through feature capture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from methods._base import MethodContext

__all__ = ["Phase", "Step", "Update", "trainable_parameters"]


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


def trainable_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module`` that train (``requires_grad``)."""
    return (p for p in module.parameters() if p.requires_grad)
