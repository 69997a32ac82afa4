"""MLflow records of a search, written from the driver only.

One parent run per search (the space, the baseline's metrics, the Pareto table and plot, the
hypervolume) and one child run per trial, created with an explicit parent id, holding the
trial's flattened parameters, per-epoch metrics, final metrics, its status (FAILED with the
reason; KILLED with the tag ``stopped_early`` when the scheduler stopped it) and the tags
``pareto_rank`` / ``is_pareto``. A map from Tune trial id to MLflow run id is
kept in the search's results folder so a resumed search (or a retried trial) writes to the same
child run: one child run per trial, never two.

Writes never hold a trial up: a trial's per-epoch metrics go to MLflow asynchronously (one batch
per epoch; the driver goes on while MLflow commits it, and waits for them only when the trial's
run ends), its final metrics and text figures in one batch, and both SQLite stores (MLflow's and
Optuna's) run in WAL mode, where a reader (``slimtune pareto``, the UI) never blocks the writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["SearchTracker", "EXPERIMENT_KIND_TAG", "flatten", "create_sqlite_aside", "sqlite_journal_mode"]

# MLflow 3 opens an experiment on its GenAI overview unless it is marked as model training.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def flatten(recipe: list[dict[str, Any]]) -> dict[str, str]:
    """``[{"name": "kd", "params": {"temperature": 4}}]`` -> ``{"kd.temperature": "4", "pipeline": "kd"}``."""
    out = {"pipeline": " -> ".join(step["name"] for step in recipe) or "(baseline)"}
    for step in recipe:
        for key, value in step.get("params", {}).items():
            out[f"{step['name']}.{key}"] = str(value)
    return out


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


#: Figures of a trial that are text, logged as tags (MLflow metrics are numbers).
_TEXT_METRICS = ("uncounted_ops", "latency_form", "latency_device", "quality")


# Bookkeeping fields Tune adds to every result; they are not the trial's metrics.
_TUNE_FIELDS = ("time_", "timestamp", "pid", "iterations_since", "training_iteration", "done", "trial_number", "final")


def _own_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in _numeric(metrics).items() if not k.startswith(_TUNE_FIELDS)}


def create_sqlite_aside(url: str, create: Callable[[str], None]) -> None:
    """Create a new SQLite database whole or not at all: ``create`` builds it aside, then it is moved into place.

    MLflow and Optuna create their tables one by one (MLflow by running migrations); a driver
    interrupted among them would leave a file that no later run can open ("table
    _alembic_tmp_... already exists"). Built under a temporary name, an interrupt leaves only
    that file, and the next run starts over. Other URLs are left alone. The database, new or
    existing, is put in WAL mode (:func:`sqlite_journal_mode`): called for MLflow's store when
    the tracker first connects and for Optuna's before the trials start.

    Args:
        url: ``sqlite:///path`` (anything else is left to its library).
        create: Called with the temporary file's ``sqlite:///`` URL; creates the tables there.
    """
    if not url.startswith("sqlite:///"):
        return
    db = Path(url[len("sqlite:///") :])
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = db.with_name(f".{db.name}.{os.getpid()}.creating")
        tmp.unlink(missing_ok=True)
        create(f"sqlite:///{tmp}")
        os.replace(tmp, db)
    if db.resolve() not in _WAL and sqlite_journal_mode(db, "wal") == "wal":
        _WAL.add(db.resolve())


def sqlite_journal_mode(db: Path, mode: str | None = None) -> str:
    """The journal mode of the SQLite file ``db``, after setting it to ``mode`` (None: as it is).

    WAL is kept in the file, so every later connection (MLflow's, Optuna's, a reader's) uses it:
    readers no longer block the writer, and a commit costs one append instead of a rollback
    journal written and deleted. A database another process holds locked keeps its mode.
    """
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as connection:
        try:
            if mode is not None:
                connection.execute(f"PRAGMA journal_mode={mode}")
        except sqlite3.OperationalError:  # locked by another process for longer than the timeout: its mode stays
            pass
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


def _create_mlflow_tables(url: str) -> None:
    from mlflow.tracking import MlflowClient  # MLflow takes 1.5 s to import; pareto and report read runs.json without it

    MlflowClient(tracking_uri=url).search_experiments(max_results=1)


#: Run id -> (epoch, future) of the run's epoch writes not yet waited for, in this process
#: (the driver makes a tracker per callback: ``SearchRecord.tracker``).
_PENDING: dict[str, list[Any]] = {}

#: The one thread that writes epochs, in order. Not MLflow's own asynchronous logging: ending a
#: run (``set_terminated``) shuts MLflow's queue down and starts it again, 0.3 s on the driver's
#: loop per trial.
_EPOCH_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimtune-mlflow-epochs")

#: SQLite files this process has put in WAL mode already.
_WAL: set[Path] = set()


class SearchTracker:
    """The MLflow side of one search.

    Args:
        tracking_uri: Where MLflow writes (``sqlite:///mlflow.db`` by default).
        experiment_name: The search's name; one MLflow experiment per search.
        results_dir: The search's folder, where the trial -> run map is kept.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, results_dir: Path) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.runs_file = Path(results_dir) / "runs.json"
        self._client = None
        self._experiment_id: str | None = None

    # The MLflow client is made on first use so the tracker pickles with Tune's experiment state.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient  # MLflow takes 1.5 s to import; pareto and report read runs.json without it

            create_sqlite_aside(self.tracking_uri, _create_mlflow_tables)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name,
                    artifact_location=self._artifact_location(),
                    tags={EXPERIMENT_KIND_TAG[0]: EXPERIMENT_KIND_TAG[1]},
                )
            else:
                self._experiment_id = experiment.experiment_id
                self.client.set_experiment_tag(self._experiment_id, *EXPERIMENT_KIND_TAG)
        return self._experiment_id

    def _artifact_location(self) -> str | None:
        """Beside a SQLite store (``mlruns/`` next to ``mlflow.db``); a server decides its own."""
        if self.tracking_uri.startswith("sqlite:///"):
            return str(Path(self.tracking_uri[len("sqlite:///") :]).parent / "mlruns")
        return None

    # -- trial map ------------------------------------------------------------------------------

    def runs(self) -> dict[str, dict[str, Any]]:
        """Tune trial id -> {"run_id", "status", "checkpoint", ...} for every trial seen so far."""
        if self.runs_file.is_file():
            return json.loads(self.runs_file.read_text())
        return {}

    def _update_run_record(self, trial_id: str, **fields: Any) -> None:
        runs = self.runs()
        runs.setdefault(trial_id, {}).update(fields)
        self._write_runs(runs)

    def _write_runs(self, runs: dict[str, dict[str, Any]]) -> None:
        """Replace the run map with ``runs`` in one rename: a reader sees the old map or the new one."""
        tmp = self.runs_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        tmp.replace(self.runs_file)

    # -- parent run -----------------------------------------------------------------------------

    def start_parent(self, space_yaml: str, space_name: str, baseline_metrics: dict[str, Any], params: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{self.experiment_name} (search)", tags={"slimtune.role": "search"})
        run_id = run.info.run_id
        self.client.log_text(run_id, space_yaml, f"space/{space_name}.yaml")
        self.log_params(run_id, params)
        self.client.log_batch(
            run_id, metrics=self._metric_entities({f"baseline.{k}": v for k, v in _numeric(baseline_metrics).items()}, step=0)
        )
        for key in _TEXT_METRICS:
            if key in baseline_metrics:
                self.client.set_tag(run_id, f"baseline.{key}", baseline_metrics[key] or "(none)")
        return run_id

    # -- child runs -----------------------------------------------------------------------------

    def child_run(self, parent_run_id: str, trial_id: str, recipe: list[dict[str, Any]], trial_name: str) -> str:
        """The child run of ``trial_id``: created once, found again on resume or retry."""
        record = self.runs().get(trial_id)
        if record and record.get("run_id"):
            return record["run_id"]
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial_name,
            tags={"mlflow.parentRunId": parent_run_id, "slimtune.trial_id": trial_id, "slimtune.role": "trial"},
        )
        self.log_params(run.info.run_id, flatten(recipe))
        self.client.log_text(run.info.run_id, json.dumps(recipe, indent=2), "recipe.json")
        self._update_run_record(trial_id, run_id=run.info.run_id, status="RUNNING", recipe=recipe, name=trial_name)
        return run.info.run_id

    def log_epoch(self, trial_id: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
        """Log one epoch of a trial; an epoch replayed after a restore is not logged twice.

        The epoch's figures also stay in the run map until the run ends (``unsettled``): a driver
        killed before MLflow committed the asynchronous write leaves them there, and the process
        that ends the run writes whichever of them MLflow lacks (:meth:`settle`).
        """
        runs = self.runs()
        record = runs.setdefault(trial_id, {})
        if step <= record.get("last_epoch", 0):
            return
        figures = _own_metrics(metrics)
        # Asynchronous: Tune's loop, and with it the trial's next report, does not wait for the commit.
        pending = _EPOCH_WRITER.submit(self.client.log_batch, run_id, metrics=self._metric_entities(figures, step=step))
        _PENDING.setdefault(run_id, []).append((step, pending))
        record.update(last_epoch=step, unsettled={**record.get("unsettled", {}), str(step): figures})
        self._write_runs(runs)

    def settle(self, trial_id: str, run_id: str) -> None:
        """Make MLflow hold every epoch of ``trial_id`` logged so far, each once.

        Called before a trial's run ends (finished, stopped or failed), so that its epochs are in
        MLflow before its status says it ended. This process's asynchronous writes are waited for;
        epochs an earlier (killed) driver queued are looked up in MLflow and written if missing.
        """
        queued_here = set()
        for step, pending in _PENDING.pop(run_id, []):
            pending.result()
            queued_here.add(step)
        unsettled = self.runs().get(trial_id, {}).get("unsettled", {})
        orphans = {int(step): figures for step, figures in unsettled.items() if int(step) not in queued_here and figures}
        if orphans:
            key = next(iter(next(iter(orphans.values()))))  # every epoch's batch holds the same keys, committed together
            committed = {m.step for m in self.client.get_metric_history(run_id, key)}
            for step in sorted(set(orphans) - committed):
                self.client.log_batch(run_id, metrics=self._metric_entities(orphans[step], step=step))
        if unsettled:
            self._update_run_record(trial_id, unsettled={})

    def finish_trial(self, trial_id: str, run_id: str, metrics: dict[str, Any], checkpoint: str | None) -> None:
        from mlflow.entities import RunTag  # MLflow takes 1.5 s to import; pareto and report read runs.json without it

        if self.runs().get(trial_id, {}).get("status") == "FINISHED":
            return  # a resumed search replayed the end of a trial that was already recorded
        self.settle(trial_id, run_id)
        final = {k: v for k, v in _own_metrics(metrics).items() if k not in ("epoch", "stage")}
        tags = [RunTag(key, str(metrics[key] or "(none)")) for key in _TEXT_METRICS if metrics.get(key) is not None]
        self.client.log_batch(run_id, metrics=self._metric_entities(final, step=0), tags=tags)
        self.client.set_terminated(run_id, status="FINISHED")
        self._update_run_record(trial_id, status="FINISHED", checkpoint=checkpoint, metrics=final)

    def note_node(self, trial_id: str, run_id: str, node_id: str, pid: int | None = None) -> None:
        """Remember each Ray node the trial ran on (tag ``nodes``; a retried trial may show two)
        and the worker process running it now."""
        record = self.runs().get(trial_id, {})
        nodes = record.get("nodes", [])
        if node_id in nodes and record.get("pid") == pid:
            return
        if node_id not in nodes:
            nodes = [*nodes, node_id]
            self.client.set_tag(run_id, "nodes", ",".join(nodes))
        self._update_run_record(trial_id, nodes=nodes, pid=pid)

    def restore_ended_runs(self) -> list[str]:
        """Give each trial run the run map has ended its status back where MLflow holds another; return their ids.

        Logging a trial's model reopens its run (``mlflow.start_run``) and ends it again after; a
        driver killed in between leaves the run RUNNING, and one stopped by Ctrl-C there leaves it
        FAILED (MLflow's ``start_run`` block ends a run on an exception as failed). The run map's
        ended statuses are final (each is written after MLflow's, once the study has the trial's
        outcome): FINISHED, FAILED, and KILLED for a trial stopped early.
        """
        statuses = {"FINISHED": "FINISHED", "FAILED": "FAILED", "STOPPED_EARLY": "KILLED"}
        ended = {record["run_id"]: statuses[record["status"]] for record in self.runs().values() if record.get("status") in statuses}
        if not ended:
            return []
        runs = self.client.search_runs([self.experiment_id], filter_string="tags.`slimtune.role` = 'trial'", max_results=50000)
        changed = [run.info.run_id for run in runs if run.info.run_id in ended and run.info.status != ended[run.info.run_id]]
        for run_id in changed:
            self.client.set_terminated(run_id, status=ended[run_id])
        return changed

    def open_trial_runs(self) -> list[tuple[str, str, str]]:
        """``(run id, Tune trial id, trial name)`` of every trial run MLflow still holds as RUNNING.

        Read from MLflow itself: a driver killed between creating a run and writing the run map
        leaves a run the map does not know.
        """
        runs = self.client.search_runs(
            [self.experiment_id], filter_string="tags.`slimtune.role` = 'trial' and attributes.status = 'RUNNING'", max_results=50000
        )
        return [(r.info.run_id, r.data.tags.get("slimtune.trial_id", ""), r.info.run_name) for r in runs]

    def stop_trial_early(self, trial_id: str, run_id: str, epoch: int) -> None:
        """The early-stopping scheduler stopped the trial after ``epoch`` epochs.

        The run ends KILLED with the tags ``stopped_early=true`` and ``stopped_at_epoch``; its
        per-epoch metrics are already logged, and it has no final metrics.
        """
        if self.runs().get(trial_id, {}).get("status") == "STOPPED_EARLY":
            return
        self.settle(trial_id, run_id)
        self.client.set_tag(run_id, "stopped_early", "true")
        self.client.set_tag(run_id, "stopped_at_epoch", str(epoch))
        self.client.set_terminated(run_id, status="KILLED")
        self._update_run_record(trial_id, status="STOPPED_EARLY", stopped_at_epoch=epoch)

    def fail_trial(self, trial_id: str, run_id: str, reason: str) -> None:
        self.settle(trial_id, run_id)
        self.client.set_tag(run_id, "failure_reason", reason[:4000])
        self.client.set_terminated(run_id, status="FAILED")
        self._update_run_record(trial_id, status="FAILED", reason=reason)

    # -- helpers --------------------------------------------------------------------------------

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param  # MLflow takes 1.5 s to import; pareto and report read runs.json without it

        existing = self.client.get_run(run_id).data.params
        entities = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        if entities:
            self.client.log_batch(run_id, params=entities)

    @staticmethod
    def _metric_entities(metrics: dict[str, float], step: int):
        from mlflow.entities import Metric  # MLflow takes 1.5 s to import; pareto and report read runs.json without it

        now = int(time.time() * 1000)
        return [Metric(key, value, now, step) for key, value in metrics.items()]
