"""Tasks: a data set split into train, val and test plus the metric a model is judged by.

Importing this package registers the built-in tasks ``digits``, ``cifar10``, ``cifar100``,
``imagefolder`` (classification), ``sr`` (super-resolution) and the sequence tasks ``adding``,
``copy_memory``, ``seq_digits`` and ``char_text``, and the two-view (cross-modal retrieval) tasks ``digits_2view`` and
``reid_folder``; build one with :func:`create_task`.
"""

from __future__ import annotations

# Imported for their registrations.
from tasks import cifar, digits, imagefolder, sequence, sr, text, two_view  # noqa: F401
from tasks._base import Task, TransformedSubset
from tasks._registry import (
    METRIC_DIRECTIONS,
    TASK_KINDS,
    create_task,
    list_tasks,
    register_task,
    task_class,
    task_factory,
    task_kind,
    task_metrics,
)

__all__ = [
    "Task",
    "TransformedSubset",
    "TASK_KINDS",
    "METRIC_DIRECTIONS",
    "create_task",
    "list_tasks",
    "register_task",
    "task_class",
    "task_factory",
    "task_kind",
    "task_metrics",
]
