"""Knowledge distillation: the loss against a hand computation, its zero and its T^2 scaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from methods import Step, create_method
from methods.kd import distillation_loss

STUDENT = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
TEACHER = [[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over rows of sum_i p_i * (log p_i - log q_i), p the teacher's, q the student's."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p, q = _softmax(t_row, t), _softmax(s_row, t)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    return t * t * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_loss_matches_hand_computation(temperature: float) -> None:
    got = distillation_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64), temperature)
    assert got.item() == pytest.approx(_by_hand(STUDENT, TEACHER, temperature), rel=1e-12)


def test_distillation_loss_hand_value_at_t2() -> None:
    # A fixed figure so the hand formula itself is pinned too.
    assert _by_hand(STUDENT, TEACHER, 2.0) == pytest.approx(1.1893, abs=1e-4)
    got = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), 2.0)
    assert got.item() == pytest.approx(1.1893, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_distillation_loss_is_zero_when_student_equals_teacher(temperature: float) -> None:
    logits = torch.tensor(STUDENT)
    assert distillation_loss(logits, logits.clone(), temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature).item() > 0.1


@pytest.mark.parametrize("temperature", [2.0, 4.0, 8.0])
def test_distillation_loss_scales_with_t_squared(temperature: float) -> None:
    """Logits scaled by T give the same softmax at temperature T, so only the T^2 factor remains."""
    student, teacher = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    at_one = distillation_loss(student, teacher, 1.0)
    scaled = distillation_loss(student * temperature, teacher * temperature, temperature)
    assert scaled.item() == pytest.approx(temperature**2 * at_one.item(), rel=1e-12)


def test_distillation_gradient_reaches_the_student_only() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    # d/ds of T^2 * KL at temperature T, batch mean: T * (q - p) / batch.
    p = torch.softmax(torch.tensor(TEACHER) / 2.0, dim=1)
    q = torch.softmax(torch.tensor(STUDENT) / 2.0, dim=1)
    torch.testing.assert_close(student.grad, 2.0 * (q - p) / 2, atol=1e-6, rtol=0)


def test_kd_loss_term_is_weight_times_distillation_loss(digits_context) -> None:
    _, ctx = digits_context()
    student = nn.Linear(3, 3)
    ctx.teacher = nn.Linear(3, 3).eval()
    inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    step = Step(student, inputs, torch.zeros(4, dtype=torch.long), ctx, [], iteration=0, epoch=0)
    kd = create_method("kd", {"temperature": 3.0, "weight": 0.5})
    expected = 0.5 * distillation_loss(student(inputs), ctx.teacher(inputs), 3.0)
    torch.testing.assert_close(kd.loss(step), expected)
    assert kd.needs_teacher and kd.loss_only and not kd.changes_architecture
