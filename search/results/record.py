"""A search as stored on disk, and its trials as the Optuna study holds them (no torch, no Ray).

Layout of a search's results folder (``<results_dir>/<name>/``):

- ``search.json``: the manifest (the space with its paths made absolute, objectives, tracking
  URI, Optuna storage, parent run, baseline), written before the baseline trains so an
  interrupted search can be resumed;
- ``baseline.pt``: the uncompressed model's weights, trained once, shared by every trial;
- ``runs.json``: Tune trial id -> MLflow run id, status and final checkpoint;
- ``../baselines/``: trained baselines shared by the searches of the results folder
  (``search.driver.baselines``);
- ``tune/``: Tune's experiment (trial checkpoints; the final one holds the exported model).

The Optuna study is the source of truth for which trials ran and how they ended: a trial is
COMPLETE there before its ``done`` line is printed, and MLflow and ``runs.json`` are brought in
line with it (``search.driver.runner.finish_search``). Everything here reads the manifest and the study
only, so ``slimtune pareto`` starts without importing torch, Ray or any method.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml

from errors import UserError, did_you_mean
from search.results.tracking import SearchTracker
from search.space.objectives import Constraint, Objective

if TYPE_CHECKING:
    from search.space.spec import SearchSpace

__all__ = [
    "SearchRecord",
    "TrialRecord",
    "Progress",
    "load_search",
    "completed_records",
    "search_progress",
    "exported_model_dir",
    "trial_number",
    "trial_state",
    "study_trials",
    "open_optuna_storage",
    "INTERRUPTED",
]

#: Why a trial is FAILED when the driver died while it ran and Tune's saved state lacked it.
INTERRUPTED = (
    "interrupted: the driver stopped while the trial ran and Tune's saved state did not include it; its slot was given to a new trial"
)


@dataclass
class SearchRecord:
    """A search as stored in its manifest.

    The objectives, constraints and the task's metric names are stored as plain data beside the
    space's text, so ranking a search does not parse the space (which loads every method).
    """

    name: str
    folder: Path
    space_yaml: str
    space_path: str
    trials: int
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    task_metrics: tuple[str, ...]
    tracking_uri: str
    optuna_storage: str
    parent_run_id: str | None = None
    baseline_metrics: dict[str, Any] = field(default_factory=dict)
    #: Optuna parameters of the recipes a ``--warm-start`` search runs first.
    warm_start_points: list[dict[str, Any]] = field(default_factory=list)
    _space: SearchSpace | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_space(cls, name: str, folder: Path, space: SearchSpace, tracking_uri: str, optuna_storage: str) -> SearchRecord:
        """The record of a new search (nothing trained yet)."""
        from search.space.spec import metrics_of_task  # the parser imports torch and the methods; pareto stays free of them

        return cls(
            name=name,
            folder=folder,
            # Resolved: relative paths in the space mean the folder the search started in.
            space_yaml=space.resolved_source,
            space_path=str(Path(space.path).resolve()) if space.path else "",
            trials=space.budget.trials,
            objectives=tuple(space.objectives),
            constraints=tuple(space.constraints),
            task_metrics=tuple(metrics_of_task(space.task)),
            tracking_uri=tracking_uri,
            optuna_storage=optuna_storage,
            _space=space,
        )

    @property
    def space(self) -> SearchSpace:
        """The full search space, parsed from the stored text on first use (imports the methods)."""
        if self._space is None:
            from search.space.spec import parse_space  # the parser imports torch and the methods; pareto stays free of them

            space = parse_space(yaml.safe_load(self.space_yaml), self.space_path or "<stored space>", self.space_yaml)
            self._space = space.with_overrides(budget=dataclasses.replace(space.budget, trials=self.trials))
        return self._space

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def manifest(self) -> Path:
        return self.folder / "search.json"

    @property
    def has_baseline(self) -> bool:
        """True once the baseline is trained and the parent run exists (trials can start)."""
        return self.parent_run_id is not None and (self.folder / "baseline.pt").is_file()

    def save(self) -> None:
        data = {
            "name": self.name,
            "space_path": self.space_path,
            "space_yaml": self.space_yaml,
            "trials": self.trials,
            "objectives": [[o.metric, o.direction] for o in self.objectives],
            "constraints": [[c.metric, c.op, c.bound] for c in self.constraints],
            "task_metrics": list(self.task_metrics),
            "tracking_uri": self.tracking_uri,
            "optuna_storage": self.optuna_storage,
            "parent_run_id": self.parent_run_id,
            "baseline_metrics": self.baseline_metrics,
            "warm_start_points": self.warm_start_points,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.manifest)

    def tracker(self) -> SearchTracker:
        return SearchTracker(self.tracking_uri, self.name, self.folder)

    @property
    def checkpoint_storage(self) -> str:
        """Tune's storage: ``<output.checkpoint_storage>/<name>`` (shared path or URI) or the results folder."""
        if self.space.checkpoint_storage:
            return f"{self.space.checkpoint_storage.rstrip('/')}/{self.name}"
        return str(self.folder)


def load_search(name: str, results_dir: str | Path = "slimtune_results") -> SearchRecord:
    """Read a search's manifest; UserError naming the folders searched when it is missing."""
    folder = Path(results_dir).resolve() / name
    manifest = folder / "search.json"
    if not manifest.is_file():
        existing = sorted(p.parent.name for p in Path(results_dir).glob("*/search.json")) if Path(results_dir).is_dir() else []
        known = f" Searches in {results_dir}: {', '.join(existing)}." if existing else f" There are no searches in {results_dir!s}."
        raise UserError(
            f"no search named '{name}' ({manifest} does not exist).{did_you_mean(name, existing)}{known} Use --results-dir to look elsewhere."
        )
    data = json.loads(manifest.read_text())
    record = SearchRecord(
        name=data["name"],
        folder=folder,
        space_yaml=data["space_yaml"],
        space_path=data.get("space_path") or "",
        trials=int(data["trials"]),
        objectives=tuple(Objective(m, d) for m, d in data.get("objectives", [])),
        constraints=tuple(Constraint(m, op, float(b)) for m, op, b in data.get("constraints", [])),
        task_metrics=tuple(data.get("task_metrics", [])),
        tracking_uri=data["tracking_uri"],
        optuna_storage=data["optuna_storage"],
        parent_run_id=data.get("parent_run_id"),
        baseline_metrics=data.get("baseline_metrics", {}),
        warm_start_points=data.get("warm_start_points", []),
    )
    if not record.objectives or not record.task_metrics:
        # A manifest written before objectives were stored: read them from the space.
        from search.space.spec import metrics_of_task  # the parser imports torch and the methods; pareto stays free of them

        space = record.space
        record.objectives, record.constraints = tuple(space.objectives), tuple(space.constraints)
        record.task_metrics = tuple(metrics_of_task(space.task))
    return record


# ----------------------------------------------------------------------------------------------
# Trials, as the study holds them.
# ----------------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One completed trial: what ran, what it scored, where its exported model is, when it completed (POSIX seconds)."""

    number: int
    trial_id: str
    run_id: str | None
    recipe: list[dict[str, Any]]
    metrics: dict[str, float]
    checkpoint: str | None
    completed_at: float | None = None
    rank: int = -1
    feasible: bool = True

    @property
    def name(self) -> str:
        return f"trial_{self.number:03d}"

    @property
    def pipeline(self) -> str:
        return pipeline_text(self.recipe)


def pipeline_text(recipe: list[dict[str, Any]]) -> str:
    """``l1_filter(ratio=0.3) > kd(temperature=4)``; ``(baseline)`` for an empty recipe."""
    if not recipe:
        return "(baseline)"
    parts = []
    for step in recipe:
        params = ",".join(f"{k}={_short(v)}" for k, v in step["params"].items())
        parts.append(f"{step['name']}({params})")
    return " > ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


#: Storage URLs whose schema this process has checked against its Optuna.
_CHECKED_STORAGES: set[str] = set()


def open_optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``, its schema checked against this Optuna once per process.

    Optuna checks the schema version (with alembic) each time a storage is made, 0.35 s on a
    2-core machine; a search opens its study at each step of its start and close-out. The
    first storage made for a URL creates missing tables and checks; later ones skip the check.
    """
    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=url in _CHECKED_STORAGES)
    _CHECKED_STORAGES.add(url)
    return storage


def _study(record: SearchRecord):
    """The search's Optuna study, or None when no trial was ever asked for."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=record.name, storage=open_optuna_storage(record.optuna_storage))
    except KeyError:
        return None


def completed_records(record: SearchRecord) -> list[TrialRecord]:
    """Every completed trial of the search, from the Optuna study joined with the run map."""
    study = _study(record)
    if study is None:
        return []
    runs = record.tracker().runs()
    out = []
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        trial_id = t.user_attrs.get("tune_trial_id", "")
        run = runs.get(trial_id, {})
        out.append(
            TrialRecord(
                number=t.number,
                trial_id=trial_id,
                run_id=run.get("run_id"),
                recipe=json.loads(t.user_attrs.get("recipe", "[]")),
                metrics=dict(t.user_attrs.get("metrics", {})),
                checkpoint=run.get("checkpoint"),
                completed_at=t.datetime_complete.timestamp() if t.datetime_complete else None,
            )
        )
    return out


@dataclass(frozen=True)
class Progress:
    """How far a search got, counted in its study.

    Attributes:
        budget: Trials the search runs (``budget.trials``).
        completed: Trials with a final result.
        failed: Trials that failed on their own (a trial lost to an interrupt is not counted:
            its slot went to a new trial).
        reasons: Failure reason -> how many failed trials gave it (from the run map).
        stopped: Trials an early-stopping scheduler stopped (PRUNED in the study); they count
            against the budget and are never on the front.
        exhausted: The sampler's last proposals all equalled tried configurations
            (:func:`space_exhausted`): the search ends with fewer trials.
    """

    budget: int
    completed: int
    failed: int
    reasons: dict[str, int]
    stopped: int = 0
    exhausted: bool = False

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.stopped

    @property
    def finished(self) -> bool:
        return self.done >= self.budget or self.exhausted

    def common_failure(self) -> str:
        """``"NonFiniteLossError: ... (2 of 2 failed trials)"``: the most frequent reason."""
        if not self.reasons:
            return "no reason was recorded (see the trials' error.txt under tune/)"
        reason, count = max(self.reasons.items(), key=lambda item: item[1])
        return f"{reason} ({count} of {self.failed} failed trials)"


def search_progress(record: SearchRecord) -> Progress:
    """Completed and failed trials of the search (the study), with the failure reasons (run map)."""
    study = _study(record)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    completed = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    stopped = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    # A proposal equal to a tried configuration is closed as FAIL without running: not a failure.
    failed = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.FAIL
        and t.user_attrs.get("failure_reason") != INTERRUPTED
        and DUPLICATE_OF not in t.user_attrs
    ]
    numbers = {t.number for t in failed}
    reasons = collections.Counter(
        run.get("reason", "")
        for run in record.tracker().runs().values()
        if run.get("status") == "FAILED" and run.get("reason") != INTERRUPTED and trial_number(run.get("name")) in numbers
    )
    reasons.pop("", None)
    return Progress(
        budget=record.trials,
        completed=completed,
        failed=len(failed),
        reasons=dict(reasons),
        stopped=stopped,
        exhausted=space_exhausted(trials),
    )


def trial_number(trial_name: str | None) -> int | None:
    """``trial_007`` -> 7."""
    if not trial_name or not trial_name.startswith("trial_"):
        return None
    return int(trial_name[len("trial_") :])


@contextlib.contextmanager
def exported_model_dir(checkpoint: str | None):
    """The folder of a trial's exported model, fetched first when the checkpoint is remote."""
    if not checkpoint:
        yield None
        return
    if "://" not in checkpoint:
        folder = Path(checkpoint) / "model"
        yield folder if folder.is_dir() else None
        return

    import pyarrow.fs  # only for a checkpoint in cloud storage (s3://, gs://)

    filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pyarrow.fs.copy_files(f"{path}/model", tmp, source_filesystem=filesystem)
        except (OSError, FileNotFoundError):
            yield None
            return
        yield Path(tmp)


def study_trials(record: SearchRecord) -> int:
    """How many trials the search's study holds, in any state (enqueued ones included)."""
    study = _study(record)
    return len(study.get_trials(deepcopy=False)) if study is not None else 0


def trial_state(record: SearchRecord, number: int) -> str | None:
    """``COMPLETE``, ``FAIL``, ``RUNNING`` ... of the study's trial ``number`` (None: no such trial)."""
    study = _study(record)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    return trials[number].state.name if 0 <= number < len(trials) else None


# ----------------------------------------------------------------------------------------------
# What the sampler leaves in the study (search.driver.samplers writes it, progress reads it).
# ----------------------------------------------------------------------------------------------

#: User attribute of a study trial that was asked, found to build the same model as trial
#: ``DUPLICATE_OF`` (:mod:`search.driver.duplicates`) and closed as FAIL without being trained
#: (samplers skip failed trials).
DUPLICATE_OF = "duplicate_of"

#: Asks per new trial before the search counts the space as exhausted.
MAX_ASKS = 20


def space_exhausted(trials: list[optuna.trial.FrozenTrial], max_asks: int = MAX_ASKS) -> bool:
    """Whether the last :func:`ask_distinct` on a study found the space exhausted.

    Called when a search's trials have ended, to say why it ran fewer than its budget.
    ``trials`` are the study's trials by number; the asks refused by a call that returned
    None are its ``max_asks`` newest trials, while a call that found a new configuration ends
    with that (not refused) trial.
    """
    return len(trials) >= max_asks and all(DUPLICATE_OF in t.user_attrs for t in trials[-max_asks:])
