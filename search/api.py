"""The Python API: the search ``slimtune search`` runs, from a notebook or a script.

:func:`search` takes the space as a YAML file or a dict (the same keys, checked by the same code
with the same messages), and optionally Python objects in place of its ``model:`` and ``task:``;
it returns a :class:`SearchResult` (the front's rows with their MLflow run ids, the baseline,
the hypervolume, :meth:`SearchResult.export`). :func:`load` reopens a finished search and
:func:`resume` continues an interrupted one. The ``slimtune`` command's ``search``, ``resume``
and ``export`` call these functions.

An object takes the place of the space's reference; the space may still give its options
(``model: {options: {width: 8}}``), but a space that also names a model (``name`` or
``import``) is refused: one of the two, never a silent choice. Objects reach Ray's workers
pickled (Ray's cloudpickle), so each is pickled once up front; the pickle's SHA-256 names it
(``object:tiny_net.TinyNet@1a2b3c4d5e6f``) and keys the cached baseline, and the manifest and
each ``recipe.json`` describe it (module, qualname, source file and its SHA-256). What needs the
object later (``slimtune replay``, the pickled module form of an export, a resume) is refused on
the command line with one line that says to pass it again through :func:`load` or
:func:`resume`; the program form (``model.pt2``) exports from the command line without it.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from errors import UserError
from errors.user_code import adopt_object, is_object, python_object, user_object

# Through their modules: what patches runner.run_search or record.load_search (the CLI tests) reaches the API too.
from search.driver import runner
from search.driver.checks import check_writable_folder
from search.driver.runner import SearchInterrupted
from search.results import record as stored
from search.results.export import chosen_trial, register_export, write_export
from search.results.ranking import front, pareto_table, rank_records, search_hypervolume
from search.results.record import SearchRecord, TrialRecord, completed_records
from search.results.report import print_now
from search.space.spec import SearchSpace, load_space, parse_space, read_space_document
from tasks import Task, task_class

__all__ = ["search", "load", "resume", "SearchResult", "SearchInterrupted", "EXPORT_FORMS", "check_export_target"]

#: The forms :meth:`SearchResult.export` checks and times (``compile=True`` adds ``compiled``).
EXPORT_FORMS = ("program", "module", "onnx")

#: What a space given as a dict is called in messages; its relative paths mean the current folder.
DICT_SPACE = "<space dict>"


def search(
    space: str | Path | dict[str, Any],
    *,
    model: Any = None,
    task: Any = None,
    name: str | None = None,
    trials: int | None = None,
    results_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    warm_start: str | None = None,
    log: Callable[[str], None] = print_now,
) -> SearchResult:
    """Run a search as ``slimtune search`` does and return its result.

    Args:
        space: A space file, or a dict of the same keys (a missing ``name`` is ``search``).
        model: In place of the space's ``model:``: an ``nn.Module`` subclass or a function
            returning a module (given ``num_classes`` and ``in_channels`` when it takes them, and
            ``model.options``), or a trained module instance, whose weights become the baseline
            (a copy: the instance is never changed; the space must not set ``baseline``).
        task: In place of the space's ``task:``: a ``tasks.Task`` subclass (given ``task.options``)
            or a built instance.
        name, trials, results_dir, tracking_uri, address, warm_start: As the command's options.
        log: Receives each progress line.

    Raises:
        UserError: A bad space, an object that cannot be pickled, a model or task given twice.
        SearchInterrupted: Ctrl-C stopped the search; :func:`resume` continues it.
    """
    parsed = _parse(space, model, task)
    record = runner.run_search(
        parsed, name=name, trials=trials, tracking_uri=tracking_uri, address=address, results_dir=results_dir, log=log,
        warm_start=warm_start,
    )  # fmt: skip
    return SearchResult.of(record)


def load(name: str, results_dir: str | Path = "slimtune_results", *, model: Any = None, task: Any = None) -> SearchResult:
    """A finished search, reopened; ``model``/``task`` give back the objects a search was run with (to export its module form)."""
    record = stored.load_search(name, results_dir)
    _adopt(record, model, task)
    return SearchResult.of(record)


def resume(
    name: str,
    results_dir: str | Path = "slimtune_results",
    *,
    model: Any = None,
    task: Any = None,
    address: str | None = None,
    log: Callable[[str], None] = print_now,
) -> SearchResult:
    """Continue an interrupted search (``slimtune resume``); a search run with Python objects needs them again."""
    if model is not None or task is not None:
        _adopt(stored.load_search(name, results_dir), model, task)
    return SearchResult.of(runner.resume_search(name, results_dir=results_dir, address=address, log=log))


@dataclass
class SearchResult:
    """A finished search: its rows, its front, its baseline, and the export of a trial.

    Attributes:
        name: The search's name (its MLflow experiment).
        folder: Its results folder (``<results_dir>/<name>``).
        rows: Every completed trial, best rank first: the row ``slimtune pareto --all --json``
            prints (``trial``, ``run_id``, ``rank``, ``feasible``, ``pipeline``, ``quality`` where
            the result cannot be trusted, each task metric the trial reported), each objective's
            value, ``recipe`` (the methods with their hyperparameters), ``metrics`` (everything
            the trial reported) and ``mlflow_run_id``.
        front: The rows of the feasible Pareto front.
        baseline: The uncompressed model's metrics.
        hypervolume: The front's hypervolume (as ``slimtune pareto`` prints it).
        record: The search as stored (:class:`search.results.record.SearchRecord`).
    """

    name: str
    folder: Path
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    baseline: dict[str, Any]
    hypervolume: float
    record: SearchRecord = field(repr=False)
    trials: list[TrialRecord] = field(repr=False, default_factory=list)

    @classmethod
    def of(cls, record: SearchRecord) -> SearchResult:
        records = completed_records(record)
        rank_records(record, records)
        by_name = {r.name: r for r in records}
        # The rows of `slimtune pareto --all --json`, in its order, with what the API adds.
        rows = [_row(record, row, by_name[row["trial"]]) for row in pareto_table(record, records, only_front=False)]
        best = {r.name for r in front(records)}
        return cls(
            name=record.name,
            folder=record.folder,
            rows=rows,
            front=[row for row in rows if row["trial"] in best],
            baseline=dict(record.baseline_metrics),
            hypervolume=search_hypervolume(record, records),
            record=record,
            trials=[by_name[row["trial"]] for row in rows],
        )

    def trial(self, which: str | dict[str, Any] | TrialRecord) -> TrialRecord:
        """A completed trial by row, name (``trial_003``), pick (``knee``, ``max-accuracy``, ``min-macs``) or MLflow run id (a unique prefix)."""
        if isinstance(which, TrialRecord):
            return which
        if isinstance(which, dict):
            which = which.get("trial", "")
        if not isinstance(which, str):
            raise UserError(f"a trial is a row of rows/front, a name such as 'trial_003', a pick or a run id, but got {which!r}.")
        named = [r for r in self.trials if r.name == which]
        if named:
            return named[0]
        is_pick = which == "knee" or which.startswith(("max-", "min-"))
        return chosen_trial(self.record, self.trials, None if is_pick else which, which if is_pick else None)

    def export(
        self,
        trial: str | dict[str, Any] | TrialRecord,
        out_dir: str | Path,
        *,
        form: str | tuple[str, ...] | None = None,
        register: str | None = None,
        alias: str | None = None,
        compile: bool = False,
        device: str = "cpu",
        batch_size: int | None = None,
        threads: int | None = None,
        log: Callable[[str], None] = print,
    ) -> Path:
        """Export a trial as ``slimtune export`` does into ``out_dir`` (new or empty) and return it.

        ``form``: one or more of :data:`EXPORT_FORMS` to check and time (default all); ``register``
        also registers the model in the MLflow Model Registry under that name, with ``alias``
        (default: the pick, when ``trial`` is one). Whatever fails (or Ctrl-C) leaves ``out_dir``
        as it was, so the same call can run again.
        """
        forms = (form,) if isinstance(form, str) else tuple(form) if form is not None else None
        for f in forms or ():
            if f not in EXPORT_FORMS:
                raise UserError(f"form must be one of {', '.join(EXPORT_FORMS)}, but got {f!r}.")
        out = Path(out_dir)
        created = None if out.exists() else next(f for f in (out.absolute(), *out.absolute().parents) if f.parent.exists())
        was_empty = out.is_dir() and not any(out.iterdir())
        try:
            check_export_target(out, device, batch_size, threads)
            chosen = self.trial(trial)
            example = write_export(
                self.record, chosen, out, torch.device(device), batch_size=batch_size, threads=threads, compile=compile,
                log=log, forms=forms,
            )  # fmt: skip
        except BaseException:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif was_empty:
                for path in out.iterdir():
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            raise
        if register:
            # The export is written: it stays when the registry refuses the model.
            picked = trial if isinstance(trial, str) and (trial == "knee" or trial.startswith(("max-", "min-"))) else None
            register_export(self.record, chosen, out, register, alias or picked, example, log=log)
        return out


def check_export_target(out: Path, device: str = "cpu", batch_size: int | None = None, threads: int | None = None) -> None:
    """Refuse, before anything is read or written, an export whose options or folder cannot work (new or empty, writable)."""
    for flag, value in (("--batch-size", batch_size), ("--threads", threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, but got {value}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA device; export on a machine with a GPU, or use --device cpu.")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose an empty or new folder.")
    check_writable_folder(out, "--out")


def _row(record: SearchRecord, table_row: dict[str, Any], r: TrialRecord) -> dict[str, Any]:
    """``table_row`` (a row of :func:`search.results.ranking.pareto_table`) with the recipe, every reported
    metric, the MLflow run id, and each objective (None where the trial did not report it)."""
    row = dict(table_row)
    for metric in record.metric_names:
        row.setdefault(metric, r.metrics.get(metric))
    return {**row, "recipe": r.recipe, "metrics": dict(r.metrics), "mlflow_run_id": r.run_id}


# ----------------------------------------------------------------------------------------------
# The space, with the objects in place of its references.
# ----------------------------------------------------------------------------------------------


def _parse(space: str | Path | dict[str, Any], model: Any, task: Any) -> SearchSpace:
    """The space parsed by the YAML's own code, each object (pickled and named) in place of its key."""
    if isinstance(space, dict):
        data, label, source = copy.deepcopy(space), DICT_SPACE, ""
        data.setdefault("name", "search")
    elif isinstance(space, (str, Path)):
        if model is None and task is None:
            return load_space(space)
        data, source = read_space_document(Path(space))
        label = str(space)
    else:
        raise UserError(f"space must be a path to a YAML file or a dict of its keys, but got {type(space).__name__}.")
    if not isinstance(data, dict):
        # The parser's own message for a document that is no mapping.
        return parse_space(data, label, source)
    for key, obj in (("task", task), ("model", model)):
        if obj is not None:
            data[key] = {"object": _describe(key, obj, data, label), **_options(data.get(key), key, obj, label)}
    if not source:
        source = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return parse_space(data, label, source)


def _options(entry: Any, key: str, obj: Any, label: str) -> dict[str, Any]:
    """The space's ``key: {options: ...}`` that the object keeps; a space that also names one is refused."""
    if entry is None:
        return {}
    if isinstance(entry, dict) and not ({"name", "import", "object"} & set(entry)):
        return {"options": entry["options"]} if "options" in entry else {}
    named = entry if isinstance(entry, str) else {k: v for k, v in entry.items() if k != "options"} if isinstance(entry, dict) else entry
    raise UserError(
        f"{label}: {key}: names {named!r}, and search() was given {key}={_shown(obj)}; give the {key} once: drop "
        f"{key} from the space (keep `{key}: {{options: ...}}` for its options) or the {key}= argument."
    )


def _describe(key: str, obj: Any, data: dict[str, Any], label: str) -> dict[str, Any]:
    """Check ``obj`` fits ``key``, pickle and register it; its description for the space's ``key: {object: ...}``."""
    if key == "model":
        if isinstance(obj, nn.Module):
            if data.get("baseline") is not None:
                raise UserError(
                    f"{label}: baseline: the trained module given as model={_shown(obj)} is the baseline, so the space must not "
                    "set baseline (epochs or checkpoint); remove it, or pass the model's class to train a baseline."
                )
            # Its weights are the baseline: nothing trains before the trials.
            data["baseline"] = {"epochs": 0}
        elif not callable(obj):
            raise UserError(
                f"model={_shown(obj)}: must be an nn.Module subclass, a function returning a module, or a trained nn.Module instance."
            )
        return user_object(python_object(obj, "model")).describe()
    if not (isinstance(obj, Task) or (isinstance(obj, type) and issubclass(obj, Task))):
        raise UserError(f"task={_shown(obj)}: must be a tasks.Task subclass or instance (see tasks.Task's docstring).")
    cls = obj if isinstance(obj, type) else type(obj)
    name = python_object(obj, "task", {"kind": getattr(cls, "kind", None), "metric_directions": getattr(cls, "metric_directions", None)})
    task_class(name)  # its kind and metric directions, checked as an imported task's
    entry = user_object(name)
    entry.description["metric_directions"] = dict(cls.metric_directions)
    return entry.describe()


def _shown(obj: Any) -> str:
    holder = obj if isinstance(obj, type) or callable(obj) and not isinstance(obj, nn.Module) else type(obj)
    text = f"{getattr(holder, '__module__', '?')}.{getattr(holder, '__qualname__', type(holder).__name__)}"
    return text if holder is obj else f"{text}()"


def _adopt(record: SearchRecord, model: Any, task: Any) -> None:
    """Give a reopened search the objects it ran with; refuse one it did not run with."""
    space = record.space
    for key, name, obj in (("model", space.model, model), ("task", space.task, task)):
        if obj is None:
            continue
        if not is_object(name):
            raise UserError(f"search '{record.name}' ran with {key} '{name}', not a Python object; call load() without {key}=.")
        adopt_object(name, obj)
