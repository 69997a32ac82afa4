"""The driver: run a search (baseline once, trials through Ray Tune + Optuna), resume it, finish it.

What a search keeps on disk is described in ``search.results.record``; the Optuna study is the source of
truth for how each trial ended, and the close-out (``finish_search``) brings MLflow and the run
map in line with it. The first SIGINT lets running trials checkpoint the epoch in progress and
then stops Tune (``search.trial.graceful_stop``); they continue from there on ``slimtune resume``. A
second SIGINT stops at once. Either way :class:`SearchInterrupted` says how far the search got.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import ray
import torch

from errors import UserError
from errors.user_code import is_import, is_object, ref_roots, user_object
from search.driver import _tune
from search.driver._private import fail_open_trials, init_local_ray_with_workers, keep_ray_on_loopback, trial_actors_in_started_workers
from search.driver.baselines import baseline_key, cached_baseline, describe_key, store_baseline
from search.driver.checks import check_before_baseline, check_resources, node_resources
from search.driver.warm_start import warm_start_points
from search.results.html_report import REPORT_ARTIFACT, log_report, write_report
from search.results.ranking import front, pareto_table, rank_records, search_hypervolume
from search.results.record import (
    INTERRUPTED,
    Progress,
    SearchRecord,
    TrialRecord,
    completed_records,
    exported_model_dir,
    load_search,
    open_optuna_storage,
    search_progress,
    trial_number,
)
from search.results.registry import log_trial_model, logged_model_ids
from search.results.report import Reporter, print_now
from search.results.tracking import create_sqlite_aside
from search.space.spec import SearchSpace, load_space
from search.trial.body import refuse_chance_baseline, run_trial, train_baseline, train_baseline_task
from search.trial.graceful_stop import raise_if_interrupted, sigint_is_latched

__all__ = ["run_search", "resume_search", "finish_search", "SearchInterrupted"]


class SearchInterrupted(Exception):
    """The search stopped before its budget was met; ``slimtune resume`` continues it.

    Attributes:
        record: The search.
        progress: Its trials so far.
    """

    def __init__(self, record: SearchRecord, progress: Progress) -> None:
        super().__init__(f"search '{record.name}' interrupted: {progress.done} of {progress.budget} trials done")
        self.record = record
        self.progress = progress


def default_optuna_storage(tracking_uri: str, results_dir: Path) -> str:
    """A SQLite file beside the MLflow store (or in the results folder for a remote MLflow)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return f"sqlite:///{db.parent / 'optuna.db'}"
    return f"sqlite:///{results_dir / 'optuna.db'}"


def _create_optuna_tables(url: str) -> None:
    open_optuna_storage(url).engine.dispose()


def run_search(
    space: SearchSpace | str | Path,
    name: str | None = None,
    trials: int | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    results_dir: str | Path | None = None,
    log=print_now,
    warm_start: str | None = None,
) -> SearchRecord:
    """Train the baseline, run every trial, write MLflow, print and return the search's record.

    ``space`` is a space file or a parsed space (:func:`search.api.search` parses a dict and puts
    Python objects in).

    ``warm_start`` names an earlier search of the same results folder whose Pareto recipes run
    as the first trials (:func:`search.driver.warm_start.warm_start_points`). A Ray this process has
    already started (a test session's, say) is used and left running; otherwise the search starts
    (or connects to) Ray and stops (or leaves) it at the end.

    Raises:
        SearchInterrupted: SIGINT stopped the search before its budget was met.
    """
    _quiet_logging()
    # Command-line options pass the same checks as the YAML's keys.
    space = (space if isinstance(space, SearchSpace) else load_space(space)).with_overrides(
        name=name, trials=trials, tracking_uri=tracking_uri, results_dir=results_dir
    )
    root = Path(space.results_dir).resolve()
    tracking = _absolute_sqlite(space.tracking_uri)
    study_store, taken = _shared_study_names(space, tracking)
    if name is None:
        name = _free_name(space.name, root, taken)
    elif (root / name / "search.json").exists():
        raise UserError(
            f"a search named '{name}' already exists in {root}. Continue it with `slimtune resume {name} --results-dir {root}` or choose another --name."
        )
    elif name in taken:
        raise UserError(
            f"a search named '{name}' is already recorded in the Optuna store {study_store}, by a results folder other than "
            f"{root} (or by a search whose folder was removed): a new search of that name would take its trials for its own. "
            "Choose another --name, or give this results folder its own store with --tracking-uri."
        )
    reporter = Reporter(log, address)
    folder = root / name
    record = SearchRecord.from_space(name, folder, space, tracking, space.optuna_storage or default_optuna_storage(tracking, folder))
    if warm_start is not None:
        record.warm_start_points = warm_start_points(space, warm_start, root)
    reporter.started(record, space.task, space.model)
    if warm_start is not None:
        reporter.say(f"warm start: the first {len(record.warm_start_points)} trials are the Pareto recipes of '{warm_start}'")
    for warning in space.warnings:
        reporter.say(f"warning: {warning}")
    with sigint_is_latched():
        # What can be known before the baseline trains is refused before anything is written; the
        # checks run while Ray starts (ray.init stays on the main thread: it sets a SIGTERM handler).
        preflight = InThread(_pre_flight, space, root, log=lambda line: reporter.say(f"pre-flight {line.strip()}"))
        return _drive(record, reporter, address, restore=False, preflight=preflight)


def resume_search(name: str, results_dir: str | Path = "slimtune_results", address: str | None = None, log=print_now) -> SearchRecord:
    """Continue a search from Tune's experiment state and the persistent Optuna study.

    Raises:
        SearchInterrupted: SIGINT stopped the search again before its budget was met.
    """
    _quiet_logging()
    record = load_search(name, results_dir)
    for entry in record.space.objects:
        # The trials need every Python object the search ran with: one not given again is refused before Ray starts.
        entry.value()
    reporter = Reporter(log, address)
    reporter.resuming(record, search_progress(record))
    with sigint_is_latched():
        return _drive(record, reporter, address, restore=True)


def _drive(record: SearchRecord, reporter: Reporter, address: str | None, restore: bool, preflight: InThread | None = None) -> SearchRecord:
    """Baseline (unless saved), trials, close-out; SearchInterrupted when stopped before the end.

    ``preflight``: the pre-flight checks and the baseline's cache key (:func:`_pre_flight`),
    running while Ray starts; their error comes first, as when they ran before it. A Ctrl-C that
    Python swallowed where it landed (Ray's start, the baseline) is raised between the stages
    (:func:`search.trial.graceful_stop.raise_if_interrupted`).
    """
    try:
        try:
            started = _init_ray(address, user_code_roots(record.space), workers=record.space.budget.concurrent)
        except BaseException as exc:
            if preflight is not None:
                preflight.close(raise_error=not isinstance(exc, KeyboardInterrupt))
            raise
        stores: InThread | None = None
        try:
            key = preflight.result() if preflight is not None else None
            raise_if_interrupted()
            check_resources(record.space, node_resources(ray.nodes()))
            # Saved before anything trains: a search stopped during its baseline can be resumed.
            record.save()
            # MLflow's store and Optuna's (each a SQLite file made whole, with its tables) are made while the baseline trains.
            stores = InThread(_create_stores, record)
            if not record.has_baseline:
                _prepare_baseline(record, address, reporter, stores, key)
            stores.result()
            raise_if_interrupted()
            _tune.fit(record, reporter, restore=restore)
        finally:
            for pending in (preflight, stores):
                if pending is not None:
                    pending.close()
            if started:
                _shutdown_ray()
        if not search_progress(record).finished:
            # Tune returns early only when the first SIGINT stopped it.
            raise KeyboardInterrupt
        return finish_search(record, reporter)
    except KeyboardInterrupt:
        if not record.manifest.is_file():
            # Stopped while Ray started, before the manifest was written: there is nothing to resume.
            raise
        progress = search_progress(record)
        reporter.interrupted(record, progress)
        raise SearchInterrupted(record, progress) from None


def _create_stores(record: SearchRecord) -> None:
    """Create the search's MLflow store (importing MLflow) and Optuna's, each whole or not at all."""
    _ = record.tracker().client  # made on first use: imports MLflow and creates the store
    create_sqlite_aside(record.optuna_storage, _create_optuna_tables)


class InThread:
    """A call run in a thread of its own while the caller goes on (the pre-flight while Ray starts).

    :meth:`result` waits for it and returns its value or raises its exception; :meth:`close`
    (after an error or a Ctrl-C) silences it, so that nothing it logs follows the caller's
    message, and waits for it. Its ``log`` argument, if given, is wrapped for that.
    """

    def __init__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._closed = threading.Event()
        self._outcome: tuple[bool, Any] | None = None
        if "log" in kwargs:
            kwargs["log"] = self._silenced(kwargs["log"])
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs), name=f"slimtune-{function.__name__}")
        self._thread.start()

    def _silenced(self, log: Callable[[str], None]) -> Callable[[str], None]:
        def say(line: str) -> None:
            if self._closed.is_set():
                raise _Closed
            log(line)

        return say

    def _run(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            self._outcome = (True, function(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001  handed to the caller by result()
            self._outcome = (False, exc)

    def result(self) -> Any:
        """Wait for the call; its value, or its exception raised here."""
        self._thread.join()
        assert self._outcome is not None
        done, value = self._outcome
        if not done:
            raise value
        return value

    def close(self, raise_error: bool = False) -> None:
        """Silence the call and wait for it; with ``raise_error``, raise its exception (if it ended with one)."""
        if not raise_error:
            self._closed.set()
        self._thread.join()
        if raise_error:
            self.result()


class _Closed(Exception):
    """Raised in a closed :class:`InThread`'s call when it logs: it stops there, unheard."""


def _pre_flight(space: SearchSpace, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The checks that refuse a space before anything is written, then the key of its baseline in the cache.

    Run while Ray starts: the key lists the task's data and reads the installed packages'
    metadata for the versions its code imports (1 s or more).
    """
    check_before_baseline(space, root, space.tracking_uri, log=log)
    key = baseline_key(space)
    # MLflow's store is made once Ray is up and the resources are checked (nothing is written
    # before): MLflow, 0.7 s to import, is imported now.
    import mlflow.tracking  # noqa: F401

    return key


def _prepare_baseline(
    record: SearchRecord, address: str | None, reporter: Reporter, stores: InThread | None = None, key: dict[str, Any] | None = None
) -> None:
    """Train (or reuse from the results folder's cache) and save the baseline, open the search's parent run, save the manifest.

    ``key``: the baseline's cache key, when the pre-flight made it.
    """
    space = record.space
    key = baseline_key(space) if key is None else key
    cached = cached_baseline(record.folder.parent, key)
    if cached is not None:
        baseline_state, baseline_metrics, folder, trained_by = cached
        reporter.say(f"reused the baseline trained by search '{trained_by}' from {folder} ({describe_key(folder)})")
    else:
        baseline_state, baseline_metrics = _baseline(space, address, reporter)
        refuse_chance_baseline(space, baseline_metrics)
        store_baseline(record.folder.parent, key, baseline_state, baseline_metrics, record.name)
    torch.save(baseline_state, record.folder / "baseline.pt")
    record.baseline_metrics = baseline_metrics
    reporter.baseline(record, baseline_metrics)
    if stores is not None:
        stores.result()
    params = {"space": space.path, "task": space.task, "model": space.model, "trials": str(record.trials), "sampler": space.sampler}
    record.parent_run_id = record.tracker().start_parent(space.source, space.name, baseline_metrics, params)
    record.save()


def _baseline(space: SearchSpace, address: str | None, reporter: Reporter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the baseline here (local Ray) or as one Ray task with a trial's resources (cluster)."""
    if address is None:
        model, metrics = train_baseline(space, _driver_device(space), log=reporter.say)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics

    reporter.say(f"training the baseline on the cluster ({space.baseline_epochs} epochs, {space.budget.gpus_per_trial:g} GPU)")
    task = ray.remote(num_cpus=space.budget.cpus_per_trial, num_gpus=space.budget.gpus_per_trial)(train_baseline_task)
    state, metrics, lines = ray.get(task.remote(space))
    for line in lines:
        reporter.say(line)
    return state, metrics


# ----------------------------------------------------------------------------------------------
# Ray and the libraries' logging.
# ----------------------------------------------------------------------------------------------


def user_code_roots(space: SearchSpace) -> list[Path]:
    """The folders of the user's own code the space imports (``model: {import: REF}``), each once.

    A Python object's module counts too (cloudpickle sends a class of an importable module by
    reference); a notebook's (``__main__``) travels inside the pickle.
    """
    roots: list[Path] = []
    for name in (space.model, space.task):
        refs = [name] if is_import(name) else []
        if is_object(name):
            module = user_object(name).description["module"]
            refs = [f"{module}:object"] if module not in ("__main__", "?") else []
        for ref in refs:
            roots += [root for root in ref_roots(ref) if root not in roots]
    return roots


def _init_ray(address: str | None, user_roots: list[Path] | None = None, workers: int = 1) -> bool:
    """Start a local Ray on 127.0.0.1, or connect to the cluster at ``address``.

    ``user_roots`` (:func:`user_code_roots`) travel to a cluster's workers beside our packages;
    a local Ray's workers find them on the ``PYTHONPATH`` they inherit. A local Ray starts
    ``workers`` workers at once (the trials that run at once), which import the trial's code.

    Returns:
        Whether this call started (or connected) Ray; False when the process already had a Ray
        (started by its caller, e.g. a test session), which the search then leaves running.
    """

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        configure_logging=True,
    )
    # The trial code (this repository's packages) travels to every worker of a cluster.
    root = Path(__file__).resolve().parents[2]
    # A local Ray and a cluster reached at a loopback address (a multi-node cluster on one
    # machine) must stay on 127.0.0.1.
    if address:
        if address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost"):
            keep_ray_on_loopback()
        own = [str(root / package) for package in ("errors", "models", "tasks", "deploy", "methods", "search")]
        for user_root in user_roots or []:
            _refuse_shadowing(user_root)
        kwargs["runtime_env"] = {"py_modules": own + [str(p) for p in user_roots or []]}
        trial_actors_in_started_workers(local=False)
        ray.init(address=address, **kwargs)
    else:
        # A user package imported by module name: the local workers, started below, inherit the path.
        parents = local_import_paths(user_roots or [])
        if parents:
            os.environ["PYTHONPATH"] = os.pathsep.join([*parents, *filter(None, [os.environ.get("PYTHONPATH")])])
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        keep_ray_on_loopback()
        trial_actors_in_started_workers(local=True)
        # The workers started now import torch and the trial's code while the driver checks the
        # space and trains the baseline: the first trials start in them warm.
        init_local_ray_with_workers([run_trial.__module__], workers, **kwargs)
    return True


def local_import_paths(user_roots: list[Path]) -> list[str]:
    """The folders a local Ray's workers need on their ``PYTHONPATH`` to import ``user_roots`` by name.

    A package's parent (a regular package, or a namespace package: a folder without
    ``__init__.py`` that imports by its name) and a single module's folder; not the folder of a
    file reference, which is loaded from its path.
    """
    return [str(root.parent) for root in user_roots if root.suffix == ".py" or _imports_as_package(root)]


def _imports_as_package(folder: Path) -> bool:
    if (folder / "__init__.py").is_file():
        return True
    spec = importlib.util.find_spec(folder.name) if folder.name.isidentifier() else None
    return (
        spec is not None and spec.origin is None and folder.resolve() in [Path(f).resolve() for f in spec.submodule_search_locations or []]
    )


def _refuse_shadowing(root: Path) -> None:
    """A py_module is imported by its name on the workers: a folder named like another module would hide it."""
    name = root.stem if root.suffix == ".py" else root.name
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    here = [Path(p) for p in ([spec.origin] if spec.origin else []) + list(spec.submodule_search_locations or [])] if spec else []
    if not name.isidentifier() or (spec is not None and root.resolve() not in [p.resolve() for p in here]):
        other = f"it would hide the module '{name}' ({spec.origin or here[0]})" if spec else "it is no Python name"
        raise UserError(
            f"{root}: the folder of your model or task code travels to the cluster's workers as a module named after it, "
            f"but {other}; move the files into a folder of their own with a distinct name (letters, digits, _)."
        )


def _shutdown_ray() -> None:
    """Stop the local Ray, or disconnect from the cluster (which keeps running)."""
    ray.shutdown()
    # A Ray reached next (a user's, a cluster) is not known to share this process's environment.
    trial_actors_in_started_workers(local=False)


def _quiet_logging() -> None:
    """Ray, Tune, MLflow and Optuna speak only on errors; slimtune prints its own progress."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Objectives arrive only with a trial's final result; per-epoch results carry val_* metrics.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100000")
    for name in ("ray", "ray.tune", "ray.train", "ray.air", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)

    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------------------------
# Names and paths.
# ----------------------------------------------------------------------------------------------


def _budget_with_trials(space: SearchSpace, trials: int):
    return dataclasses.replace(space.budget, trials=trials)


def _free_name(base: str, results_dir: Path, taken: set[str]) -> str:
    """``base``, or ``base-2``, ``base-3``...: the first name of no search in ``results_dir`` and not in ``taken``."""
    name, n = base, 1
    while (results_dir / name / "search.json").exists() or name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _shared_study_names(space: SearchSpace, tracking_uri: str) -> tuple[str | None, set[str]]:
    """The Optuna store this search shares with other results folders, and the names of its studies.

    A study is named after its search: a new search whose name a study of the store already
    has would continue that study's trials. The store is shared when the space names one
    (``output.optuna_storage``) or it is the default beside a SQLite MLflow store; otherwise
    each search keeps its own in its folder (``(None, set())``). Read only from a SQLite file
    that exists: a server is reached (with a timeout) by the pre-flight, not here.
    """
    if space.optuna_storage:
        url = space.optuna_storage
    elif tracking_uri.startswith("sqlite:///"):
        url = default_optuna_storage(tracking_uri, Path(space.results_dir))  # beside the MLflow store, whatever the folder
    else:
        return None, set()  # each search keeps its own, in its folder
    if not url.startswith("sqlite:///") or not Path(url[len("sqlite:///") :]).is_file():
        return url, set()
    return url, set(optuna.get_all_study_names(open_optuna_storage(url)))


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def _driver_device(space: SearchSpace) -> str:
    return "cuda" if space.budget.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# Close-out.
# ----------------------------------------------------------------------------------------------


def reconcile(record: SearchRecord) -> None:
    """After a complete Tune run, make MLflow and the run map agree with the study.

    Tune saves its experiment state every few seconds; a trial started after the last save and
    cut off by the driver's death is unknown to the resumed Tune, which fills its slot with a new
    trial: the study records the lost one as FAIL with the reason. Then every MLflow run takes
    its trial's state from the study: COMPLETE -> FINISHED with the study's metrics (the driver
    may have died between telling the study and writing MLflow), PRUNED (stopped by the
    early-stopping scheduler) -> KILLED and tagged ``stopped_early``, anything else -> FAILED.
    A run the map has ended whose MLflow status differs (a driver killed or stopped while it
    logged the run's model) gets the map's status back first
    (:meth:`~search.results.tracking.SearchTracker.restore_ended_runs`).
    """

    study = optuna.load_study(study_name=record.name, storage=open_optuna_storage(record.optuna_storage))
    fail_open_trials(study, INTERRUPTED)
    trials = study.get_trials(deepcopy=False)
    tracker = record.tracker()
    tracker.restore_ended_runs()
    # run id -> (Tune trial id, trial name, status): the run map, and the runs MLflow holds open.
    runs = {run["run_id"]: (trial_id, run.get("name"), run.get("status")) for trial_id, run in tracker.runs().items() if run.get("run_id")}
    for run_id, trial_id, name in tracker.open_trial_runs():
        runs[run_id] = (trial_id, name, "RUNNING")
    for run_id, (trial_id, name, status) in runs.items():
        number = trial_number(name)
        trial = trials[number] if number is not None and 0 <= number < len(trials) else None
        if trial is not None and trial.state == optuna.trial.TrialState.COMPLETE:
            if status != "FINISHED":
                tracker.finish_trial(trial_id, run_id, dict(trial.user_attrs.get("metrics", {})), _final_checkpoint(record, number))
        elif trial is not None and trial.state == optuna.trial.TrialState.PRUNED:
            tracker.stop_trial_early(trial_id, run_id, int(trial.user_attrs.get("stopped_at_epoch", 0)))
        elif status != "FAILED":
            reason = trial.user_attrs.get("failure_reason", INTERRUPTED) if trial is not None else INTERRUPTED
            tracker.fail_trial(trial_id, run_id, reason)


def _final_checkpoint(record: SearchRecord, number: int) -> str | None:
    """The newest checkpoint of trial ``number`` that holds its final result (local storage only)."""
    folder = Path(record.checkpoint_storage) / "tune" / f"trial_{number:03d}"
    finals = sorted(folder.glob("checkpoint_*/final.json")) if folder.is_dir() else []
    return str(finals[-1].parent) if finals else None


def finish_search(record: SearchRecord, reporter: Reporter | None = None) -> SearchRecord:
    """Reconcile the stores, rank the trials, tag MLflow, log the Pareto table, plot and models."""
    reporter = reporter or Reporter()
    reconcile(record)
    tracker = record.tracker()
    records = completed_records(record)
    rank_records(record, records)
    hv = search_hypervolume(record, records)
    for r in records:
        if r.run_id:
            tracker.client.set_tag(r.run_id, "pareto_rank", str(r.rank))
            tracker.client.set_tag(r.run_id, "is_pareto", str(r.rank == 0 and r.feasible).lower())
    best = front(records)
    logged = logged_model_ids(record)
    for r in best:
        # The driver fetches each Pareto model from wherever the trial stored it.
        with exported_model_dir(r.checkpoint) as model_dir:
            if r.run_id and model_dir is not None:
                tracker.client.log_artifacts(r.run_id, str(model_dir), "model")
                if r.run_id not in logged:
                    _log_model(record, r, model_dir, reporter)
    rows = pareto_table(record, records, only_front=False)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "pareto.csv"
        _write_csv(rows, csv_path)
        png_path = Path(tmp) / "pareto.png"
        plot_front(record, records, png_path)
        tracker.client.log_artifact(record.parent_run_id, str(csv_path))
        tracker.client.log_artifact(record.parent_run_id, str(png_path))
    log_report(record, write_report(record, record.folder / REPORT_ARTIFACT))
    tracker.client.log_batch(
        record.parent_run_id,
        metrics=tracker._metric_entities(
            {"hypervolume": hv, "front_size": float(len(best)), "completed_trials": float(len(records))}, step=0
        ),
    )
    # A search resumed after it had finished keeps the end time it finished at (MLflow shows the
    # run's duration as end - start).
    ended = tracker.client.get_run(record.parent_run_id).info
    tracker.client.set_terminated(record.parent_run_id, status="FINISHED", end_time=ended.end_time if ended.status == "FINISHED" else None)
    reporter.finished(record, records, search_progress(record), tracker.experiment_id)
    return record


def _log_model(record: SearchRecord, trial: TrialRecord, model_dir: Path, reporter: Reporter) -> None:
    """Log a Pareto trial's model in MLflow (registrable from the UI); a failure is reported, not raised."""
    try:
        log_trial_model(record, trial, model_dir)
    except Exception as exc:  # noqa: BLE001  the close-out must still rank, log and print the search
        reporter.say(
            f"{trial.name}'s model was not logged as an MLflow model ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            f"`slimtune export {record.name} --run {trial.run_id} --register MODEL` retries it"
        )


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row)) or ["trial"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot_front(record: SearchRecord, records: list[TrialRecord], path: Path) -> None:
    """Scatter of the first objective against each other one; the front is joined and labelled."""
    import matplotlib  # the plot is drawn once, at close-out: the Agg back end is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the back end is chosen

    baseline = record.baseline_metrics
    first, others = record.objectives[0], record.objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5.5 * len(others), 4.5), squeeze=False)
    for ax, other in zip(axes[0], others):
        xs = [r.metrics[other.metric] for r in records]
        ys = [r.metrics[first.metric] for r in records]
        ax.scatter(xs, ys, c="lightgray", edgecolors="gray", label="trials")
        front = sorted((r for r in records if r.rank == 0 and r.feasible), key=lambda r: r.metrics[other.metric])
        ax.plot([r.metrics[other.metric] for r in front], [r.metrics[first.metric] for r in front], "o-", c="tab:red", label="Pareto front")
        for r in front:
            ax.annotate(
                r.name.replace("trial_", "#"),
                (r.metrics[other.metric], r.metrics[first.metric]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if other.metric in baseline and first.metric in baseline:
            ax.scatter([baseline[other.metric]], [baseline[first.metric]], marker="*", s=200, c="tab:blue", label="baseline")
        ax.set_xlabel(f"{other.metric} ({other.direction})")
        ax.set_ylabel(f"{first.metric} ({first.direction})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record.name}: {len(records)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
