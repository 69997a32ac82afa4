"""Sequence tasks for recurrent models: ``adding``, ``copy_memory``, ``seq_digits`` and ``char_text``.

Every example is a float tensor ``(steps, features)`` (symbols one-hot encoded), so a recurrent
model reads ``(batch, steps, features)`` and :meth:`Task.example_input` builds a valid input.
The task tells the model what to output through :meth:`SequenceTask.model_kwargs`
(``num_classes``, ``in_channels`` = features per step, ``per_step``).

- ``adding`` (Hochreiter & Schmidhuber 1997): two channels, random values in [0, 1] and a marker
  that is 1 at two steps (one in each half); the target is the sum of the two marked values.
  Metric ``mse`` (lower is better). Predicting the mean, 1, scores the variance of a sum of two
  uniform values, 2/12 = 0.167: a model that learns nothing stays at that baseline
  (:attr:`Task.reference`, logged beside the trained baseline).
- ``copy_memory`` (Arjovsky et al. 2016): ``length`` symbols out of 8, ``delay`` blanks, a
  delimiter, then the model repeats the symbols. Cross-entropy over every step; metric
  ``accuracy`` on the recalled symbols only (chance: 1/8).
- ``seq_digits``: scikit-learn's 8x8 digits read row by row (8 steps of 8 pixels) or pixel by
  pixel (64 steps of 1), the same 60/20/20 split as ``digits``; metric ``accuracy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from errors import UserError
from tasks._base import Task
from tasks._registry import register_task
from tasks.digits import _arrays

__all__ = ["SequenceTask", "adding", "copy_memory", "seq_digits"]


@dataclass
class SequenceTask(Task):
    """A task whose examples are sequences ``(steps, features)``.

    Attributes:
        output: ``"regression"`` (one value per example: MSE), ``"class"`` (logits per example:
            cross-entropy, accuracy) or ``"per_step"`` (logits at every step,
            ``(batch, steps, classes)``: cross-entropy over all steps, accuracy over the last
            ``scored_steps``, bits per character).
        scored_steps: For ``per_step``, how many final steps count for ``accuracy`` (None: all).
    """

    output: str = "class"
    scored_steps: int | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """``num_classes`` (1 for regression), ``in_channels`` (features per step) and ``per_step``."""
        return {"num_classes": self.num_classes, "in_channels": self.input_shape[-1], "per_step": self.output == "per_step"}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MSE for regression, cross-entropy otherwise (averaged over every step for ``per_step``)."""
        if self.output == "regression":
            return F.mse_loss(outputs.reshape(targets.shape), targets)
        if self.output == "per_step":
            return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
        return F.cross_entropy(outputs, targets)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device | str) -> dict[str, float]:
        """Every metric of the task's kind over ``loader``, and ``loss`` (the training loss's mean).

        Returns:
            Regression: ``{"mse", "loss"}``. Class: ``{"accuracy", "loss"}``. Per step:
            ``{"accuracy" (over the scored steps), "bpc" (loss / ln 2), "loss"}``.
        """
        was_training = model.training
        model.eval()
        loss_sum, correct, scored, total = 0.0, 0, 0, 0
        try:
            with torch.no_grad():
                for inputs, targets in loader:
                    inputs, targets = inputs.to(device), targets.to(device)
                    outputs = model(inputs)
                    total += targets.numel()
                    if self.output == "regression":
                        loss_sum += F.mse_loss(outputs.reshape(targets.shape), targets, reduction="sum").item()
                        continue
                    flat = outputs.reshape(-1, outputs.shape[-1])
                    loss_sum += F.cross_entropy(flat, targets.reshape(-1), reduction="sum").item()
                    predicted = outputs.argmax(dim=-1)
                    if self.output == "per_step" and self.scored_steps is not None:
                        predicted, targets = predicted[:, -self.scored_steps :], targets[:, -self.scored_steps :]
                    correct += (predicted == targets).sum().item()
                    scored += targets.numel()
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError(f"cannot evaluate task '{self.name}': the loader yielded no examples.")
        loss = loss_sum / total
        if self.output == "regression":
            return {"mse": loss, "loss": loss}
        out = {"accuracy": correct / scored, "loss": loss}
        if self.output == "per_step":
            out["bpc"] = loss / math.log(2)
        return out


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``; UserError naming ``task.options.<name>`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise UserError(f"task option {name} must be a whole number >= {minimum}, got {value!r}. Set task.options.{name}.")
    return int(value)


def _sizes(train_size: Any, val_size: Any, test_size: Any) -> tuple[int, int, int]:
    return positive_int("train_size", train_size), positive_int("val_size", val_size), positive_int("test_size", test_size)


def adding_examples(count: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` adding-problem sequences ``(length, 2)`` and their targets (the sum of the two marked values)."""
    values = rng.uniform(0.0, 1.0, size=(count, length)).astype(np.float32)
    half = length // 2
    first = rng.integers(0, half, size=count)
    second = rng.integers(half, length, size=count)
    markers = np.zeros((count, length), dtype=np.float32)
    rows = np.arange(count)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return np.stack([values, markers], axis=-1), targets.astype(np.float32)


#: The MSE of always predicting 1, the mean target: the variance of a sum of two U(0, 1) values.
ADDING_VARIANCE = 2.0 / 12.0


@register_task("adding", metrics={"mse": "min"}, kind="regression")
def adding(length: int = 30, train_size: int = 5000, val_size: int = 1000, test_size: int = 1000, seed: int = 0) -> SequenceTask:
    """Build the adding problem (module docstring); ``length`` is T, the number of steps (>= 2)."""
    length = positive_int("length", length, minimum=2)
    sizes = _sizes(train_size, val_size, test_size)
    rng = np.random.default_rng(int(seed))
    sets = [TensorDataset(*(torch.from_numpy(a) for a in adding_examples(n, length, rng))) for n in sizes]
    return SequenceTask(
        name="adding",
        num_classes=1,
        input_shape=(length, 2),
        train_set=sets[0],
        val_set=sets[1],
        test_set=sets[2],
        metrics=("mse",),
        output="regression",
        reference={"mse": ADDING_VARIANCE},
    )


#: Symbol 0 is the blank, 1..8 the symbols to remember, 9 the delimiter.
COPY_SYMBOLS = 8
COPY_CLASSES = COPY_SYMBOLS + 2


def copy_examples(count: int, delay: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` copy-memory sequences, one-hot ``(delay + 2 * length, 10)``, and their targets ``(delay + 2 * length,)``.

    Input: ``length`` symbols, ``delay - 1`` blanks, the delimiter, ``length`` blanks. Target:
    blanks, then the symbols in the last ``length`` steps.
    """
    steps = delay + 2 * length
    symbols = rng.integers(1, COPY_SYMBOLS + 1, size=(count, length))
    inputs = np.zeros((count, steps), dtype=np.int64)
    inputs[:, :length] = symbols
    inputs[:, length + delay - 1] = COPY_CLASSES - 1
    targets = np.zeros((count, steps), dtype=np.int64)
    targets[:, -length:] = symbols
    one_hot = np.eye(COPY_CLASSES, dtype=np.float32)[inputs]
    return one_hot, targets


@register_task("copy_memory", kind="sequence_labelling")
def copy_memory(
    delay: int = 20, length: int = 10, train_size: int = 5000, val_size: int = 1000, test_size: int = 1000, seed: int = 0
) -> SequenceTask:
    """Build the copy-memory task (module docstring): ``delay`` steps between the symbols and their recall."""
    delay = positive_int("delay", delay)
    length = positive_int("length", length)
    sizes = _sizes(train_size, val_size, test_size)
    rng = np.random.default_rng(int(seed))
    sets = [TensorDataset(*(torch.from_numpy(a) for a in copy_examples(n, delay, length, rng))) for n in sizes]
    return SequenceTask(
        name="copy_memory",
        num_classes=COPY_CLASSES,
        input_shape=(delay + 2 * length, COPY_CLASSES),
        train_set=sets[0],
        val_set=sets[1],
        test_set=sets[2],
        metrics=("accuracy",),
        output="per_step",
        scored_steps=length,
        reference={"accuracy": 1.0 / COPY_SYMBOLS},
    )


@register_task("seq_digits")
def seq_digits(pixels: bool = False, seed: int = 0) -> SequenceTask:
    """Build sequential digits: rows (8 steps of 8 pixels) or, with ``pixels``, 64 steps of one pixel."""
    steps, features = (64, 1) if pixels else (8, 8)
    splits = [
        TensorDataset(torch.tensor(x.reshape(len(x), steps, features), dtype=torch.float32), torch.tensor(y, dtype=torch.int64))
        for x, y in _arrays(int(seed))
    ]
    return SequenceTask(
        name="seq_digits",
        num_classes=10,
        input_shape=(steps, features),
        train_set=splits[0],
        val_set=splits[1],
        test_set=splits[2],
        metrics=("accuracy",),
        output="class",
        reference={"accuracy": 0.1},
    )
