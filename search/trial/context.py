"""What a trial's methods run with: the task, the model, the method context, and the one-batch context.

Shared by the trial's body, the pre-flight and ``slimtune profile``: :func:`build_context` is the
context a trial trains in; :func:`one_batch_context` and :func:`run_one_batch` apply a recipe
with every phase trained one step on one batch (the pre-flight's checks, a trial's projected
cost).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from errors import UserError
from errors.user_code import is_import
from methods import MethodContext, Pipeline, create_method, get_method, hyperparameters
from models import create_model, model_factory
from search.space.spec import SearchSpace
from tasks import Task, create_task, task_metrics

__all__ = [
    "seed_everything",
    "load_task",
    "build_model",
    "import_user_code",
    "build_context",
    "trial_threads",
    "seeded_loader",
    "first_batch",
    "one_batch_context",
    "run_one_batch",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=4)
def _cached_task(name: str, options_json: str) -> Task:
    return create_task(name, **json.loads(options_json))


def load_task(space: SearchSpace) -> Task:
    """The space's task, built once per process (reused Ray actors skip reloading the data)."""
    with _user_code(space, "task", space.task):
        return _cached_task(space.task, json.dumps(space.task_options, sort_keys=True))


def build_model(space: SearchSpace, task: Task) -> nn.Module:
    with _user_code(space, "model", space.model):
        return create_model(space.model, **task.model_kwargs(), **space.model_options)


@contextlib.contextmanager
def _user_code(space: SearchSpace, key: str, name: str) -> Iterator[None]:
    """A user's model or task that fails to build: its error names the space file and the key."""
    try:
        yield
    except UserError as exc:
        if not is_import(name) or not space.path or str(exc).startswith(space.path):
            raise
        raise UserError(f"{space.path}: {key}.import: {exc}") from None


def import_user_code(space: SearchSpace) -> None:
    """Import the user's model code (``model: {import: REF}``) in this process, as a trial does.

    Called before a pickled module (an export's ``model.pt``) is loaded: pickle finds a class by
    its module's name, which is importable once the reference has been resolved.
    """
    model_factory(space.model)


def seeded_loader(dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A loader in the main process whose shuffling is seeded: the same order on every run."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def build_context(
    space: SearchSpace, task: Task, teacher: nn.Module, device: torch.device, seed: int, log: Callable[[str], None]
) -> MethodContext:
    val_loader = seeded_loader(task.val_set, task.eval_batch_size, False, seed)
    return MethodContext(
        teacher=teacher,
        train_loader=seeded_loader(task.train_set, space.batch_size, True, seed),
        val_loader=val_loader,
        task_loss=task.loss,
        evaluate=lambda model: task.evaluate(model, val_loader, device),
        example_input=task.example_input(1).to(device),
        device=device,
        metric=task.metric,
        metric_direction=task_metrics(space.task)[task.metric],
        epochs=space.budget.epochs,
        lr=space.lr,
        optimizer=space.optimizer,
        weight_decay=space.weight_decay,
        seed=seed,
        log=log,
    )


def trial_threads(space: SearchSpace) -> int:
    """CPU threads a trial runs torch with (``budget.cpus_per_trial``, at least 1).

    The baseline's latency is timed at this count too, so that it and every trial's compare.
    """
    return max(1, int(space.budget.cpus_per_trial))


class _OneBatch:
    """A loader of a single batch: one step per epoch is all a pre-flight trains."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.batch = batch

    def __iter__(self):
        return iter([self.batch])

    def __len__(self) -> int:
        return 1


def run_one_batch(
    recipe: list[dict[str, Any]],
    space: SearchSpace,
    task,
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.nn.Module, Pipeline, MethodContext]:
    """Apply ``recipe`` to ``model`` (changed in place) with every phase trained one step on ``batch``, on CPU.

    Called by each pre-flight check, and by a trial for the cost its model will have
    (``search.trial.body.projected_cost``).

    Returns:
        The finalized model (in eval mode), the pipeline and its context.
    """
    pipeline = Pipeline([create_method(step["name"], _short_training(step)) for step in recipe])
    ctx = one_batch_context(space, task, teacher, batch)
    model = pipeline.run(model, ctx).eval()
    return model, pipeline, ctx


def first_batch(space: SearchSpace, task) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (at most 8) training examples of ``task``, in order: the one batch a pre-flight trains on."""
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=min(8, space.batch_size), shuffle=False)
    return next(iter(loader))


def one_batch_context(space: SearchSpace, task, teacher: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> MethodContext:
    """A CPU context whose loaders and evaluation see only ``batch`` and whose phases last one epoch.

    Built for each pre-flight check, and by ``slimtune profile --method`` to prepare and
    finalize a method without training.
    """
    ctx = build_context(space, task, teacher=teacher, device=torch.device("cpu"), seed=0, log=lambda m: None)
    ctx.train_loader = _OneBatch(batch)
    ctx.val_loader = _OneBatch(batch)
    ctx.evaluate = lambda m: task.evaluate(m, [batch], "cpu")
    ctx.epochs = 1
    return ctx


def _short_training(step: dict[str, Any]) -> dict[str, Any]:
    """Cap every budget field of a method (epochs, iterations) at 1 so the pre-flight takes seconds.

    A field left to the space's setting (None) trains the pre-flight context's one epoch.
    """
    params = dict(step["params"])
    for info in hyperparameters(get_method(step["name"]).Config):
        value = params.get(info.name, info.default)
        if info.budget and value is not None and value > 1:
            params[info.name] = 1
    return params
