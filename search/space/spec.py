"""Search spaces: one YAML file says what to compress, with what, toward which objectives.

Loading validates everything up front and names the file, the key path and the fix on bad
input (``spaces/x.yaml: methods.l1_filter.params.ratio: ...``). See ``spaces/quickstart.yaml``
for a commented example of every key.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy import DEFAULT_LATENCY_RUNTIME, LATENCY_RUNTIMES
from errors import UserError, did_you_mean
from errors.user_code import IMPORT_PREFIX, UserObject, absolute_ref, described_object, import_name, is_import, is_object, user_object
from methods import Range, check_pipeline, create_method, get_method, hyperparameters, list_methods
from models import model_factory
from search.space.objectives import COST_METRICS, EPOCH_COSTS, Constraint, Objective, epoch_key
from tasks import list_tasks, task_kind, task_metrics

__all__ = [
    "SearchSpace",
    "MethodSpace",
    "Objective",
    "Constraint",
    "Budget",
    "load_space",
    "read_space_document",
    "parse_space",
    "COST_METRICS",
    "METRIC_RANGES",
    "metrics_of_task",
]

#: The values a metric can take (accuracy and SSIM are fractions; costs are never negative). A
#: constraint outside its metric's range never holds (refused) or always holds (a warning).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "accuracy_drop": (-1.0, 1.0),
    "psnr": (0.0, math.inf),
    "ssim": (-1.0, 1.0),
    "ssim_drop": (-2.0, 2.0),
    **{metric: (0.0, 1.0) for metric in ("rank1", "rank5", "rank10", "mAP")},
    **{f"{metric}_drop": (-1.0, 1.0) for metric in ("rank1", "rank5", "rank10", "mAP")},
    "mse": (0.0, math.inf),
    "bpc": (0.0, math.inf),
    **{metric: (0.0, math.inf) for metric in COST_METRICS},
}

#: The samplers a space can name (``sampler.name``), the default first; :mod:`search.driver.samplers` builds them.
SAMPLERS = ("tpe", "nsga2", "gp", "random")

#: Early stopping (``budget.scheduler``): none, Tune's ASHA on the first objective, or successive
#: halving on the whole objective vector (:mod:`search.driver.halving`).
SCHEDULERS = ("fifo", "asha", "mo_asha")

#: URI schemes of the MLflow stores slimtune writes to (``postgresql+psycopg2`` counts as ``postgresql``).
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def metrics_of_task(task: str) -> dict[str, str]:
    """Every metric a trial of ``task`` reports, with its natural direction.

    The task's quality metrics (``accuracy``; ``psnr``, ``ssim`` for super-resolution), their
    drops from the baseline (``accuracy_drop``) and the cost metrics.
    """
    out: dict[str, str] = {}
    for metric, direction in task_metrics(task).items():
        out[metric] = direction
        out[f"{metric}_drop"] = "min"
    out.update(COST_METRICS)
    return out


OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class MethodSpace:
    """One method of the space: whether it is searched on/off, and its fixed or searched params.

    Attributes:
        name: Registered method name.
        optional: True when Optuna chooses whether the method is used in a trial.
        fixed: Hyperparameters with one value.
        searched: Hyperparameters with a distribution.
    """

    name: str
    optional: bool
    fixed: dict[str, Any]
    searched: dict[str, Range]


@dataclass(frozen=True)
class Budget:
    """``budget:``: how many trials, how long each trains, on what, and when one stops early.

    ``scheduler`` is one of :data:`SCHEDULERS`; ``asha`` and ``mo_asha`` compare trials after
    ``grace_epochs`` epochs (default: half of ``epochs``, at least 1; ``bench/early_stopping.py``
    found a third too early: pruned models validate far below their final accuracy then), then after
    ``reduction_factor`` times as many, and so on, keeping one in ``reduction_factor``.
    """

    trials: int = 12
    concurrent: int = 2
    epochs: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    time_limit_s: float | None = None
    scheduler: str = "fifo"
    grace_epochs: int | None = None
    reduction_factor: int = 2

    @property
    def grace(self) -> int:
        """Epochs before a trial is first compared with the others."""
        return self.grace_epochs or max(1, self.epochs // 2)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (the parsed YAML).

    ``warnings`` holds what is valid but probably not meant (an objective against its metric's
    nature, a constraint no trial can meet), each naming the file and key path; the commands that
    load a space print them.
    """

    name: str
    task: str
    task_options: dict[str, Any]
    model: str
    model_options: dict[str, Any]
    baseline_epochs: int
    baseline_checkpoint: str | None
    methods: tuple[MethodSpace, ...]
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    budget: Budget
    sampler: str = SAMPLERS[0]
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    latency_batch_size: int = 1
    latency_repeats: int = 20  # the most timed passes: deploy.latency_ms stops from 5 on once the median is stable
    latency_runtime: str = DEFAULT_LATENCY_RUNTIME  # one of deploy.LATENCY_RUNTIMES
    results_dir: str = "slimtune_results"
    tracking_uri: str = "sqlite:///mlflow.db"
    optuna_storage: str | None = None
    checkpoint_storage: str | None = None  # Tune's storage: shared path or s3:// / gs:// URI
    source: str = ""  # the YAML text as written
    resolved_source: str = ""  # the YAML document with its paths made absolute, stored with a search
    path: str = ""
    warnings: tuple[str, ...] = ()
    #: The Python objects named ``object:...`` by ``task`` and ``model`` (``search.api.search``): pickled
    #: with the space, they reach every Ray worker that receives it (:class:`errors.user_code.UserObject`).
    objects: tuple[UserObject, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def with_overrides(self, **changes: Any) -> SearchSpace:
        """This space with some fields replaced, checked by the same rules as the YAML.

        Called with the command line's options, as in
        ``space.with_overrides(name=args.name, trials=args.trials, tracking_uri=args.tracking_uri,
        results_dir=args.results_dir)``: a change of None (an option not given) leaves its field
        as it is, a field of :class:`Budget` (``trials=``) changes the budget, and a bad value
        raises the YAML's error prefixed ``overrides of <file>``.
        """
        changes = {key: value for key, value in changes.items() if value is not None}
        budget = {key: changes.pop(key) for key in list(changes) if key in _BUDGET_NUMBERS}
        if budget:
            changes["budget"] = dataclasses.replace(changes.get("budget", self.budget), **budget)
        space = dataclasses.replace(self, **changes)
        r = _Reader(f"overrides of {self.path or '<space>'}")
        values = {field: getattr(space, field) for field in (*_NUMBERS, "name", "results_dir", "tracking_uri")}
        values["budget"] = dataclasses.asdict(space.budget)
        return dataclasses.replace(space, **_settings(r, values))


# ----------------------------------------------------------------------------------------------


#: Every number of a space outside its methods and budget: field -> (YAML key path, kind, lowest value).
_NUMBERS: dict[str, tuple[str, type, float]] = {
    "baseline_epochs": ("baseline.epochs", int, 0),
    "batch_size": ("training.batch_size", int, 1),
    "lr": ("training.lr", float, 0),
    "weight_decay": ("training.weight_decay", float, 0),
    "seed": ("sampler.seed", int, 0),
    "latency_batch_size": ("measure.latency_batch_size", int, 1),
    "latency_repeats": ("measure.latency_repeats", int, 1),
}

#: The budget's numbers: field -> (kind, lowest value); those of ``_NULLABLE`` may also be null.
_BUDGET_NUMBERS: dict[str, tuple[type, float]] = {
    "trials": (int, 1),
    "concurrent": (int, 1),
    "epochs": (int, 0),
    "cpus_per_trial": (float, 0),
    "gpus_per_trial": (float, 0),
    "max_failures": (int, 0),
    "time_limit_s": (float, 1),
    "grace_epochs": (int, 1),
    "reduction_factor": (int, 2),
}
_NULLABLE = ("time_limit_s", "grace_epochs")

_TOP_KEYS = {
    "name",
    "task",
    "model",
    "baseline",
    "training",
    "methods",
    "objectives",
    "constraints",
    "budget",
    "sampler",
    "measure",
    "output",
}


def _one_line(text: str) -> str:
    """An error message on one line whatever the file holds: a line break in a name or key shows escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _Reader:
    """Reads nested YAML mappings and raises errors that carry the file and the key path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def message(self, key_path: str, message: str) -> str:
        """``message`` prefixed with the file and the key path, as errors and warnings read."""
        where = f"{self.path}: {key_path}: " if key_path else f"{self.path}: "
        return _one_line(where + message)

    def error(self, key_path: str, message: str) -> UserError:
        return UserError(self.message(key_path, message))

    def mapping(self, value: Any, key_path: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key_path, f"must be a mapping of keys to values, but got {value!r}.")
        for key in value:
            if key not in allowed:
                raise self.error(
                    f"{key_path}.{key}" if key_path else str(key),
                    f"unknown key.{did_you_mean(str(key), allowed)} Allowed keys: {', '.join(sorted(allowed))}.",
                )
        return value

    def number(self, value: Any, key_path: str, kind: type = float, low: float | None = None) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key_path, f"must be a number, but got {value!r}.")
        if kind is int and not float(value).is_integer():
            raise self.error(key_path, f"must be a whole number, but got {value!r}.")
        value = kind(value)
        if low is not None and value < low:
            raise self.error(key_path, f"must be >= {low}, but got {value}.")
        return value

    def choice(self, value: Any, key_path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(
                key_path,
                f"must be one of {', '.join(choices)}, but got {value!r}.{did_you_mean(str(value), choices)}",
            )
        return value


#: A space file is a few kilobytes; anything larger is not one (a data file passed by mistake).
MAX_SPACE_BYTES = 1_000_000


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; UserError (file, key path, fix) on bad input."""
    data, text = read_space_document(Path(path))
    return parse_space(data, str(path), text)


def read_space_document(path: Path) -> tuple[Any, str]:
    """A space file's YAML document (not yet validated) and its text; UserError when it is no readable YAML."""
    text = _read_space_text(path)
    try:
        return _load_yaml(text, str(path)), text
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML: nested too deeply for a space file.") from None


def _read_space_text(path: Path) -> str:
    """The text of a space file; one-line UserError when it is missing, not a file, unreadable,
    too large or not UTF-8 text."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a space file; pass a YAML file such as {path / 'space.yaml'}.")
    if not path.exists():
        bundled = Path(__file__).resolve().parents[2] / "spaces" / path.name
        hint = f" A space of that name ships with slimtune: {bundled}." if bundled.is_file() else ""
        raise UserError(f"{path}: no such file.{hint}")
    try:
        size = path.stat().st_size
        if size > MAX_SPACE_BYTES:
            raise UserError(
                f"{path}: is {size / 1e6:.1f} MB, but a space file is a small YAML file (at most "
                f"{MAX_SPACE_BYTES / 1e6:g} MB); is this the right file?"
            )
        with path.open("rb") as file:
            data = file.read(MAX_SPACE_BYTES + 1)
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable (chmod u+r) or copy it somewhere readable.") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    if len(data) > MAX_SPACE_BYTES:  # a device or a file that grew while read
        raise UserError(
            f"{path}: holds more than {MAX_SPACE_BYTES / 1e6:g} MB, but a space file is a small YAML file; is this the right file?"
        )
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(f"{path}: is a binary file (a NUL byte at offset {nul}), not a YAML space.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the space as UTF-8."
        ) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (line and column, from 1)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    text = " ".join(str(problem or exc).split())
    return f"{text} (line {mark.line + 1}, column {mark.column + 1})." if mark is not None else f"{text}."


def _load_yaml(text: str, path: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, but refuse a key given twice in one mapping.

    Plain YAML keeps the last of two equal keys without a word; a method listed twice would
    silently lose its first entry.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path, "")
        try:
            return loader.construct_document(node)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # noqa: BLE001  PyYAML's constructors fail on input with plain errors
            # A tagged scalar that does not convert (`!!float methods` ValueError, `!!timestamp x` AttributeError).
            raise UserError(f"{path}: not valid YAML: a value does not match its tag ({' '.join(str(exc).split())}).") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: str, key_path: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{key_path}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        child = f"{key_path}.{key}" if key_path else key
        line = key_node.start_mark.line + 1
        if key in lines and key_node.tag != "tag:yaml.org,2002:merge":
            rule = "a method may be listed once" if key_path == "methods" else "a key may appear once in a mapping"
            raise UserError(
                _one_line(
                    f"{path}: {child}: given twice (lines {lines[key]} and {line}); {rule}, and YAML would "
                    "silently keep only the last one. Merge the two entries into one."
                )
            )
        lines[key] = line
        _refuse_duplicate_keys(value_node, path, child)


def parse_space(data: Any, path: str = "<space>", source: str = "") -> SearchSpace:
    """Validate a parsed YAML document (see :func:`load_space`)."""
    r = _Reader(path)
    top = r.mapping(data, "", _TOP_KEYS)
    for required in ("task", "model", "methods", "objectives"):
        if required not in top:
            raise r.error(required, "is missing; every space names a task, a model, methods and objectives.")

    task, task_options = _named(r, top["task"], "task")

    if is_import(task) or is_object(task):
        # Kind and metric directions come from the user's class (an object's, from its description): an error names the key.
        _resolve(r, "task.object" if is_object(task) else "task.import", lambda: (task_metrics(task), task_kind(task)))
    elif task not in list_tasks():
        raise r.error("task", f"unknown task '{task}'.{did_you_mean(task, list_tasks())} Known tasks: {', '.join(list_tasks())}.")
    known_metrics = metrics_of_task(task)
    # Trials run in their own working folders (and on other machines): data folders are made
    # absolute here, relative to where the search was started.
    for key, value in list(task_options.items()):
        if (key == "root" or key.endswith("_root")) and isinstance(value, str):
            task_options[key] = str(Path(value).expanduser().resolve())
    model, model_options = _named(r, top["model"], "model")
    if is_import(model):
        _resolve(r, "model.import", lambda: model_factory(model))

    baseline = r.mapping(top.get("baseline"), "baseline", {"epochs", "checkpoint"})
    checkpoint = baseline.get("checkpoint")
    if checkpoint is not None:
        # Absolute from here on: on a cluster the baseline is loaded by a worker.
        candidates = [Path(str(checkpoint)).expanduser(), Path(path).parent / str(checkpoint)]
        found = next((c.resolve() for c in candidates if c.is_file()), None)
        if found is None:
            raise r.error(
                "baseline.checkpoint",
                f"file {checkpoint!r} does not exist (looked in the working folder and beside the space); train one with `baseline.epochs` or fix the path.",
            )
        checkpoint = str(found)

    training = r.mapping(top.get("training"), "training", {"batch_size", "lr", "optimizer", "weight_decay"})
    methods = _methods(r, top["methods"])
    _check_task_kinds(r, methods, task)
    objectives = _objectives(r, top["objectives"], known_metrics)
    constraints = _constraints(r, top.get("constraints"), known_metrics)

    budget_map = r.mapping(top.get("budget"), "budget", {*_BUDGET_NUMBERS, "scheduler"})
    defaults = Budget()
    sampler_map = top.get("sampler", {})
    if isinstance(sampler_map, str):
        sampler_map = {"name": sampler_map}
    sampler_map = r.mapping(sampler_map, "sampler", {"name", "seed"})
    measure = r.mapping(top.get("measure"), "measure", {"latency_batch_size", "latency_repeats", "latency_runtime"})
    output = r.mapping(top.get("output"), "output", {"results_dir", "tracking_uri", "optuna_storage", "checkpoint_storage"})
    storage = _storage(r, output)
    # What a search stores (its manifest): the document with every path made absolute above,
    # so `resume`, `pareto` and `export` read the same space from any folder.
    resolved = dict(top)
    if task_options:
        resolved["task"] = {"name": task, "options": task_options}
    for key, name, options in (("task", task, task_options), ("model", model, model_options)):
        if is_import(name):
            resolved[key] = {"import": name.removeprefix(IMPORT_PREFIX), **({"options": options} if options else {})}
        elif is_object(name):
            resolved[key] = {"object": user_object(name).describe(), **({"options": options} if options else {})}
    if checkpoint is not None:
        resolved["baseline"] = {**baseline, "checkpoint": checkpoint}
    if output:
        resolved["output"] = {**output, **{key: value for key, value in storage.items() if value is not None}}
    settings = _settings(r, {
        "name": str(top.get("name") or Path(path).stem),
        "baseline_epochs": baseline.get("epochs", 10),
        "batch_size": training.get("batch_size", SearchSpace.batch_size),
        "lr": training.get("lr", SearchSpace.lr),
        "weight_decay": training.get("weight_decay", SearchSpace.weight_decay),
        "seed": sampler_map.get("seed", SearchSpace.seed),
        "latency_batch_size": measure.get("latency_batch_size", SearchSpace.latency_batch_size),
        "latency_repeats": measure.get("latency_repeats", SearchSpace.latency_repeats),
        "results_dir": output.get("results_dir", SearchSpace.results_dir),
        "tracking_uri": output.get("tracking_uri", SearchSpace.tracking_uri),
        "budget": {field: budget_map.get(field, getattr(defaults, field)) for field in (*_BUDGET_NUMBERS, "scheduler")},
    })  # fmt: skip
    _check_scheduler(r, settings["budget"], objectives, constraints, task)
    latency_runtime = _latency_runtime(r, measure.get("latency_runtime", SearchSpace.latency_runtime), methods, settings["budget"])

    return SearchSpace(
        task=task,
        task_options=task_options,
        model=model,
        model_options=model_options,
        baseline_checkpoint=checkpoint,
        methods=methods,
        objectives=objectives,
        constraints=constraints,
        sampler=r.choice(sampler_map.get("name", SearchSpace.sampler), "sampler.name", SAMPLERS),
        optimizer=r.choice(training.get("optimizer", "sgd"), "training.optimizer", OPTIMIZERS),
        latency_runtime=latency_runtime,
        optuna_storage=storage["optuna_storage"],
        checkpoint_storage=storage["checkpoint_storage"],
        source=source,
        resolved_source=yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True),
        path=path,
        warnings=_warnings(r, objectives, constraints, known_metrics),
        objects=tuple(user_object(name) for name in (task, model) if is_object(name)),
        **settings,
    )


def _latency_runtime(r: _Reader, value: Any, methods: tuple[MethodSpace, ...], budget: Budget) -> str:
    """``measure.latency_runtime``: one of :data:`deploy.LATENCY_RUNTIMES`, and one the trials can time.

    ``onnxruntime`` times ``model.onnx`` on ONNX Runtime's CPU provider, so it refuses GPU trials
    and a method whose models cannot be exported to ONNX (``Method.onnx_unsupported``).
    """
    runtime = r.choice(value, "measure.latency_runtime", tuple(LATENCY_RUNTIMES))
    if LATENCY_RUNTIMES[runtime] != "onnx":
        return runtime
    if budget.gpus_per_trial > 0:
        raise r.error(
            "measure.latency_runtime",
            f"onnxruntime times model.onnx on ONNX Runtime's CPU provider, but budget.gpus_per_trial is "
            f"{budget.gpus_per_trial:g}; set budget.gpus_per_trial: 0 or measure.latency_runtime: program.",
        )
    for method in methods:
        reason = get_method(method.name).onnx_unsupported
        if reason:
            raise r.error(
                "measure.latency_runtime",
                f"onnxruntime times model.onnx, but method {method.name} cannot be exported to ONNX ({reason}); "
                "set measure.latency_runtime: program or drop the method.",
            )
    return runtime


def _storage(r: _Reader, output: dict[str, Any]) -> dict[str, str | None]:
    """``output.optuna_storage`` and ``output.checkpoint_storage``, local paths made absolute.

    A relative ``sqlite:///`` database or a checkpoint folder without a URI scheme would point
    elsewhere when the search is resumed from another folder.
    """
    out: dict[str, str | None] = {}
    for key in ("optuna_storage", "checkpoint_storage"):
        value = output.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise r.error(f"output.{key}", f"must be a URI or a path, but got {value!r}.")
        database = value[len("sqlite:///") :] if value and value.startswith("sqlite:///") else None
        if key == "optuna_storage" and database and database != ":memory:":
            value = f"sqlite:///{Path(database).expanduser().resolve()}"
        elif key == "checkpoint_storage" and value and "://" not in value:
            value = str(Path(value).expanduser().resolve())
        out[key] = value
    return out


def _check_scheduler(r: _Reader, budget: Budget, objectives: tuple[Objective, ...], constraints: tuple[Constraint, ...], task: str) -> None:
    """An early-stopping scheduler compares trials on what they report each epoch.

    ``asha`` needs the first objective to be a quality metric (or its drop), ``mo_asha`` every
    objective and constraint to be known per epoch (:func:`search.space.objectives.epoch_key`).
    """
    quality = tuple(task_metrics(task))
    if budget.scheduler == "asha":
        first = objectives[0].metric
        if first not in quality and first not in {f"{m}_drop" for m in quality}:
            raise r.error(
                "budget.scheduler",
                f"asha stops trials on the first objective's value at each epoch, but the first objective is {first}, "
                f"a cost that training does not change; list {quality[0]} first under objectives, or use mo_asha.",
            )
    if budget.scheduler == "mo_asha":
        for metric in [o.metric for o in objectives] + [c.metric for c in constraints]:
            if epoch_key(metric, quality) is None:
                raise r.error(
                    "budget.scheduler",
                    f"mo_asha compares trials on per-epoch objectives and constraints, but {metric} is measured only on the "
                    f"final model; use {', '.join(EPOCH_COSTS)} for cost, or budget.scheduler: asha or fifo.",
                )


def _settings(r: _Reader, values: dict[str, Any]) -> dict[str, Any]:
    """Check the settings a command line can override too; return them as SearchSpace fields.

    Called by :func:`parse_space` with the YAML's values and by
    :meth:`SearchSpace.with_overrides` with the overridden ones, so both obey one set of rules.
    ``values`` holds every field of :data:`_NUMBERS`, ``name``, ``results_dir``, ``tracking_uri``
    and ``budget`` (a mapping of the budget's fields).
    """
    out: dict[str, Any] = {field: r.number(values[field], key, kind, low) for field, (key, kind, low) in _NUMBERS.items()}
    budget = values["budget"]
    out["budget"] = Budget(
        **{
            field: None if field in _NULLABLE and budget[field] is None else r.number(budget[field], f"budget.{field}", kind, low)
            for field, (kind, low) in _BUDGET_NUMBERS.items()
        },
        scheduler=r.choice(budget["scheduler"], "budget.scheduler", SCHEDULERS),
    )
    name = values["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise r.error(
            "name",
            f"may hold letters, digits, '_', '.' and '-' only, and start with a letter, digit or '_' "
            f"(it names a folder and an MLflow experiment), but got {name!r}.",
        )
    out["name"] = name
    results_dir = values["results_dir"]
    if not isinstance(results_dir, (str, os.PathLike)) or not str(results_dir).strip():
        raise r.error("output.results_dir", f"must be a folder path, but got {results_dir!r}.")
    out["results_dir"] = str(results_dir)
    out["tracking_uri"] = _tracking_uri(r, values["tracking_uri"])
    return out


def _tracking_uri(r: _Reader, uri: Any) -> str:
    """An MLflow database or server URI; a plain folder (MLflow's file store) is refused."""
    key = "output.tracking_uri"
    example = "sqlite:///mlflow.db or http://HOST:5000"
    if not isinstance(uri, str) or not uri.strip():
        raise r.error(key, f"must be an MLflow tracking URI such as {example}, but got {uri!r}.")
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        raise r.error(
            key,
            f"MLflow's file store (a folder path) is in maintenance mode and slimtune does not write to it, "
            f"but got {uri!r}. Use a database or a server, e.g. {example}.",
        )
    if scheme not in TRACKING_SCHEMES:
        raise r.error(key, f"unknown URI scheme '{scheme}' in {uri!r}; use one of {', '.join(TRACKING_SCHEMES)}, e.g. {example}.")
    return uri


def _named(r: _Reader, value: Any, key: str) -> tuple[str, dict[str, Any]]:
    """``task: digits``, ``task: {name: cifar10, options: {...}}`` or ``task: {import: REF, options: {...}}``.

    An import reference's file is made absolute, relative to the space file's folder; the name
    returned is then ``import:REF`` (:func:`errors.user_code.import_name`). ``{object: DESCRIPTION}``
    is a Python object handed to ``search.api.search`` (written there and kept in the manifest,
    never by hand); the name returned is its ``object:...`` name.
    """
    if isinstance(value, str) and is_import(value):
        value = {"import": value.removeprefix(IMPORT_PREFIX)}
    if isinstance(value, str):
        return value, {}
    m = r.mapping(value, key, {"name", "options", "import", "object"})
    if "object" in m:
        if "name" in m or "import" in m:
            raise r.error(key, "gives a Python object and a name or import; one of them, not both.")
        if not isinstance(m["object"], dict):
            raise r.error(
                f"{key}.object", "is written by search.api.search for a Python object; pass the object as search(space, model=...) instead."
            )
        try:
            name = described_object(m["object"])
        except UserError as exc:
            raise r.error(f"{key}.object", str(exc)) from None
    elif "import" in m:
        if "name" in m:
            raise r.error(key, "gives both name and import; a registered name or your own code by import reference, not both.")
        try:
            name = import_name(absolute_ref(m["import"], Path(r.path).parent))
        except UserError as exc:
            raise r.error(f"{key}.import", str(exc)) from None
    elif isinstance(m.get("name"), str) and is_import(m["name"]):
        raise r.error(f"{key}.name", f"names your own code; write `{key}: {{import: {m['name'].removeprefix(IMPORT_PREFIX)!r}}}`.")
    elif "name" not in m:
        raise r.error(
            f"{key}.name", f"is missing; write `{key}: NAME`, `{key}: {{name: NAME, options: {{...}}}}` or `{key}: {{import: REF}}`."
        )
    else:
        name = str(m["name"])
    options = m.get("options")
    if options is not None and not isinstance(options, dict):
        raise r.error(f"{key}.options", f"must be a mapping of option names to values, but got {options!r}.")
    for option in options or {}:
        if not isinstance(option, str):
            raise r.error(f"{key}.options.{option}", f"an option name must be text, but got {option!r}.")
    return name, dict(options or {})


def _resolve(r: _Reader, key: str, load: Callable[[], object]) -> None:
    """Import a user's model or task now, so that bad code is one line naming the file and key."""
    try:
        load()
    except UserError as exc:
        raise r.error(key, str(exc)) from None


def _methods(r: _Reader, value: Any) -> tuple[MethodSpace, ...]:
    if value == {} or value is None:
        raise r.error("methods", "no methods; list at least one, e.g. `methods: {l1_filter: {optional: true}}` (see `slimtune methods`).")
    if not isinstance(value, dict):
        raise r.error("methods", "must map method names to their settings, e.g. `methods: {l1_filter: {optional: true}}`.")
    known = list_methods()
    out = []
    for name, settings in value.items():
        key = f"methods.{name}"
        if name not in known:
            raise r.error(key, f"unknown method '{name}'.{did_you_mean(str(name), known)} Known methods: {', '.join(known)}.")
        settings = r.mapping(settings, key, {"optional", "params"})
        optional = settings.get("optional", True)
        if not isinstance(optional, bool):
            raise r.error(f"{key}.optional", f"must be true or false, but got {optional!r}.")
        cls = get_method(name)
        infos = {h.name: h for h in hyperparameters(cls.Config)}
        params = r.mapping(settings.get("params"), f"{key}.params", set(infos))
        fixed: dict[str, Any] = {}
        searched: dict[str, Range] = {}
        for pname, spec in params.items():
            pkey = f"{key}.params.{pname}"
            info = infos[pname]
            if spec == "search":
                if info.search is None:
                    raise r.error(pkey, "has no default range; give one, e.g. `{low: ..., high: ...}` or `{choices: [...]}`.")
                searched[pname] = info.search
            elif isinstance(spec, dict):
                spec = r.mapping(spec, pkey, {"low", "high", "log", "step", "choices"})
                try:
                    rng = Range(
                        low=spec.get("low"),
                        high=spec.get("high"),
                        log=bool(spec.get("log", False)),
                        step=spec.get("step"),
                        choices=tuple(spec["choices"]) if "choices" in spec else None,
                    )
                except (ValueError, TypeError) as exc:
                    raise r.error(pkey, str(exc)) from None
                for probe in _range_probes(rng):
                    _check_value(r, pkey, cls, pname, probe)
                searched[pname] = rng
            else:
                _check_value(r, pkey, cls, pname, spec)
                fixed[pname] = spec
        out.append(MethodSpace(name=name, optional=optional, fixed=fixed, searched=searched))
    _check_pipelines(r, out)
    return tuple(out)


def _check_pipelines(r: _Reader, methods: list[MethodSpace]) -> None:
    """Every pipeline the space can sample (each optional method on or off, in the space's order) must pass `check_pipeline`."""
    optional = [m.name for m in methods if m.optional]
    for used in itertools.product((True, False), repeat=len(optional)):
        on = {name for name, u in zip(optional, used) if u}
        names = [m.name for m in methods if not m.optional or m.name in on]
        try:
            check_pipeline([get_method(name) for name in names])
        except ValueError as exc:
            raise r.error("methods", f"the pipeline {' > '.join(names)} cannot run: {exc}") from None


def _check_task_kinds(r: _Reader, methods: tuple[MethodSpace, ...], task: str) -> None:
    kind = task_kind(task)
    for m in methods:
        kinds = get_method(m.name).task_kinds
        if kinds is not None and kind not in kinds:
            raise r.error(
                f"methods.{m.name}",
                f"applies to {' and '.join(kinds)} tasks only, but task '{task}' is a {kind} task. Remove it from methods.",
            )


def _range_probes(rng: Range) -> list[Any]:
    if rng.choices is not None:
        return list(rng.choices)
    return [rng.low, rng.high]


def _check_value(r: _Reader, key: str, cls: type, pname: str, value: Any) -> None:
    """Build the method with this one value so its own validation speaks."""
    try:
        create_method(cls.name, {pname: value})
    except (ValueError, TypeError) as exc:
        raise r.error(key, str(exc)) from None


def _objectives(r: _Reader, value: Any, known: dict[str, str]) -> tuple[Objective, ...]:
    """``objectives: {accuracy: max, macs: min}``."""
    if not isinstance(value, dict):
        raise r.error("objectives", "must map metric names to min or max, e.g. `{accuracy: max, macs: min}`.")
    if not 2 <= len(value) <= 4:
        raise r.error("objectives", f"must name 2 to 4 metrics, but names {len(value)}.")
    out = []
    for metric, direction in value.items():
        key = f"objectives.{metric}"
        if metric not in known:
            raise r.error(key, f"unknown metric '{metric}'.{did_you_mean(str(metric), known)} Known metrics: {', '.join(known)}.")
        out.append(Objective(metric, r.choice(direction, key, ("min", "max"))))
    return tuple(out)


_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


def _constraints(r: _Reader, value: Any, known: dict[str, str]) -> tuple[Constraint, ...]:
    """``constraints: ["accuracy_drop <= 0.02", "latency_ms <= 5"]``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise r.error("constraints", 'must be a list such as `["accuracy_drop <= 0.02"]`.')
    out = []
    for i, text in enumerate(value):
        key = f"constraints[{i}]"
        match = _CONSTRAINT.match(str(text))
        if not match:
            raise r.error(key, f"must read 'METRIC <= NUMBER' or 'METRIC >= NUMBER', but got {text!r}.")
        metric, op, bound = match.groups()
        if metric not in known:
            raise r.error(key, f"unknown metric '{metric}'.{did_you_mean(metric, known)} Known metrics: {', '.join(known)}.")
        try:
            out.append(Constraint(metric, op, float(bound)))
        except ValueError:
            raise r.error(key, f"the bound {bound!r} is not a number.") from None
    return tuple(out)


def _warnings(r: _Reader, objectives: tuple[Objective, ...], constraints: tuple[Constraint, ...], known: dict[str, str]) -> tuple[str, ...]:
    """What is valid but probably not meant: an objective against its metric's nature, a constraint that always holds.

    Raises:
        UserError: a constraint that never holds (its bound lies outside its metric's range).
    """
    out = []
    for o in objectives:
        natural = known[o.metric]
        if o.direction != natural:
            nature = "higher is better" if natural == "max" else "lower is better"
            out.append(
                r.message(
                    f"objectives.{o.metric}",
                    f"{o.direction} {'minimises' if o.direction == 'min' else 'maximises'} {o.metric}, for which {nature}; "
                    f"the search will favour the worst models. Did you mean `{o.metric}: {natural}`?",
                )
            )
    for i, c in enumerate(constraints):
        if c.metric not in METRIC_RANGES:
            continue
        low, high = METRIC_RANGES[c.metric]
        never = c.bound > high if c.op == ">=" else c.bound < low
        always = c.bound <= low if c.op == ">=" else c.bound >= high
        if never or always:
            effect = (
                "never holds: no trial could be feasible and the Pareto front would be empty"
                if never
                else "always holds: it constrains nothing"
            )
            text = f"'{c}' {effect}, since {c.metric} lies within [{low:g}, {high:g}]" + (
                " (a fraction: write 0.9 for 90%)." if high == 1.0 else "."
            )
            if never:
                # The whole budget would be spent on trials that cannot count: refused up front.
                raise r.error(f"constraints[{i}]", text)
            out.append(r.message(f"constraints[{i}]", text))
    return tuple(out)
