"""Registry of task factories, looked up by name from the search configuration."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from errors import UserError, did_you_mean, unknown_name
from tasks._base import Task

TaskFactory = Callable[..., Task]

_FACTORIES: dict[str, TaskFactory] = {}
_METRICS: dict[str, dict[str, str]] = {}
_KINDS: dict[str, str] = {}

#: What a task asks of a model; methods that only make sense for some declare ``task_kinds``.
#: ``regression``: one real output per example (the adding problem); ``sequence_labelling``:
#: class logits at every time step, ``(batch, steps, classes)`` (copy memory, character text).
#: ``two_view``: examples seen in two modalities, judged by cross-modal retrieval (``digits_2view``).
TASK_KINDS = ("classification", "super_resolution", "regression", "sequence_labelling", "two_view")

#: The direction of a quality metric: ``"max"`` (higher is better: accuracy, PSNR) or ``"min"``
#: (lower is better: MSE, bits per character).
METRIC_DIRECTIONS = ("max", "min")


def register_task(
    name: str, metrics: Mapping[str, str] | None = None, kind: str = "classification"
) -> Callable[[TaskFactory], TaskFactory]:
    """Register the decorated factory ``f(**options) -> Task`` under ``name``.

    Args:
        name: Name users write as ``task.name`` in a configuration.
        metrics: The quality metrics its tasks report, headline first, each with its direction
            (``{"accuracy": "max"}``, the default; ``{"mse": "min"}``).
        kind: One of :data:`TASK_KINDS`, known without loading the data.

    Raises:
        ValueError: If another factory already uses ``name``; two modules claiming one name is a bug.
    """

    if kind not in TASK_KINDS:
        raise ValueError(f"task kind must be one of {TASK_KINDS}, but got {kind!r}.")
    metrics = dict(metrics) if metrics is not None else {"accuracy": "max"}
    for metric, direction in metrics.items():
        if direction not in METRIC_DIRECTIONS:
            raise ValueError(f"the direction of metric '{metric}' of task '{name}' must be 'max' or 'min', but got {direction!r}.")

    def decorate(factory: TaskFactory) -> TaskFactory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"task '{name}' is already registered by {_FACTORIES[name]!r}")
        _FACTORIES[name] = factory
        _METRICS[name] = metrics
        _KINDS[name] = kind
        return factory

    return decorate


def task_metrics(name: str) -> dict[str, str]:
    """The quality metrics a task reports, headline first, each with its direction (``"max"`` or ``"min"``).

    Known without loading the task's data.
    """
    if name not in _FACTORIES:
        raise unknown_name("task", name, _FACTORIES)
    return dict(_METRICS[name])


def task_kind(name: str) -> str:
    """The kind of task ``name`` (``"classification"``, ``"super_resolution"``), known without loading its data."""
    if name not in _FACTORIES:
        raise unknown_name("task", name, _FACTORIES)
    return _KINDS[name]


def task_factory(name: str) -> TaskFactory:
    """The factory registered as ``name``; its signature lists the task's options and their defaults."""
    if name not in _FACTORIES:
        raise unknown_name("task", name, _FACTORIES)
    return _FACTORIES[name]


def list_tasks() -> list[str]:
    """Return the registered task names, sorted."""
    return sorted(_FACTORIES)


def create_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with the given options.

    Args:
        name: Registered task name.
        **options: Keyword arguments of the task's factory.

    Raises:
        UserError: If the name is unknown, an option is not accepted by the factory, or a required
            option is missing.
    """
    if name not in _FACTORIES:
        raise unknown_name("task", name, _FACTORIES)
    factory = _FACTORIES[name]
    _check_options(name, factory, options)
    return factory(**options)


def _check_options(name: str, factory: TaskFactory, options: dict[str, Any]) -> None:
    """Raise a UserError naming the fix when ``options`` do not fit the factory's signature."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    accepted_text = ", ".join(accepted) if accepted else "(none)"
    for option in options:
        if option not in accepted:
            raise UserError(f"task '{name}' has no option '{option}'.{did_you_mean(option, accepted)} Accepted options: {accepted_text}.")
    for p in params:
        if p.name in accepted and p.default is inspect.Parameter.empty and p.name not in options:
            raise UserError(f"task '{name}' needs option '{p.name}'. Set task.options.{p.name}. Accepted options: {accepted_text}.")
