"""Registry of task factories, looked up by name from the search configuration.

A name ``import:REF`` is a user's own task: REF (:mod:`errors.user_code`) names a subclass of
:class:`tasks.Task` that declares its ``kind`` and ``metric_directions`` (see its docstring);
every function here resolves it the same way. A name ``object:...`` is such a class, or a built
task instance, handed to the Python API; its kind and metric directions are recorded with it, so
they are known where only a stored search's description of it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from errors import UserError, did_you_mean, unknown_name
from errors.user_code import import_ref, is_import, is_object, object_value, user_object
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
    if is_object(name):
        return dict(user_object(name).description["metric_directions"])
    if is_import(name):
        return dict(_imported_class(name).metric_directions)
    if name not in _FACTORIES:
        raise unknown_name("task", name, _FACTORIES)
    return dict(_METRICS[name])


def task_kind(name: str) -> str:
    """The kind of task ``name`` (``"classification"``, ``"super_resolution"``), known without loading its data."""
    if is_object(name):
        return user_object(name).description["kind"]
    if is_import(name):
        return _imported_class(name).kind
    if name not in _FACTORIES:
        raise unknown_name("task", name, _FACTORIES)
    return _KINDS[name]


def task_factory(name: str) -> TaskFactory:
    """The factory registered as ``name``; its signature lists the task's options and their defaults."""
    if is_object(name) and isinstance(object_value(name), Task):
        return _built(name, object_value(name))
    if is_import(name) or is_object(name):
        return _imported_class(name)
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
            option is missing; an imported task lacks part of :class:`Task`'s interface.
    """
    if is_import(name) or is_object(name):
        cls = task_factory(name)
        _check_options(name, cls, options)
        return _check_built(name, task_class(name), cls(**options))
    if name not in _FACTORIES:
        raise unknown_name("task", name, _FACTORIES)
    factory = _FACTORIES[name]
    _check_options(name, factory, options)
    return factory(**options)


def task_class(name: str) -> type[Task]:
    """The class of a user's task (``import:REF`` or ``object:...``, a class or an instance), its kind and metric directions checked."""
    if is_object(name) and isinstance(object_value(name), Task):
        return _imported_class(name, type(object_value(name)))
    return _imported_class(name)


def _built(name: str, task: Task) -> TaskFactory:
    """A task instance as a factory of no options: each call gives the instance itself (tasks are read, never changed)."""

    def built_task() -> Task:
        return task

    built_task.__doc__ = type(task).__doc__
    built_task.__module__ = type(task).__module__
    return built_task


def _imported_class(name: str, cls: Any = None) -> type[Task]:
    """A user's task class, its declared kind and metric directions checked."""
    if cls is None:
        cls = object_value(name) if is_object(name) else import_ref(name)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UserError(
            f"task '{name}': names {cls!r}, not a subclass of tasks.Task; write `class MyTask(Task)` "
            "(see the interface in tasks.Task's docstring)."
        )
    for attribute, example in (("kind", "'classification'"), ("metric_directions", "{'accuracy': 'max'}")):
        if not hasattr(cls, attribute):
            raise UserError(
                f"task '{name}': {cls.__name__} lacks the class attribute {attribute} (e.g. {attribute} = {example}); see tasks.Task's docstring."
            )
    if cls.kind not in TASK_KINDS:
        raise UserError(f"task '{name}': kind must be one of {', '.join(TASK_KINDS)}, but {cls.__name__}.kind is {cls.kind!r}.")
    directions = cls.metric_directions
    if not isinstance(directions, Mapping) or not directions or any(d not in METRIC_DIRECTIONS for d in directions.values()):
        raise UserError(
            f"task '{name}': {cls.__name__}.metric_directions must map each metric, headline first, to 'max' or 'min' "
            f"(e.g. {{'accuracy': 'max'}}), but got {directions!r}."
        )
    return cls


def _check_built(name: str, cls: type[Task], task: Any) -> Task:
    """A built user task, checked against the interface before anything trains on it."""
    where = f"task '{name}'"
    if not isinstance(task, Task):
        raise UserError(f"{where}: building it gave {type(task).__name__}, not a tasks.Task.")
    for split in ("train_set", "val_set", "test_set"):
        dataset = getattr(task, split, None)
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise UserError(f"{where}: {split} must be a map-style dataset (__len__ and __getitem__), but got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise UserError(f"{where}: {split} is empty; every split needs examples.")
    shape = task.input_shape
    if not isinstance(shape, (tuple, list)) or not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise UserError(f"{where}: input_shape must be one input's shape without the batch, e.g. (1, 8, 8), but got {shape!r}.")
    if tuple(task.metrics) != tuple(cls.metric_directions):
        raise UserError(
            f"{where}: metrics {tuple(task.metrics)} must list the metrics of {cls.__name__}.metric_directions "
            f"{tuple(cls.metric_directions)} in the same order (headline first)."
        )
    return task


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
