"""A pipeline applies several methods in order in one trial, with one training loop for all.

Order of work for each method: ``prepare``, the phases that come before finalize, ``finalize``,
the phases marked ``after_finalize``. The loss term of every method (``Method.loss``) shapes
every phase that uses the default loss, wherever the method stands in the pipeline.

After every epoch the pipeline hands a :class:`TrainingState` to ``on_epoch_end``; a trial saves
it as its checkpoint, and ``Pipeline.run(resume=state)`` continues from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from methods._base import Method, MethodContext, Phase, Step, trainable_parameters
from methods._registry import create_method

__all__ = ["Pipeline", "TrainingState", "NonFiniteLossError", "train_phase"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial fails with this reason."""


@dataclass
class TrainingState:
    """Where a pipeline stands after an epoch: enough to continue after a crash.

    Attributes:
        stage: Index of the method being trained.
        phase: Index into that method's ordered phases (before-finalize phases, then after).
        epoch: The next epoch to run in that phase.
        model: The model as trained so far.
        methods: The pipeline's method objects, with their internal state (masks, momentum).
        optimizer_state: The phase optimizer's state dict.
        scheduler_state: The phase scheduler's state dict.
        history: Per-epoch metrics so far, one dict per epoch.
        rng_state: Torch's global random state and the train loader's shuffling generator state,
            so a resumed run draws the same batches as an uninterrupted one.
    """

    stage: int
    phase: int
    epoch: int
    model: nn.Module
    methods: list[Method]
    optimizer_state: dict[str, Any] | None = None
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
    """

    def __init__(self, methods: list[Method]) -> None:
        names = [m.name for m in methods]
        for i, m in enumerate(methods):
            if names.count(m.name) > 1:
                raise ValueError(f"method '{m.name}' appears twice in the pipeline {names}; use it once.")
            if m.must_be_last and i != len(methods) - 1:
                raise ValueError(
                    f"method '{m.name}' must be last in a pipeline (its weights are final), "
                    f"but the order is {names}. Move it to the end of `methods` in the space."
                )
        self.methods = methods

    @classmethod
    def from_recipe(cls, recipe: list[dict[str, Any]]) -> Pipeline:
        """Build from ``[{"name": ..., "params": {...}}, ...]`` as stored with each trial."""
        return cls([create_method(step["name"], step.get("params", {})) for step in recipe])

    def recipe(self) -> list[dict[str, Any]]:
        """The JSON-serialisable description that :meth:`from_recipe` rebuilds."""
        import dataclasses

        return [{"name": m.name, "params": dataclasses.asdict(m.config)} for m in self.methods]

    def _ordered_phases(self, method: Method, ctx: MethodContext) -> tuple[list[Phase], int]:
        """The method's phases, before-finalize first, and the index where finalize runs."""
        if method.loss_only and any(not other.loss_only for other in self.methods):
            return [], 0
        phases = method.phases(ctx)
        before = [p for p in phases if not p.after_finalize]
        after = [p for p in phases if p.after_finalize]
        return before + after, len(before)

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
            resume: A state from ``on_epoch_end`` to continue from instead of starting over.
        """
        history: list[dict[str, float]] = []
        if resume is not None:
            self.methods = resume.methods
            model = resume.model
            history = list(resume.history)
            if resume.rng_state is not None:
                _restore_rng_state(resume.rng_state, ctx)
        loss_terms = [m.loss for m in self.methods]
        for stage, method in enumerate(self.methods):
            if resume is not None and stage < resume.stage:
                continue
            resuming_here = resume is not None and stage == resume.stage
            if not resuming_here:
                ctx.log(f"[{method.name}] prepare")
                model = method.prepare(model, ctx)
            phases, finalize_at = self._ordered_phases(method, ctx)
            finalized = False
            for index, phase in enumerate(phases):
                if index == finalize_at and not finalized:
                    if not (resuming_here and resume.phase >= finalize_at):
                        model = self._finalize(method, model, ctx)
                    finalized = True
                if resuming_here and index < resume.phase:
                    continue
                start = resume.epoch if resuming_here and index == resume.phase else 0

                def checkpoint(epoch, optimizer, scheduler, metrics, *, _stage=stage, _index=index, _model=model):
                    metrics = {"epoch": len(history) + 1, "stage": _stage, **metrics}
                    history.append(metrics)
                    if on_epoch_end is not None:
                        state = TrainingState(
                            stage=_stage,
                            phase=_index,
                            epoch=epoch + 1,
                            model=_model,
                            methods=self.methods,
                            optimizer_state=optimizer.state_dict(),
                            scheduler_state=scheduler.state_dict(),
                            history=list(history),
                            rng_state=_rng_state(ctx),
                        )
                        on_epoch_end(state, metrics)

                ctx.log(f"[{method.name}] phase '{phase.name}': {phase.epochs} epochs")
                train_phase(
                    model,
                    phase,
                    ctx,
                    loss_terms,
                    stage_name=f"{method.name}/{phase.name}",
                    start_epoch=start,
                    optimizer_state=resume.optimizer_state if resuming_here and index == resume.phase else None,
                    scheduler_state=resume.scheduler_state if resuming_here and index == resume.phase else None,
                    on_epoch_end=checkpoint,
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

    def metrics(self) -> dict[str, float]:
        """Every method's own figures, keys prefixed with the method's name."""
        out = {}
        for m in self.methods:
            for key, value in m.metrics().items():
                out[f"{m.name}.{key}"] = value
        return out


def build_optimizer(
    groups: list[dict[str, Any]], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 or Adam over ``groups``; groups may carry their own lr/weight_decay."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', but got '{name}'.")


def train_phase(
    model: nn.Module,
    phase: Phase,
    ctx: MethodContext,
    loss_terms: list[Callable[[Step], torch.Tensor | None]],
    stage_name: str | None = None,
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    on_epoch_end: Callable[..., None] | None = None,
) -> None:
    """Train ``model`` for one phase: cosine learning rate, evaluation after every epoch.

    Raises:
        NonFiniteLossError: when a step's loss is NaN or infinite.
    """
    if phase.epochs <= 0:
        return
    lr = phase.lr if phase.lr is not None else ctx.lr
    if phase.param_groups is not None:
        groups = phase.param_groups(model)
    else:
        groups = [{"params": list(trainable_parameters(model))}]
    optimizer = build_optimizer(groups, phase.optimizer or ctx.optimizer, lr, ctx.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=phase.epochs)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
    iteration = start_epoch * max(len(ctx.train_loader), 1)
    for epoch in range(start_epoch, phase.epochs):
        model.train()
        total, batches = 0.0, 0
        for inputs, targets in ctx.train_loader:
            inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
            step = Step(model, inputs, targets, ctx, loss_terms, iteration, epoch)
            loss = phase.loss(step) if phase.loss is not None else step.default_loss()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the loss became {loss.item()} in '{stage_name or phase.name}' at epoch {epoch}, "
                    f"iteration {iteration}; lower the learning rate or check the method's weights."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if phase.after_step is not None:
                phase.after_step(step)
            total += loss.item()
            batches += 1
            iteration += 1
        scheduler.step()
        metrics = {f"val_{k}": v for k, v in ctx.evaluate(model).items()}
        metrics["train_loss"] = total / max(batches, 1)
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(f"the mean training loss of '{stage_name}' is {metrics['train_loss']}.")
        ctx.log(
            f"  {stage_name or phase.name} epoch {epoch + 1}/{phase.epochs}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, optimizer, scheduler, metrics)
