"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, arXiv 1608.08710).

Deciding: a filter's importance is the L1 norm of its own weights (torch-pruning's
``MagnitudeImportance(p=1, group_reduction="first")``). Doing: the lowest-scoring ``ratio`` of the
output channels of every prunable layer are physically removed with torch-pruning, together with
every channel coupled to them (the next layer's inputs, BatchNorm, residual additions). The
classifier keeps its outputs, and so do layers coupled to attention, recurrent layers or shared
weights (:func:`methods._surgery.channel_plan` says why for each). One-shot, then a fine-tune
(shaped by any distillation method in the pipeline).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from deploy import eval_mode
from methods._base import Method, MethodContext, NotApplicable, Touches
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._surgery import channel_plan, loose_parameters, pruning_axes

__all__ = ["L1Filter", "L1FilterConfig"]


@dataclass(frozen=True)
class L1FilterConfig:
    ratio: float = hyperparameter(
        0.5, "fraction of output channels removed from every prunable layer", Range(0.1, 0.8), at_least=0.0, below=1.0, compresses="high"
    )
    round_to: int = hyperparameter(
        1, "keep channel counts a multiple of this (hardware-friendly sizes)", Range(choices=(1, 4, 8)), at_least=1, compresses="low"
    )


@register_method
class L1Filter(Method):
    """One-shot removal of the output channels with the smallest L1 norm, then a fine-tune (arXiv 1608.08710)."""

    name = "l1_filter"
    Config = L1FilterConfig
    kind = "pruning"
    changes_architecture = True
    applies_to = "output channels of Conv2d and Linear layers (with the channels coupled to them); not the classifier, attention, recurrent or shared layers"

    def __init__(self, config: L1FilterConfig | None = None) -> None:
        super().__init__(config)
        self.removed_fraction = 0.0

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        example = ctx.example_input
        before = sum(p.numel() for p in model.parameters())
        ignored = _ignored_layers(model, self.touches(model, ctx))
        axes = pruning_axes(loose_parameters(model, example))
        with eval_mode(model), warnings.catch_warnings():  # traced without updating batch-norm statistics
            # Every loose parameter it would warn about has its axis in `axes`, but those of size 1 in
            # every dimension, which it leaves out of the graph (they broadcast): nothing to warn about.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
            pruner = tp.pruner.MagnitudePruner(
                model,
                example,
                importance=tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None),
                pruning_ratio=self.config.ratio,
                ignored_layers=ignored,
                round_to=self.config.round_to if self.config.round_to > 1 else None,
                unwrapped_parameters=axes,
            )
            pruner.step()
        after = sum(p.numel() for p in model.parameters())
        self.removed_fraction = 1.0 - after / before
        ctx.log(f"[l1_filter] removed {before - after} of {before} parameters")
        return model

    def touches(self, model: nn.Module, ctx: MethodContext) -> Touches:
        """The layers whose output channels are removed, and why each other layer keeps them.

        Raises:
            NotApplicable: No layer's output channels can be removed safely.
        """
        plan = channel_plan(model, ctx.example_input)
        if not plan.prunable:
            reasons = [r for r in plan.left_alone if not r[1].startswith("the classifier")] or list(plan.left_alone)
            layer, why = reasons[0] if reasons else ("(none)", "the model has no Conv2d or Linear layer")
            raise NotApplicable(
                f"l1_filter found no layer of {type(model).__name__} whose output channels can be removed safely: "
                f"'{layer}' is left alone ({why}), and so is every other; use minmax_quant (quantization), kd "
                "or a model of plain convolution or linear stacks."
            )
        return Touches(plan.prunable, plan.left_alone)

    @classmethod
    def model_facts(cls, model: nn.Module, example_input: torch.Tensor) -> tuple[int, ...] | None:
        """The output width of every layer torch-pruning may take as a group's root: each prunable
        layer, and any other convolution, linear or LSTM layer outside the ignored ones (a
        ``Conv1d``). None when no layer can be pruned (the trial fails with :meth:`touches`' reason).

        Layers whose channels are coupled share one group and one width; listing each of them, or
        a layer the pruner then leaves whole, only makes :meth:`effective_config` finer, never coarser.
        """
        plan = channel_plan(model, example_input)
        if not plan.prunable:
            return None
        ignored = {id(sub) for m in _ignored_layers(model, Touches(plan.prunable, plan.left_alone)) for sub in m.modules()}
        widths = []
        for m in model.modules():
            if id(m) in ignored:
                continue
            if isinstance(m, nn.modules.conv._ConvNd):
                widths.append(m.out_channels)
            elif isinstance(m, nn.Linear):
                widths.append(m.out_features)
            elif isinstance(m, nn.LSTM):
                widths.append(m.hidden_size)
        return tuple(widths)

    @classmethod
    def effective_config(cls, config: L1FilterConfig, facts: tuple[int, ...] | None) -> dict[str, object]:
        """``ratio`` becomes the channels each group keeps: ``int(width * (1 - ratio))``, torch-pruning's
        rounding (local pruning, one step), before ``round_to``, which stays as it is.

        With the same kept counts the same channels go (the lowest L1 norms), so the model is the
        same; ``round_to`` rounds those counts further, but it also changes how torch-pruning picks
        the channels (a sort instead of a top-k), so it is kept apart rather than resolved.
        """
        if facts is None:
            return super().effective_config(config, facts)
        return {"kept": tuple(int(width * (1 - config.ratio)) for width in facts), "round_to": config.round_to}

    def metrics(self) -> dict[str, float]:
        return {"params_removed_fraction": self.removed_fraction}

    def state_dict(self) -> dict[str, float]:
        return {"removed_fraction": self.removed_fraction}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.removed_fraction = state["removed_fraction"]


def _ignored_layers(model: nn.Module, plan: Touches) -> list[nn.Module]:
    """The modules torch-pruning must leave whole: every layer :meth:`L1Filter.touches` leaves alone, and every other Conv2d or Linear."""
    prunable = set(plan.changed)
    left = {name for name, _ in plan.left_alone}
    return [m for name, m in model.named_modules() if name in left or (isinstance(m, (nn.Conv2d, nn.Linear)) and name not in prunable)]
