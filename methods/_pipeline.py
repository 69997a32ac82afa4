"""A pipeline applies several methods in order in one trial, with one training loop for all.

Order of work for each method: ``prepare``, the phases that come before finalize, ``finalize``,
the phases marked ``after_finalize``. The loop owns each step's loss (:func:`training_loss`):
the phase's task loss, the loss term of every method whose ``loss_scope`` reaches the phase,
and the phase's own loss. A ``"pipeline"`` term (kd) shapes every phase of every method, the
adversarial phase of gal included, so ``gal > kd`` distils during gal's training; an ``"own"``
term only its method's phases; a ``"later"`` term its method's phases and those after it.
:func:`check_pipeline` refuses an order that cannot work; the space loader runs it on every
pipeline a space can sample.

After every epoch the pipeline hands a :class:`TrainingState` to ``on_epoch_end``; a trial saves
it as its checkpoint, and ``Pipeline.run(resume=state)`` continues from it bit-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from errors import plural
from methods._base import Method, MethodContext
from methods._registry import create_method
from methods._training import Phase, Step, trainable_parameters

__all__ = ["Pipeline", "TrainingState", "NonFiniteLossError", "check_pipeline", "train_phase", "training_loss"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial fails with this reason."""


def check_pipeline(methods: Sequence[type[Method]]) -> None:
    """Refuse an ordered list of methods that cannot work together; ValueError says why and what to change.

    Rules: a method appears once; a method that must be last is last; a method that changes the
    architecture after another is of a kind that one admits (``restructured_only_by``); a loss-only method's term
    reaches another method's phases (its own phases do not run beside a method that trains).
    :class:`Pipeline` calls this when built, and ``search.space.spec`` on every pipeline a space can
    sample, so a space with an impossible combination is rejected when loaded.
    """
    names = [m.name for m in methods]
    for i, cls in enumerate(methods):
        if names.count(cls.name) > 1:
            raise ValueError(f"method '{cls.name}' appears twice in the pipeline {names}; use it once.")
        if cls.must_be_last and i != len(methods) - 1:
            raise ValueError(
                f"method '{cls.name}' must be last in a pipeline (its weights are final), but '{names[i + 1]}' "
                f"follows it in {names}. Move '{cls.name}' to the end of `methods` in the space."
            )
        allowed = cls.restructured_only_by
        for later in methods[i + 1 :] if allowed is not None else ():
            if later.changes_architecture and later.kind not in allowed:
                which = f"only {' or '.join(allowed)} methods" if allowed else "no method"
                why = f" ({cls.restructured_only_by_reason})" if cls.restructured_only_by_reason else ""
                fix = "leave it out" if later.must_be_last else f"put '{later.name}' before '{cls.name}'"
                raise ValueError(
                    f"after method '{cls.name}' {which} may change the architecture{why}, but "
                    f"'{later.name}' ({later.kind}) follows it in {names}. {fix[0].upper()}{fix[1:]}."
                )
    trainers = [m for m in methods if not m.loss_only]
    for i, cls in enumerate(methods):
        if not cls.loss_only or not trainers:
            continue
        if cls.loss_scope == "own":
            raise ValueError(
                f"method '{cls.name}' only adds a loss term to its own phases, which do not run beside "
                f"'{trainers[0].name}' (a method that trains) in {names}; use '{cls.name}' alone."
            )
        if cls.loss_scope == "later" and not any(not m.loss_only for m in methods[i + 1 :]):
            raise ValueError(
                f"method '{cls.name}' adds its loss term to the phases of the methods after it, but "
                f"'{trainers[-1].name}' trains before it and nothing trains after it in {names}. "
                f"Move '{cls.name}' before '{trainers[-1].name}'."
            )


def training_loss(phase: Phase, step: Step) -> torch.Tensor:
    """The loss the loop minimises at ``step`` of ``phase``.

    The task loss (when ``phase.task_loss``), plus each of ``step.loss_terms`` in pipeline order
    (a term may return None), plus the phase's own loss. The phase's own loss is computed first:
    it may run the model itself and hand its outputs to the step.

    Raises:
        ValueError: Nothing to minimise (no own loss, no task loss, no term).
    """
    own = phase.loss(step) if phase.loss is not None else None
    loss = step.ctx.task_loss(step.outputs, step.targets) if phase.task_loss else None
    for term in step.loss_terms:
        extra = term(step)
        if extra is not None:
            loss = extra if loss is None else loss + extra
    if own is not None:
        loss = own if loss is None else loss + own
    if loss is None:
        raise ValueError(
            f"phase '{phase.name}' has nothing to minimise: no loss of its own, no task loss (task_loss=False) "
            "and no loss term applies; give it a loss or set task_loss=True."
        )
    return loss


@dataclass
class TrainingState:
    """Where a pipeline stands after an epoch: enough to continue after a crash.

    Attributes:
        stage: Index of the method being trained.
        phase: Index into that method's ordered phases (before-finalize phases, then after).
        epoch: The next epoch to run in that phase.
        model: The model as trained so far.
        method_states: Each method's :meth:`~methods.Method.state_dict`, in pipeline order.
        optimizer_states: The phase's optimizers' state dicts: ``"model"`` and each
            :class:`~methods.Update`'s name.
        scheduler_state: The phase's learning-rate scheduler's state dict.
        history: Per-epoch metrics so far, one dict per epoch.
        rng_state: Torch's global random state and the train loader's shuffling generator state,
            so a resumed run draws the same batches as an uninterrupted one.
    """

    stage: int
    phase: int
    epoch: int
    model: nn.Module
    method_states: list[dict[str, Any]]
    optimizer_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduler_state: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    rng_state: dict[str, torch.Tensor] | None = None


def _rng_state(ctx: MethodContext) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    generator = getattr(ctx.train_loader, "generator", None)
    if isinstance(generator, torch.Generator):
        state["train_loader"] = generator.get_state()
    return state


def _restore_rng_state(state: dict[str, torch.Tensor], ctx: MethodContext) -> None:
    # .cpu(): a state loaded with map_location="cuda" holds its byte tensors on the GPU.
    torch.set_rng_state(state["torch"].cpu())
    generator = getattr(ctx.train_loader, "generator", None)
    if "train_loader" in state and isinstance(generator, torch.Generator):
        generator.set_state(state["train_loader"].cpu())


EpochCallback = Callable[[TrainingState, dict[str, float]], None]


class Pipeline:
    """Methods applied in order to one model.

    Args:
        methods: The methods, in the order they are applied.

    Raises:
        ValueError: :func:`check_pipeline` refuses the order.
    """

    def __init__(self, methods: list[Method]) -> None:
        check_pipeline([type(m) for m in methods])
        self.methods = methods

    @classmethod
    def from_recipe(cls, recipe: list[dict[str, Any]]) -> Pipeline:
        """Build from ``[{"name": ..., "params": {...}}, ...]`` as stored with each trial."""
        return cls([create_method(step["name"], step.get("params", {})) for step in recipe])

    def recipe(self) -> list[dict[str, Any]]:
        """The JSON-serialisable description that :meth:`from_recipe` rebuilds."""
        return [{"name": m.name, "params": m.recipe_params()} for m in self.methods]

    def _ordered_phases(self, method: Method, ctx: MethodContext) -> tuple[list[Phase], int]:
        """The method's phases, before-finalize first, and the index where finalize runs."""
        if method.loss_only and any(not other.loss_only for other in self.methods):
            return [], 0
        earlier = self.methods[: self.methods.index(method)]
        if method.loss_only and method.loss_scope == "pipeline" and any(other.loss_only for other in earlier):
            # Loss-only methods alone share the first one's phases, which their terms reach.
            return [], 0
        phases = method.phases(ctx)
        before = [p for p in phases if not p.after_finalize]
        after = [p for p in phases if p.after_finalize]
        return before + after, len(before)

    def _reaching(self, stage: int) -> list[Method]:
        """The methods whose loss term applies in the phases of method ``stage``, in pipeline order."""
        out = []
        for index, method in enumerate(self.methods):
            scope = method.loss_scope
            if scope == "pipeline" or (scope == "later" and index <= stage) or (scope == "own" and index == stage):
                out.append(method)
        return out

    def run(
        self,
        model: nn.Module,
        ctx: MethodContext,
        on_epoch_end: EpochCallback | None = None,
        resume: TrainingState | None = None,
    ) -> nn.Module:
        """Apply every method to ``model`` and return the final model.

        Args:
            model: The model to compress (a copy of the baseline); it is changed in place.
            ctx: What the methods may use.
            on_epoch_end: Called after every training epoch with the state and that epoch's metrics.
            resume: A state from ``on_epoch_end`` to continue from instead of starting over; the
                pipeline's methods must be built from the same recipe.
        """
        history: list[dict[str, float]] = []
        if resume is not None:
            if len(resume.method_states) != len(self.methods):
                raise ValueError(
                    f"the checkpoint holds the state of {len(resume.method_states)} methods, but the pipeline has "
                    f"{len(self.methods)}; resume with the recipe that wrote it."
                )
            for method, state in zip(self.methods, resume.method_states):
                method.load_state_dict(state)
            model = resume.model
            history = list(resume.history)
            if resume.rng_state is not None:
                _restore_rng_state(resume.rng_state, ctx)
        for stage, method in enumerate(self.methods):
            if resume is not None and stage < resume.stage:
                continue
            resuming_here = resume is not None and stage == resume.stage
            if not resuming_here:
                ctx.log(f"[{method.name}] prepare")
                model = method.prepare(model, ctx)
            phases, finalize_at = self._ordered_phases(method, ctx)
            reaching = self._reaching(stage)
            loss_terms = [m.loss for m in reaching]
            finalized = False
            for index, phase in enumerate(phases):
                if index == finalize_at and not finalized:
                    if not (resuming_here and resume.phase >= finalize_at):
                        model = self._finalize(method, model, ctx)
                    finalized = True
                if resuming_here and index < resume.phase:
                    continue
                here = resuming_here and index == resume.phase

                def checkpoint(epoch, optimizer_states, scheduler_state, metrics, *, _stage=stage, _index=index, _model=model):
                    metrics = {"epoch": len(history) + 1, "stage": _stage, **metrics}
                    history.append(metrics)
                    if on_epoch_end is not None:
                        state = TrainingState(
                            stage=_stage,
                            phase=_index,
                            epoch=epoch + 1,
                            model=_model,
                            method_states=[m.state_dict() for m in self.methods],
                            optimizer_states=optimizer_states,
                            scheduler_state=scheduler_state,
                            history=list(history),
                            rng_state=_rng_state(ctx),
                        )
                        on_epoch_end(state, metrics)

                ctx.log(f"[{method.name}] phase '{phase.name}': {plural(phase.epochs, 'epoch')}")
                # After prepare (and finalize): a method names modules of the model it trains.
                capture = [name for m in [method, *reaching] for name in m.feature_modules()]
                train_phase(
                    model,
                    phase,
                    ctx,
                    loss_terms,
                    stage_name=f"{method.name}/{phase.name}",
                    start_epoch=resume.epoch if here else 0,
                    optimizer_states=resume.optimizer_states if here else None,
                    scheduler_state=resume.scheduler_state if here else None,
                    on_epoch_end=checkpoint,
                    capture=capture,
                )
            if not finalized:
                model = self._finalize(method, model, ctx)
            resume = None if resuming_here else resume
        return model

    @staticmethod
    def _finalize(method: Method, model: nn.Module, ctx: MethodContext) -> nn.Module:
        ctx.log(f"[{method.name}] finalize")
        return method.finalize(model, ctx)

    def cost(self, model: nn.Module, ctx: MethodContext) -> dict[str, float]:
        """Cost figures the methods report for the final ``model`` (:meth:`Method.cost`); a later method's win."""
        out: dict[str, float] = {}
        for m in self.methods:
            out.update(m.cost(model, ctx))
        return out

    def artifacts(self, model: nn.Module, ctx: MethodContext, folder: Path) -> list[Path]:
        """Every method's :meth:`Method.artifacts` for the final ``model``, each in ``folder/<method name>``."""
        return [path for m in self.methods for path in m.artifacts(model, ctx, Path(folder) / m.name)]

    def metrics(self) -> dict[str, float]:
        """Every method's own figures, keys prefixed with the method's name."""
        out = {}
        for m in self.methods:
            for key, value in m.metrics().items():
                out[f"{m.name}.{key}"] = value
        return out


def build_optimizer(groups: list[dict[str, Any]], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 or Adam over ``groups``; groups may carry their own lr/weight_decay."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', but got '{name}'.")


def _to_device(inputs: Any, device: torch.device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A batch's inputs on ``device``: one tensor, or a tuple of views."""
    if isinstance(inputs, (tuple, list)):
        return tuple(view.to(device) for view in inputs)
    return inputs.to(device)


def _check_finite(loss: torch.Tensor, what: str, epoch: int, iteration: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss became {loss.item()} in '{what}' at epoch {epoch}, "
            f"iteration {iteration}; lower the learning rate or check the method's weights."
        )


def train_phase(
    model: nn.Module,
    phase: Phase,
    ctx: MethodContext,
    loss_terms: list[Callable[[Step], torch.Tensor | None]],
    stage_name: str | None = None,
    start_epoch: int = 0,
    optimizer_states: dict[str, dict[str, Any]] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    on_epoch_end: Callable[..., None] | None = None,
    capture: Sequence[str] = (),
) -> None:
    """Train ``model`` for one phase: cosine learning rate, evaluation after every epoch.

    Args:
        model: The model to train, in place.
        phase: What to train and the hooks to call (order: :class:`~methods.Phase`).
        ctx: The trial's context.
        loss_terms: The loss terms that apply in this phase (:func:`training_loss`).
        stage_name: Shown in logs and errors (``method/phase``).
        start_epoch: The first epoch to run (a resumed run).
        optimizer_states: The optimizers' states to restore; given, the run resumes inside the
            phase and ``on_start`` is not called.
        scheduler_state: The scheduler's state to restore.
        on_epoch_end: ``on_epoch_end(epoch, optimizer_states, scheduler_state, metrics)`` after
            each epoch's validation.
        capture: Module names each :class:`~methods.Step` records (:meth:`~methods.Step.features`).

    Raises:
        NonFiniteLossError: when a step's loss is NaN or infinite.
    """
    if phase.epochs <= 0:
        return
    name = stage_name or phase.name
    if optimizer_states is None and phase.on_start is not None:
        phase.on_start(model)
    lr = phase.lr if phase.lr is not None else ctx.lr
    if phase.param_groups is not None:
        groups = phase.param_groups(model)
    else:
        groups = [{"params": list(trainable_parameters(model))}]
    optimizers = {"model": build_optimizer(groups, phase.optimizer or ctx.optimizer, lr, ctx.weight_decay)}
    for update in phase.updates:
        if update.name in optimizers:
            raise ValueError(f"phase '{name}' has two optimizers named '{update.name}'; name each update uniquely (not 'model').")
        decay = update.weight_decay if update.weight_decay is not None else ctx.weight_decay
        optimizers[update.name] = build_optimizer(update.params(), update.optimizer, update.lr, decay)
    optimizer = optimizers["model"]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=phase.epochs)
    if optimizer_states is not None:
        for key, opt in optimizers.items():
            opt.load_state_dict(optimizer_states[key])
    if scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
    iteration = start_epoch * max(len(ctx.train_loader), 1)
    for epoch in range(start_epoch, phase.epochs):
        model.train()
        if phase.on_epoch_start is not None:
            phase.on_epoch_start(model, epoch)
        total, batches = 0.0, 0
        for inputs, targets in ctx.train_loader:
            step = Step(model, _to_device(inputs, ctx.device), targets, ctx, loss_terms, iteration, epoch, capture)
            for update in phase.updates:
                update_loss = update.loss(step)
                _check_finite(update_loss, f"{name}/{update.name}", epoch, iteration)
                owned = optimizers[update.name]
                owned.zero_grad(set_to_none=True)
                update_loss.backward()
                owned.step()
            loss = training_loss(phase, step)
            _check_finite(loss, name, epoch, iteration)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if phase.after_step is not None:
                phase.after_step(step)
            total += loss.item()
            batches += 1
            iteration += 1
        scheduler.step()
        if phase.on_epoch_end is not None:
            phase.on_epoch_end(model, epoch)
        metrics = {f"val_{k}": v for k, v in ctx.evaluate(model).items()}
        metrics["train_loss"] = total / max(batches, 1)
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(f"the mean training loss of '{name}' is {metrics['train_loss']}.")
        ctx.log(f"  {name} epoch {epoch + 1}/{phase.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if on_epoch_end is not None:
            on_epoch_end(epoch, {key: opt.state_dict() for key, opt in optimizers.items()}, scheduler.state_dict(), metrics)
    if phase.on_end is not None:
        phase.on_end(model)
