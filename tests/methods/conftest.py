"""Fixtures of the method tests: a briefly trained digits baseline and tiny training contexts.

Contexts are built by factories so that every test gets its own model copy and loaders, while
the baseline itself is trained once per session. :class:`ExampleModels` builds one for each
model a method names in ``Method.example_models``: the method contract suite runs there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from methods import MethodContext, Phase, train_phase
from models import create_model
from tasks import Task, create_task, task_kind
from tasks.sequence import SequenceTask

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


def train_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0):
    """A DataLoader shuffling ``dataset`` with a generator seeded by ``seed``, or with ``shuffle`` False a fixed list of its batches."""
    if shuffle:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return list(DataLoader(dataset, batch_size=batch_size))


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
        loader = train_loader(Subset(digits_task.train_set, range(examples)), TINY_BATCH, shuffle, seed)
        ctx = make_context(digits_baseline, loader, val_batches, digits_task, digits_task.example_input(1), epochs, lr)
        return trainable_copy(digits_baseline), ctx

    return make


def random_context(task: Task, model_name: str, **options) -> ContextFactory:
    """``make(epochs=1, lr=0.01, shuffle=False) -> (model, ctx)``: a random ``model_name`` on random data.

    Two batches of 8 examples of ``task``'s input shape and classes. Random data is enough to
    test structure (shapes, export), not accuracy.
    """
    torch.manual_seed(0)
    teacher = frozen(create_model(model_name, **task.model_kwargs(), **options))
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, *task.input_shape, generator=generator), torch.randint(0, task.num_classes, (8,), generator=generator))
        for _ in range(2)
    ]
    data = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    val_batches = batches[:1]

    def make(epochs: int = 1, lr: float = 0.01, shuffle: bool = False):
        ctx = make_context(teacher, train_loader(data, 8, shuffle), val_batches, task, task.example_input(1), epochs, lr)
        return trainable_copy(teacher), ctx

    return make


@pytest.fixture(scope="session")
def cifar_context() -> ContextFactory:
    """``make(epochs=1, lr=0.01, shuffle=False) -> (model, ctx)``: a random ``resnet20`` on random 3x32x32 data."""
    return random_context(Task("random_cifar", 10, (3, 32, 32), train_set=None, val_set=None, test_set=None), "resnet20")


@pytest.fixture(scope="session")
def sequence_context() -> ContextFactory:
    """``make(epochs=1, lr=0.01, shuffle=False) -> (model, ctx)``: a random 16-unit ``gru`` on random sequences.

    Two steps of 4 features (as ``seq_digits``, shorter): the hidden state runs through the gates
    once, and an export unrolls little.
    """
    task = SequenceTask("random_sequence", 10, (2, 4), train_set=None, val_set=None, test_set=None, output="class")
    return random_context(task, "gru", hidden_size=16)


@pytest.fixture(scope="session")
def two_view_context() -> ContextFactory:
    """``make(epochs=1, lr=0.01, shuffle=False) -> (model, ctx)``: a random ``two_branch_digits`` on ``digits_2view``.

    Trained on 16 pairs in both orders (2 batches of 16), validated by retrieval on the whole
    validation split (both modalities).
    """
    task = create_task("digits_2view")
    torch.manual_seed(0)
    teacher = frozen(create_model("two_branch_digits", **task.model_kwargs()))
    pairs = len(task.train_set) // 2
    train = Subset(task.train_set, [*range(16), *range(pairs, pairs + 16)])
    val_batches = [next(iter(DataLoader(task.val_set, batch_size=len(task.val_set))))]

    def make(epochs: int = 1, lr: float = 0.01, shuffle: bool = False):
        ctx = make_context(teacher, train_loader(train, 16, shuffle), val_batches, task, task.example_input(1), epochs, lr)
        ctx.metric = task.metric
        return trainable_copy(teacher), ctx

    return make


@dataclass(frozen=True)
class ExampleModels:
    """``(model, ctx)`` for every model a method may name in ``Method.example_models``.

    Attributes:
        factories: Model name -> (the registered task whose kind its data has, its context factory).
    """

    factories: dict[str, tuple[str, ContextFactory]]

    def __call__(self, model_name: str, epochs: int = 1, shuffle: bool = False) -> tuple[nn.Module, MethodContext]:
        """A fresh trainable copy of the model's baseline and its context (a shuffling loader with ``shuffle``)."""
        return self.factories[model_name][1](epochs=epochs, shuffle=shuffle)

    def task_kind(self, model_name: str) -> str:
        """The kind of task the model runs on here (``"classification"``, ``"two_view"``)."""
        return task_kind(self.factories[model_name][0])


@pytest.fixture(scope="session")
def example_models(digits_context, cifar_context, sequence_context, two_view_context) -> ExampleModels:
    """The models of the method contract: trained ``digits_cnn``, random ``resnet20``, ``gru`` and ``two_branch_digits``."""
    return ExampleModels(
        {
            "digits_cnn": ("digits", digits_context),
            "resnet20": ("cifar10", cifar_context),
            "gru": ("seq_digits", sequence_context),
            "two_branch_digits": ("digits_2view", two_view_context),
        }
    )
