"""Search spaces: one YAML file says what to compress, with what, toward which objectives.

Loading validates everything up front and names the file, the key path and the fix on bad
input (``spaces/x.yaml: methods.l1_filter.params.ratio: ...``). See ``spaces/quickstart.yaml``
for a commented example of every key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from methods import create_method, get_method, hyperparameters, list_methods
from methods._base import Range
from errors import UserError, did_you_mean
from search.objectives import COST_METRICS, Constraint, Objective

__all__ = [
    "SearchSpace",
    "MethodSpace",
    "Objective",
    "Constraint",
    "Budget",
    "load_space",
    "parse_space",
    "COST_METRICS",
    "metrics_of_task",
]

SAMPLERS = ("nsga2", "tpe", "random")


def metrics_of_task(task: str) -> dict[str, str]:
    """Every metric a trial of ``task`` reports, with its natural direction.

    The task's quality metrics (``accuracy``; ``psnr``, ``ssim`` for super-resolution), their
    drops from the baseline (``accuracy_drop``) and the cost metrics.
    """
    from tasks import task_metrics

    out: dict[str, str] = {}
    for metric in task_metrics(task):
        out[metric] = "max"
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
    trials: int = 12
    concurrent: int = 2
    epochs: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    time_limit_s: float | None = None


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (the parsed YAML)."""

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
    sampler: str = "nsga2"
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    latency_batch_size: int = 1
    latency_repeats: int = 20
    results_dir: str = "slimtune_results"
    tracking_uri: str = "sqlite:///mlflow.db"
    optuna_storage: str | None = None
    checkpoint_storage: str | None = None  # Tune's storage: shared path or s3:// / gs:// URI
    source: str = ""  # the YAML text, stored with the search
    path: str = ""

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def with_overrides(self, **changes: Any) -> SearchSpace:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------


_TOP_KEYS = {
    "name", "task", "model", "baseline", "training", "methods", "objectives", "constraints",
    "budget", "sampler", "measure", "output",
}


class _Reader:
    """Reads nested YAML mappings and raises errors that carry the file and the key path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, key_path: str, message: str) -> UserError:
        where = f"{self.path}: {key_path}: " if key_path else f"{self.path}: "
        return UserError(where + message)

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


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; UserError (file, key path, fix) on bad input."""
    path = Path(path)
    if not path.is_file():
        bundled = Path(__file__).resolve().parent.parent / "spaces" / path.name
        hint = f" A space of that name ships with slimtune: {bundled}." if bundled.is_file() else ""
        raise UserError(f"{path}: no such file.{hint}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    return parse_space(data, str(path), text)


def parse_space(data: Any, path: str = "<space>", source: str = "") -> SearchSpace:
    """Validate a parsed YAML document (see :func:`load_space`)."""
    r = _Reader(path)
    top = r.mapping(data, "", _TOP_KEYS)
    for required in ("task", "model", "methods", "objectives"):
        if required not in top:
            raise r.error(required, "is missing; every space names a task, a model, methods and objectives.")

    name = str(top.get("name") or Path(path).stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise r.error("name", f"may hold letters, digits, '_', '.' and '-' only, but got {name!r}.")

    task, task_options = _named(r, top["task"], "task")
    from tasks import list_tasks

    if task not in list_tasks():
        raise r.error("task", f"unknown task '{task}'.{did_you_mean(task, list_tasks())} Known tasks: {', '.join(list_tasks())}.")
    known_metrics = metrics_of_task(task)
    # Trials run in their own working folders (and on other machines): data folders are made
    # absolute here, relative to where the search was started.
    for key, value in list(task_options.items()):
        if (key == "root" or key.endswith("_root")) and isinstance(value, str):
            task_options[key] = str(Path(value).expanduser().resolve())
    model, model_options = _named(r, top["model"], "model")

    baseline = r.mapping(top.get("baseline"), "baseline", {"epochs", "checkpoint"})
    baseline_epochs = r.number(baseline.get("epochs", 10), "baseline.epochs", int, 0)
    checkpoint = baseline.get("checkpoint")
    if checkpoint is not None:
        # Absolute from here on: on a cluster the baseline is loaded by a worker.
        candidates = [Path(str(checkpoint)).expanduser(), Path(path).parent / str(checkpoint)]
        found = next((c.resolve() for c in candidates if c.is_file()), None)
        if found is None:
            raise r.error("baseline.checkpoint", f"file {checkpoint!r} does not exist (looked in the working folder and beside the space); train one with `baseline.epochs` or fix the path.")
        checkpoint = str(found)

    training = r.mapping(top.get("training"), "training", {"batch_size", "lr", "optimizer", "weight_decay"})
    methods = _methods(r, top["methods"])
    _check_task_kinds(r, methods, task)
    objectives = _objectives(r, top["objectives"], known_metrics)
    constraints = _constraints(r, top.get("constraints"), known_metrics)

    budget_map = r.mapping(
        top.get("budget"), "budget",
        {"trials", "concurrent", "epochs", "cpus_per_trial", "gpus_per_trial", "max_failures", "time_limit_s"},
    )
    defaults = Budget()
    budget = Budget(
        trials=r.number(budget_map.get("trials", defaults.trials), "budget.trials", int, 1),
        concurrent=r.number(budget_map.get("concurrent", defaults.concurrent), "budget.concurrent", int, 1),
        epochs=r.number(budget_map.get("epochs", defaults.epochs), "budget.epochs", int, 0),
        cpus_per_trial=r.number(budget_map.get("cpus_per_trial", defaults.cpus_per_trial), "budget.cpus_per_trial", float, 0),
        gpus_per_trial=r.number(budget_map.get("gpus_per_trial", defaults.gpus_per_trial), "budget.gpus_per_trial", float, 0),
        max_failures=r.number(budget_map.get("max_failures", defaults.max_failures), "budget.max_failures", int, 0),
        time_limit_s=(
            None if budget_map.get("time_limit_s") is None
            else r.number(budget_map["time_limit_s"], "budget.time_limit_s", float, 1)
        ),
    )

    sampler_map = top.get("sampler", {})
    if isinstance(sampler_map, str):
        sampler_map = {"name": sampler_map}
    sampler_map = r.mapping(sampler_map, "sampler", {"name", "seed"})
    measure = r.mapping(top.get("measure"), "measure", {"latency_batch_size", "latency_repeats"})
    output = r.mapping(top.get("output"), "output", {"results_dir", "tracking_uri", "optuna_storage", "checkpoint_storage"})

    return SearchSpace(
        name=name,
        task=task,
        task_options=task_options,
        model=model,
        model_options=model_options,
        baseline_epochs=baseline_epochs,
        baseline_checkpoint=checkpoint,
        methods=methods,
        objectives=objectives,
        constraints=constraints,
        budget=budget,
        sampler=r.choice(sampler_map.get("name", "nsga2"), "sampler.name", SAMPLERS),
        seed=r.number(sampler_map.get("seed", 0), "sampler.seed", int, 0),
        batch_size=r.number(training.get("batch_size", 64), "training.batch_size", int, 1),
        lr=r.number(training.get("lr", 0.05), "training.lr", float, 0),
        optimizer=r.choice(training.get("optimizer", "sgd"), "training.optimizer", OPTIMIZERS),
        weight_decay=r.number(training.get("weight_decay", 5e-4), "training.weight_decay", float, 0),
        latency_batch_size=r.number(measure.get("latency_batch_size", 1), "measure.latency_batch_size", int, 1),
        latency_repeats=r.number(measure.get("latency_repeats", 20), "measure.latency_repeats", int, 1),
        results_dir=str(output.get("results_dir", "slimtune_results")),
        tracking_uri=str(output.get("tracking_uri", "sqlite:///mlflow.db")),
        optuna_storage=output.get("optuna_storage"),
        checkpoint_storage=output.get("checkpoint_storage"),
        source=source,
        path=path,
    )


def _named(r: _Reader, value: Any, key: str) -> tuple[str, dict[str, Any]]:
    """``task: digits`` or ``task: {name: cifar10, options: {...}}``."""
    if isinstance(value, str):
        return value, {}
    m = r.mapping(value, key, {"name", "options"})
    if "name" not in m:
        raise r.error(f"{key}.name", f"is missing; write `{key}: NAME` or `{key}: {{name: NAME, options: {{...}}}}`.")
    options = r.mapping(m.get("options"), f"{key}.options", set(m.get("options") or {}))
    return str(m["name"]), dict(options)


def _methods(r: _Reader, value: Any) -> tuple[MethodSpace, ...]:
    if not isinstance(value, dict) or not value:
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
                        low=spec.get("low"), high=spec.get("high"), log=bool(spec.get("log", False)),
                        step=spec.get("step"), choices=tuple(spec["choices"]) if "choices" in spec else None,
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
    must_be_last = [m.name for m in out if get_method(m.name).must_be_last]
    if len(must_be_last) > 1:
        raise r.error("methods", f"at most one of {', '.join(must_be_last)} may be used: each must come last in a pipeline.")
    if must_be_last and out[-1].name != must_be_last[0]:
        raise r.error(
            f"methods.{must_be_last[0]}",
            "must be the last method: nothing can follow a method whose weights are final. Move it to the end.",
        )
    return tuple(out)


def _check_task_kinds(r: _Reader, methods: tuple[MethodSpace, ...], task: str) -> None:
    from tasks import task_kind

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


_CONSTRAINT = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


def _constraints(r: _Reader, value: Any, known: dict[str, str]) -> tuple[Constraint, ...]:
    """``constraints: ["accuracy_drop <= 0.02", "latency_ms <= 5"]``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise r.error("constraints", "must be a list such as `[\"accuracy_drop <= 0.02\"]`.")
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

