"""The :class:`Task` record and the dataset helpers shared by the task factories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from errors import UserError


@dataclass
class Task:
    """A data set split three ways plus the metric used to judge a model on it.

    **Your own task.** A space names it as ``task: {import: "my_task.py:MyTask", options: {...}}``:
    a subclass of ``Task`` whose constructor takes the ``options`` as keyword arguments and
    calls ``super().__init__`` with the fields below. What a user provides:

    - ``train_set``, ``val_set``, ``test_set``: map-style datasets (``__len__`` and
      ``__getitem__``) of ``(input, target)`` pairs of tensors; trials train on the first, select
      on the second and report on the third;
    - ``input_shape``: one input's shape without the batch, ``(C, H, W)`` for images (FLOPs,
      latency and the exported program are traced at it), and ``num_classes``;
    - ``metric_directions`` (class attribute): each metric :meth:`evaluate` returns that the
      search may judge by, headline first, with ``"max"`` or ``"min"``; ``metrics`` must list
      the same names (a classifier: ``{"accuracy": "max"}``, and ``metrics`` left at its
      default);
    - ``kind`` (class attribute): one of :data:`tasks.TASK_KINDS`, e.g. ``"classification"``;
      methods that apply to some kinds only are refused for others;
    - optionally :meth:`loss` (default cross-entropy on logits) and :meth:`evaluate` (default
      accuracy and loss), overridden together for another kind of output.

    Both class attributes are read without building the task (``slimtune check`` and the space's
    ``objectives``/``constraints`` use them); the rest is checked once the task is built.
    ``examples/own_model/digits_task.py`` is a complete one.

    Attributes:
        name: Registry name of the task, e.g. ``"cifar10"``.
        num_classes: Number of target classes.
        input_shape: ``(C, H, W)`` of one example; used to build example inputs for FLOPs and latency.
        train_set: Examples the model is trained on.
        val_set: Held-out examples used for model selection inside trials.
        test_set: Examples whose accuracy is reported.
        metrics: Quality metrics :meth:`evaluate` returns; the first is the headline one (model
            selection, ``<metric>_drop``). Whether each is maximised or minimised is declared
            where the task registers (:func:`tasks.task_metrics`).
        eval_batch_size: Batch size of the val and test loaders (1 where examples differ in
            size, as the full images of super-resolution do).
        reference: What a model that learns nothing scores, by metric (``{"mse": 0.167}`` on
            ``adding``: predicting the mean); logged beside the baseline. Empty when not known.
    """

    #: A user task's kind and its metrics' directions (above), declared by its class; registered
    #: tasks declare theirs with :func:`tasks.register_task` instead and have neither.
    kind: ClassVar[str]
    metric_directions: ClassVar[dict[str, str]]

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    metrics: tuple[str, ...] = ("accuracy",)
    eval_batch_size: int = 256
    reference: dict[str, float] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The headline quality metric."""
        return self.metrics[0]

    def model_kwargs(self) -> dict[str, Any]:
        """What a model factory needs to fit this task's data (``create_model(name, **kwargs)``)."""
        return {"num_classes": self.num_classes, "in_channels": self.input_shape[0]}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the mean cross-entropy of ``outputs`` (logits) against integer ``targets``."""
        return F.cross_entropy(outputs, targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device | str) -> dict[str, float]:
        """Measure top-1 accuracy and mean cross-entropy of ``model`` over ``loader``.

        The model runs in eval mode without gradients; its previous train/eval mode is restored
        afterwards so that evaluating in the middle of training does not change how it trains.

        Args:
            model: Classifier already placed on ``device``.
            loader: Batches of ``(inputs, targets)``.
            device: Device the batches are moved to.

        Returns:
            ``{"accuracy": fraction correct in [0, 1], "loss": mean cross-entropy per example}``.

        Raises:
            ValueError: If ``loader`` yields no examples, since no accuracy can be defined.
        """
        was_training = model.training
        model.eval()
        correct = 0
        total = 0
        loss_sum = 0.0
        try:
            with torch.no_grad():
                for inputs, targets in loader:
                    inputs = inputs.to(device)
                    targets = targets.to(device)
                    outputs = model(inputs)
                    # Summing per batch and dividing once keeps the mean exact when the last batch is short.
                    loss_sum += F.cross_entropy(outputs, targets, reduction="sum").item()
                    correct += (outputs.argmax(dim=1) == targets).sum().item()
                    total += targets.numel()
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError(f"cannot evaluate task '{self.name}': the loader yielded no examples.")
        return {"accuracy": correct / total, "loss": loss_sum / total}

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """Return zeros of shape ``(batch_size, *input_shape)`` to trace or time a model with."""
        return torch.zeros(batch_size, *self.input_shape)


class TransformedSubset(Dataset):
    """A view of some examples of a dataset, with its own transform applied to each input.

    Lets the train and val splits carved out of one training set share the loaded data while
    using different transforms (augmentation on train only).

    Args:
        dataset: Dataset returning ``(input, target)`` pairs with no transform of its own.
        indices: Positions in ``dataset`` that make up this view.
        transform: Applied to each input; ``None`` leaves it unchanged.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        inputs, target = self.dataset[self.indices[index]]
        if self.transform is not None:
            inputs = self.transform(inputs)
        return inputs, target


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` as a float if it lies strictly between 0 and 1, else raise a UserError.

    Args:
        name: Option name shown in the message, e.g. ``"val_fraction"``.
        value: The value the user gave.
    """
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction < 1.0:
        raise UserError(
            f"task option {name} must be a number between 0 and 1 (exclusive), got {value!r}. Set task.options.{name} to e.g. 0.1."
        )
    return fraction


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` at random into kept and held-out positions, the same way for the same seed.

    Args:
        n: Number of examples to split.
        fraction: Share of examples held out; at least one example goes to each side.
        seed: Seed of the shuffle, so that the split is fixed across runs and trials.

    Returns:
        ``(kept, held_out)`` lists of positions, each sorted.

    Raises:
        UserError: If ``n`` is too small to keep and hold out at least one example each.
    """
    if n < 2:
        raise UserError(f"cannot hold out a validation split from {n} training example(s); at least 2 are needed.")
    n_held = min(max(1, round(n * fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_held:].tolist()), sorted(order[:n_held].tolist())
