"""Knowledge distillation from the uncompressed baseline (Hinton et al., 2015, arXiv 1503.02531).

Adds ``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (batch mean) to the
loss of every training phase of every method in the pipeline (``loss_scope = "pipeline"``), so
"prune then kd" fine-tunes the pruned model with distillation and "gal then kd" distils during
gal's label-free adversarial phase (the term reads no labels). The task's cross-entropy stays at
weight 1: the KD term is added, not mixed with ``(1 - weight)``, so one ``weight`` means the same
thing in every pipeline. Alone in a pipeline it fine-tunes the baseline itself with the
distillation loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods._base import Method, MethodContext, NotApplicable
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._training import Step

__all__ = ["KD", "KDConfig", "distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2


def _check_logits(model: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise NotApplicable(
            f"kd distils class logits of shape (batch, classes), but {model} outputs {shape} in training; "
            "it applies to classification models only (for a two-branch model use vcd, vml or vsd)."
        )


@dataclass(frozen=True)
class KDConfig:
    temperature: float = hyperparameter(4.0, "softmax temperature T", Range(1.0, 8.0), above=0.0)
    weight: float = hyperparameter(1.0, "weight of the distillation term next to the task loss", Range(0.1, 2.0, log=True), at_least=0.0)


@register_method
class KD(Method):
    """Knowledge distillation: a temperature-softened KL term towards the frozen baseline (arXiv 1503.02531)."""

    name = "kd"
    Config = KDConfig
    kind = "distillation"
    needs_teacher = True
    loss_only = True
    loss_scope = "pipeline"
    task_kinds = ("classification",)
    example_models = ("digits_cnn", "resnet20", "gru")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Refuse a model whose training output is not class logits (a two-branch model's heads)."""
        probe = copy.deepcopy(model).train()  # a copy: batch-norm statistics and the random stream stay untouched
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            shape = tuple(probe(torch.cat([ctx.example_input, ctx.example_input])).shape)
        _check_logits(type(model).__name__, shape)
        return model

    def loss(self, step: Step) -> torch.Tensor:
        _check_logits(type(step.model).__name__, tuple(step.outputs.shape))
        return self.config.weight * distillation_loss(step.outputs, step.teacher_outputs, self.config.temperature)
