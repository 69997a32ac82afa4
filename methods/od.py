"""Online distillation with cheap convolutions (Xie, Lin, Zhang, Luo, arXiv 1909.13063).

"Training CNNs with cheap convolutions and online distillation"; written from the paper's
description, not from the official code (which has no license). ``prepare`` builds ``students``
copies of the incoming model whose 3x3 convolutions are replaced by cheap ones
(:mod:`methods._cheap_conv`: depthwise, shift or grouped, each followed by a 1x1) and an online
teacher, built without pretraining: the students' final features (the input of each student's
classifier) concatenated, then BN, ReLU and a new linear classifier. All of them train together
with

    L = CE(teacher) + sum_j [ CE(student_j) + T^2 KL(softmax(teacher / T) || softmax(student_j / T)) ]

and ``finalize`` keeps the student with the best validation score by the task's headline metric
and its direction (``ctx.metric``, ``ctx.metric_direction``), as a plain model: the
teacher and the other students are dropped, so later methods (l1_filter, minmax_quant) work on
the cheap student.

Choices, with the reasons:

* The KL is averaged over the batch (``batchmean``, as :mod:`methods.kd`); the reference's
  ``mean`` reduction also divides by the number of classes. The teacher's logits are not
  detached (as in the reference): the KL also trains the teacher and, through it, the features
  the students share with it. ``detach_teacher`` stops that gradient.
* The students start from the incoming model (``from_baseline``): the layers a student keeps
  (stem, BatchNorms, shortcuts, classifier) carry the baseline's weights, or those of the
  methods before ``od`` in the pipeline; the cheap convolutions are new, drawn one student
  after another from the trial's seeded generator, so the students differ. With
  ``from_baseline=false`` every weight is drawn anew, as the reference trains from scratch.
* The teacher head normalises the students' pooled features (BN1d); the reference normalises
  the concatenated feature maps before its pooling, which a generic model does not expose.
* Every other method's loss term (e.g. ``kd`` from the frozen baseline) applies to the
  teacher's logits, which are what the ensemble outputs during this phase: the validation
  accuracy logged during training is the teacher's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods._base import Method, MethodContext, NotApplicable, Touches
from methods._cheap_conv import CHEAP_CONVS, CheapConvKind, cheap_groups, replace_3x3_convs
from methods._hyperparameters import Range, hyperparameter
from methods._registry import register_method
from methods._surgery import first_layers, output_layers
from methods._training import Phase, Step

__all__ = ["OD", "ODConfig", "OnlineEnsemble", "TeacherHead", "online_distillation_loss"]


def online_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, detach_teacher: bool = False
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    Unlike :func:`methods.kd.distillation_loss` the gradient reaches the teacher too, unless
    ``detach_teacher``.
    """
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class TeacherHead(nn.Module):
    """BN, ReLU and a new linear classifier over the students' concatenated features."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and features.shape[0] == 1:
            # Batch statistics need two examples; a last batch of one uses the running ones.
            normed = F.batch_norm(
                features, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps
            )
        else:
            normed = self.bn(features)
        return self.fc(F.relu(normed))


class OnlineEnsemble(nn.Module):
    """The students and the online teacher built on their features; ``forward`` gives the teacher's logits.

    Args:
        students: Models of the same architecture.
        classifier: Name, inside each student, of the linear or conv layer that outputs the
            logits; its input is the student's final feature vector.
    """

    def __init__(self, students: list[nn.Module], classifier: str) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)
        self.classifier = classifier
        layer = students[0].get_submodule(classifier)
        if isinstance(layer, nn.Linear):
            width, num_classes = layer.in_features, layer.out_features
        else:
            width, num_classes = layer.in_channels, layer.out_channels
        self.head = TeacherHead(len(students) * width, num_classes)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher logits and each student's logits, every student run once."""
        features: dict[int, torch.Tensor] = {}
        logits = []
        for index, student in enumerate(self.students):

            def keep(module: nn.Module, args: tuple[torch.Tensor, ...], index: int = index) -> None:
                # A conv classifier reads a map: its pooled channels are the feature vector.
                features[index] = args[0] if args[0].dim() == 2 else args[0].flatten(2).mean(2)

            # A hook only for the call (none stays on the student, which is returned as is).
            handle = student.get_submodule(self.classifier).register_forward_pre_hook(keep)
            try:
                logits.append(student(x))
            finally:
                handle.remove()
        teacher = self.head(torch.cat([features[i] for i in range(len(self.students))], dim=1))
        return teacher, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


@dataclass(frozen=True)
class ODConfig:
    conv: CheapConvKind = hyperparameter(
        "dw", "cheap convolution that replaces every 3x3 one: shift, dw (depthwise) or group", Range(choices=CHEAP_CONVS), compresses="low"
    )
    groups: int = hyperparameter(
        2,
        "groups of the 'group' convolution (reduced to a divisor of the channels)",
        Range(choices=(2, 4, 8, 16)),
        at_least=1,
        compresses="high",
    )
    students: int = hyperparameter(4, "number of students trained together (2 to 4)", Range(2, 4), at_least=2, at_most=4)
    temperature: float = hyperparameter(4.0, "softmax temperature T of the teacher-to-student KL", Range(1.0, 8.0), above=0.0)
    epochs: int | None = hyperparameter(
        None, "epochs of the joint training; unset (null): the space's budget.epochs", Range(1, 30), at_least=0, budget=True
    )
    lr: float | None = hyperparameter(
        None, "learning rate of the joint training; unset (null): the space's training.lr", Range(0.01, 0.2, log=True), above=0.0
    )
    replace_stem: bool = hyperparameter(False, "also make the convolutions that read the raw input cheap (the reference keeps them)")
    from_baseline: bool = hyperparameter(
        True, "students keep the incoming model's weights where their layers are unchanged; false: all weights random"
    )
    detach_teacher: bool = hyperparameter(False, "stop the KL gradient at the teacher (the reference lets it flow)")


@register_method
class OD(Method):
    """Online distillation of students with cheap convolutions; the best student is kept (arXiv 1909.13063)."""

    name = "od"
    Config = ODConfig
    kind = "distillation"
    needs_teacher = False  # the frozen baseline is not used: the teacher is built online
    needs_labels = True
    changes_architecture = True
    applies_to = "3x3 Conv2d layers (groups=1), replaced by cheap convolutions; the stem only with replace_stem"
    # The students share a classifier's input features and learn from the teacher's class
    # distribution (softmax over logits of shape (batch, classes)).
    task_kinds = ("classification",)

    def __init__(self, config: ODConfig | None = None) -> None:
        super().__init__(config)
        self.params: tuple[int, int] | None = None  # (incoming model, one student)
        self.scores: dict[str, float] = {}

    @classmethod
    def model_facts(cls, model: nn.Module, example_input: torch.Tensor) -> tuple[tuple[int, bool], ...]:
        """``(input channels, reads the raw input)`` of each 3x3 convolution a student may replace."""
        stem = set(first_layers(model, example_input))
        return tuple((model.get_submodule(name).in_channels, name in stem) for name in replace_3x3_convs(copy.deepcopy(model), "shift"))

    @classmethod
    def effective_config(cls, config: ODConfig, facts: tuple[tuple[int, bool], ...] | None) -> dict[str, Any]:
        """``groups`` becomes the groups of each replaced convolution (a divisor of its input channels,
        :func:`methods._cheap_conv.cheap_groups`) with the ``group`` kind, and None with the others, which do not read it.
        """
        values = super().effective_config(config, facts)
        if config.conv != "group":
            values["groups"] = None
        elif facts is not None:
            values["groups"] = tuple(cheap_groups(c, config.groups) for c, stem in facts if config.replace_stem or not stem)
        return values

    def touches(self, model: nn.Module, ctx: MethodContext) -> Touches:
        """The 3x3 convolutions each student replaces by cheap ones (the students train from scratch unless ``from_baseline``)."""
        skip = [] if self.config.replace_stem else first_layers(model, ctx.example_input)
        replaced = replace_3x3_convs(copy.deepcopy(model), self.config.conv, self.config.groups, skip=skip)
        if not replaced:
            self.prepare(copy.deepcopy(model), ctx)  # raises its refusal
        return Touches.split(
            model, replaced, lambda name, m: "the stem (set `replace_stem: true`)" if name in skip else "not a 3x3 Conv2d with groups=1"
        )

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        config = self.config
        example = ctx.example_input
        outputs = output_layers(model, example)
        if not outputs:
            raise NotApplicable("od needs a model with a final Conv2d or Linear classifier, but found none; use kd.")
        skip = [] if config.replace_stem else first_layers(model, example)
        students = []
        for _ in range(config.students):
            student = copy.deepcopy(model)
            replaced = replace_3x3_convs(student, config.conv, config.groups, skip=skip)
            if not config.from_baseline:
                _reinitialise(student)
            students.append(student)
        if not replaced:
            raise NotApplicable(
                "od found no 3x3 Conv2d (groups=1) to make cheap"
                + (" outside the stem; set `replace_stem: true` or use" if skip else "; use")
                + " a model with 3x3 convolutions."
            )
        ensemble = OnlineEnsemble(students, outputs[0]).to(next(model.parameters()).device).train()
        self.params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in students[0].parameters()))
        ctx.log(
            f"[od] {config.students} students with {config.conv} convolutions ({len(replaced)} replaced): "
            f"{self.params[1]:,} parameters each, from {self.params[0]:,}"
        )
        return ensemble

    def phases(self, ctx: MethodContext) -> list[Phase]:
        # The task loss is the online teacher's (step.outputs); `_students_loss` adds the students'.
        return [
            Phase(
                name="online_distillation",
                epochs=ctx.epochs if self.config.epochs is None else self.config.epochs,
                lr=self.config.lr,
                loss=self._students_loss,
            )
        ]

    def _students_loss(self, step: Step) -> torch.Tensor:
        """Run the ensemble once, hand the teacher's logits to the step, return the students' terms.

        The loop adds the teacher's task loss and the pipeline's loss terms (on those logits).
        """
        teacher, students = step.model.forward_all(step.inputs)
        step.outputs = teacher
        terms = []
        for logits in students:
            terms.append(step.ctx.task_loss(logits, step.targets))
            terms.append(online_distillation_loss(logits, teacher, self.config.temperature, self.config.detach_teacher))
        return sum(terms[1:], terms[0])

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if not isinstance(model, OnlineEnsemble):
            raise TypeError(f"od expects the OnlineEnsemble its prepare built, but got {type(model).__name__}.")
        teacher = ctx.evaluate(model)
        scores = [ctx.evaluate(student) for student in model.students]
        metric, sign = ctx.metric, (1.0 if ctx.metric_direction == "max" else -1.0)
        # The student best by the task's metric; a lower validation loss breaks ties.
        best = max(range(len(scores)), key=lambda j: (sign * scores[j][metric], -scores[j]["loss"]))
        self.scores = {
            f"teacher_{metric}": float(teacher[metric]),
            **{f"student{j}_{metric}": float(s[metric]) for j, s in enumerate(scores)},
            "best_student": float(best),
            f"best_student_{metric}": float(scores[best][metric]),
        }
        ctx.log(
            f"[od] teacher {metric} {teacher[metric]:.4f}; students "
            + ", ".join(f"{s[metric]:.4f}" for s in scores)
            + f"; keeping student {best}"
        )
        return model.students[best]

    def metrics(self) -> dict[str, float]:
        out = dict(self.scores)
        if self.params is not None:
            out["params_before"], out["student_params"] = (float(n) for n in self.params)
        return out

    def state_dict(self) -> dict[str, object]:
        return {"params": self.params, "scores": dict(self.scores)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.params = state["params"]
        self.scores = dict(state["scores"])


def _reinitialise(model: nn.Module) -> None:
    """Draw every weight anew (each layer's own default initialisation)."""
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
