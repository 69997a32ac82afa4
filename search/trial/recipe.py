"""The ``recipe.json`` of an exported trial: everything in effect when it ran, enough to replay it.

The trial writes it into its exported model's folder (:func:`search.trial.body.run_pipeline`);
``slimtune export`` adds which search, trial and MLflow run it came from; ``slimtune replay``
reads it back (:func:`space_from_recipe`) and retrains the same baseline and pipeline with the
trial's own functions (:func:`search.trial.body.replay`).

Keys (``format`` 1):

- ``task``: ``name``, ``options`` (every option of the task's factory, defaults included),
  ``input_shape`` of one sample, ``preprocessing`` (what the data set is, how inputs are
  normalised, and the transform of each split);
- ``model``: ``name``, ``options`` (defaults included, except what the task supplies) and
  ``task_arguments`` (what the task supplies: ``num_classes``, ``in_channels``, ``scale``);
- ``baseline``: ``epochs``, ``checkpoint`` (or null), ``torch_threads`` it was trained with
  (null if unknown),
  ``state_sha256`` (a digest of its weights) and its ``metrics``;
- ``training``: ``batch_size``, ``lr``, ``optimizer``, ``weight_decay``, ``epochs`` (default
  length of a method's phase), ``seed`` (seeds the baseline, the trial and the loaders);
- ``pipeline``: the methods in order, each with every hyperparameter in effect (defaults included);
- ``measure``: ``latency_batch_size``, ``latency_repeats``;
- ``run``: ``device``, ``cpus_per_trial``, ``gpus_per_trial``, ``torch_threads`` of the trial;
- ``versions``: ``python``, ``torch``, ``torchvision``, ``slimtune``;
- ``metrics``: the trial's final metrics as the trial reported them (no Tune bookkeeping);
- ``objects``: for a model or task handed to ``search.api.search`` as a Python object, per key its
  description: ``name``, ``module``, ``qualname``, ``instance``, ``source`` (file) and its
  ``source_sha256`` (null without one), ``pickle_sha256``; such a recipe replays only from Python;
- ``imports``: for a model or task of the user's own code (``model: {import: REF}``), per key
  (``model``, ``task``) the ``ref`` and the ``sha256`` of each of its files by path, so that a
  replay can say when the code changed (:func:`changed_imports`); empty otherwise;
- added by ``slimtune export``: ``search``, ``trial``, ``mlflow_run_id``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import platform
from pathlib import Path
from typing import Any

import torch
import torchvision

from errors import UserError
from errors.user_code import IMPORT_PREFIX, code_digests, is_import, is_object, user_object
from models import model_factory
from search.space.spec import Budget, SearchSpace
from tasks import Task, task_factory

__all__ = [
    "RECIPE_FORMAT",
    "recipe_document",
    "read_recipe",
    "space_from_recipe",
    "state_digest",
    "versions",
    "imported_code",
    "changed_imports",
]

RECIPE_FORMAT = 1


def versions() -> dict[str, str]:
    """Versions of Python and of the packages whose arithmetic the metrics depend on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "slimtune": importlib.metadata.version("slimtune"),
    }


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _defaults(factory: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(factory).parameters.items()
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _summary(text: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((text or "").strip().split("\n\n")[0].split())


def _preprocessing(task: Task, factory: Any) -> dict[str, str]:
    def transform(dataset: Any) -> str:
        found = getattr(dataset, "transform", None)
        return repr(found) if found is not None else "none: the inputs as the task builds them"

    return {
        # A notebook's class arrives by value on a worker: it may have no module there.
        "data": _summary(getattr(inspect.getmodule(factory), "__doc__", None)),
        "description": _summary(factory.__doc__),
        "train": transform(task.train_set),
        "val": transform(task.val_set),
        "test": transform(task.test_set),
    }


def _threads(metrics: dict[str, Any]) -> int | None:
    # None for a baseline measured before slimtune recorded threads (a search resumed across versions).
    return int(metrics["torch_threads"]) if metrics.get("torch_threads") is not None else None


def recipe_document(
    space: SearchSpace,
    task: Task,
    pipeline: list[dict[str, Any]],
    device: torch.device,
    baseline_state: dict[str, torch.Tensor],
    baseline_metrics: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The recipe of a finished trial (module docstring), called by the trial when it exports.

    Args:
        space: The search space the trial ran in.
        task: Its task, as loaded.
        pipeline: ``Pipeline.recipe()``: every method with every hyperparameter in effect.
        device: Where the trial trained.
        baseline_state: The baseline's weights the trial started from.
        baseline_metrics: The baseline's metrics (they include ``torch_threads``).
        metrics: The trial's final metrics.
    """
    factory = task_factory(space.task)
    task_arguments = task.model_kwargs()
    model_fn = model_factory(space.model)
    model_defaults = {k: v for k, v in _defaults(model_fn).items() if k not in task_arguments} if model_fn else {}
    return {
        "format": RECIPE_FORMAT,
        "task": {
            "name": space.task,
            "options": {**_defaults(factory), **space.task_options},
            "input_shape": list(task.input_shape),
            "preprocessing": _preprocessing(task, factory),
        },
        "model": {"name": space.model, "options": {**model_defaults, **space.model_options}, "task_arguments": task_arguments},
        "baseline": {
            "epochs": space.baseline_epochs,
            "checkpoint": space.baseline_checkpoint,
            "torch_threads": _threads(baseline_metrics),
            "state_sha256": state_digest(baseline_state),
            "metrics": baseline_metrics,
        },
        "training": {
            "batch_size": space.batch_size,
            "lr": space.lr,
            "optimizer": space.optimizer,
            "weight_decay": space.weight_decay,
            "epochs": space.budget.epochs,
            "seed": space.seed,
        },
        "pipeline": pipeline,
        "measure": {"latency_batch_size": space.latency_batch_size, "latency_repeats": space.latency_repeats},
        "run": {
            "device": device.type,
            "cpus_per_trial": space.budget.cpus_per_trial,
            "gpus_per_trial": space.budget.gpus_per_trial,
            "torch_threads": _threads(metrics),
        },
        "versions": versions(),
        "metrics": metrics,
        "imports": imported_code(space),
        "objects": {key: user_object(name).describe() for key, name in (("model", space.model), ("task", space.task)) if is_object(name)},
    }


def imported_code(space: SearchSpace) -> dict[str, dict[str, Any]]:
    """What the space imports of the user's own code: per key, the reference and its files' SHA-256."""
    return {
        key: {"ref": name.removeprefix(IMPORT_PREFIX), "sha256": code_digests(name)}
        for key, name in (("model", space.model), ("task", space.task))
        if is_import(name)
    }


def changed_imports(doc: dict[str, Any]) -> list[str]:
    """One warning line per user file whose code differs from (or is missing since) the recipe's run."""
    out = []
    for key, entry in (doc.get("imports") or {}).items():
        now = code_digests(entry["ref"]) if all(Path(p).is_file() for p in entry["sha256"]) else {}
        for path, digest in entry["sha256"].items():
            if path not in now:
                out.append(f"warning: {key}.import {entry['ref']}: {path} is missing here; the replay cannot use the code the trial ran.")
            elif now[path] != digest:
                out.append(
                    f"warning: {key}.import {entry['ref']}: {path} changed since the trial ran (SHA-256 {digest[:12]} then, "
                    f"{now[path][:12]} now); the replay runs the new code, so its metrics may differ."
                )
    return out


_REQUIRED = {
    "task": ("name", "options"),
    "model": ("name", "options"),
    "baseline": ("epochs", "checkpoint", "torch_threads", "state_sha256", "metrics"),
    "training": ("batch_size", "lr", "optimizer", "weight_decay", "epochs", "seed"),
    "measure": ("latency_batch_size", "latency_repeats"),
    "run": ("device", "cpus_per_trial", "gpus_per_trial", "torch_threads"),
    "metrics": (),
    "pipeline": (),
}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a ``recipe.json`` (or the export folder holding one).

    Raises:
        UserError: No such file, not JSON, another format, or a key the replay needs is missing.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "recipe.json"
    if not path.is_file():
        raise UserError(
            f"{path}: no such file; give the recipe.json of an export (`slimtune export NAME ... --out DIR` writes DIR/recipe.json)."
        )
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise UserError(
            f"{path}: a replayable recipe has format {RECIPE_FORMAT}, but this one has {found!r}; "
            "it was exported by an older slimtune. Export the trial again, or rerun its search."
        )
    for section, keys in _REQUIRED.items():
        if section not in doc:
            raise UserError(f"{path}: the key '{section}' is missing; export the trial again with this slimtune.")
        for key in keys:
            if key not in doc[section]:
                raise UserError(f"{path}: the key '{section}.{key}' is missing; export the trial again with this slimtune.")
    return doc


def space_from_recipe(doc: dict[str, Any], path: str = "recipe.json") -> SearchSpace:
    """The one-trial search space a recipe (checked by :func:`read_recipe`) describes, for :func:`search.trial.body.replay`."""
    training, run, baseline = doc["training"], doc["run"], doc["baseline"]
    return SearchSpace(
        name=str(doc.get("search") or "replay"),
        task=doc["task"]["name"],
        task_options=dict(doc["task"]["options"]),
        model=doc["model"]["name"],
        model_options=dict(doc["model"]["options"]),
        baseline_epochs=int(baseline["epochs"]),
        baseline_checkpoint=baseline["checkpoint"],
        methods=(),
        objectives=(),
        constraints=(),
        budget=Budget(
            trials=1,
            concurrent=1,
            epochs=int(training["epochs"]),
            cpus_per_trial=float(run["cpus_per_trial"]),
            gpus_per_trial=float(run["gpus_per_trial"]),
            max_failures=0,
        ),
        seed=int(training["seed"]),
        batch_size=int(training["batch_size"]),
        lr=float(training["lr"]),
        optimizer=str(training["optimizer"]),
        weight_decay=float(training["weight_decay"]),
        latency_batch_size=int(doc["measure"]["latency_batch_size"]),
        latency_repeats=int(doc["measure"]["latency_repeats"]),
        path=path,
    )
