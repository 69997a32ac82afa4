"""Fixtures of the method tests: a briefly trained digits baseline and tiny training contexts.

Contexts are built by factories so that every test gets its own model copy and loaders, while
the baseline itself is trained once per session.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from methods import MethodContext, Phase, train_phase
from models import create_model
from tasks import Task, create_task

#: (model, context) built fresh on every call.
ContextFactory = Callable[..., tuple[nn.Module, MethodContext]]

BASELINE_EPOCHS = 3
TINY_BATCH = 32


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients, as a trial's teacher is."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy of a frozen baseline that can be trained, as a trial's starting model is."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def make_context(
    teacher: nn.Module,
    train_loader,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
    task: Task,
    example_input: torch.Tensor,
    epochs: int = 1,
    lr: float = 0.01,
) -> MethodContext:
    return MethodContext(
        teacher=teacher,
        train_loader=train_loader,
        val_loader=val_batches,
        task_loss=task.loss,
        evaluate=lambda model: task.evaluate(model, val_batches, "cpu"),
        example_input=example_input,
        device=torch.device("cpu"),
        epochs=epochs,
        lr=lr,
        seed=0,
        log=lambda message: None,
    )


@pytest.fixture(scope="session")
def digits_task() -> Task:
    return create_task("digits")


@pytest.fixture(scope="session")
def digits_baseline(digits_task: Task) -> nn.Module:
    """``digits_cnn`` trained for a few epochs on the full digits train split; frozen."""
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10, in_channels=1)
    loader = DataLoader(digits_task.train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(digits_task.val_set, batch_size=256)
    ctx = make_context(model, loader, list(val), digits_task, digits_task.example_input(1), lr=0.05)
    train_phase(model, Phase("baseline", BASELINE_EPOCHS), ctx, loss_terms=[])
    accuracy = digits_task.evaluate(model, val, "cpu")["accuracy"]
    assert accuracy > 0.8, f"the digits baseline only reached {accuracy:.3f} validation accuracy"
    return frozen(model)


@pytest.fixture(scope="session")
def digits_context(digits_task: Task, digits_baseline: nn.Module) -> ContextFactory:
    """``make(epochs=1, shuffle=False, examples=2 * TINY_BATCH, seed=0) -> (model, ctx)`` on digits.

    With ``shuffle`` the train loader is a shuffling DataLoader over the first ``examples``
    training examples with a generator seeded by ``seed``; otherwise a fixed list of batches.
    """
    val_batches = [next(iter(DataLoader(digits_task.val_set, batch_size=64)))]

    def make(epochs: int = 1, shuffle: bool = False, examples: int = 2 * TINY_BATCH, seed: int = 0, lr: float = 0.01):
        subset = Subset(digits_task.train_set, range(examples))
        if shuffle:
            loader = DataLoader(subset, batch_size=TINY_BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
        else:
            loader = list(DataLoader(subset, batch_size=TINY_BATCH))
        ctx = make_context(digits_baseline, loader, val_batches, digits_task, digits_task.example_input(1), epochs, lr)
        return trainable_copy(digits_baseline), ctx

    return make


@pytest.fixture(scope="session")
def cifar_context() -> ContextFactory:
    """``make(epochs=1) -> (model, ctx)``: a random ``resnet20`` on random 3x32x32 data, 2 batches of 8.

    Random data is enough to test structure (shapes, export), not accuracy.
    """
    torch.manual_seed(0)
    teacher = frozen(create_model("resnet20", num_classes=10, in_channels=3))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)) for _ in range(2)]
    task = Task("random_cifar", 10, (3, 32, 32), train_set=None, val_set=None, test_set=None)

    def make(epochs: int = 1, lr: float = 0.01):
        ctx = make_context(teacher, batches, batches[:1], task, task.example_input(1), epochs, lr)
        return trainable_copy(teacher), ctx

    return make
