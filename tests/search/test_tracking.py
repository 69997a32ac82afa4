"""MLflow and Optuna writes that never hold a trial up: WAL stores, asynchronous epochs, batched final figures."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from search.results.tracking import SearchTracker, _create_mlflow_tables, create_sqlite_aside, sqlite_journal_mode


def test_both_sqlite_stores_run_in_wal_mode_new_or_existing(tmp_path: Path) -> None:
    """MLflow's and Optuna's databases are made in WAL mode; one made before (rollback journal) is switched."""
    from search.driver.runner import _create_optuna_tables

    for name, create in (("mlflow.db", _create_mlflow_tables), ("optuna.db", _create_optuna_tables)):
        create_sqlite_aside(f"sqlite:///{tmp_path / name}", create)
        assert sqlite_journal_mode(tmp_path / name) == "wal", name
    older = tmp_path / "older.db"
    sqlite3.connect(older).execute("create table t (x)").connection.close()
    assert sqlite_journal_mode(older) == "delete"
    create_sqlite_aside(f"sqlite:///{older}", _create_mlflow_tables)  # exists: not recreated, switched
    assert sqlite_journal_mode(older) == "wal"


def test_epochs_are_logged_asynchronously_and_in_mlflow_before_the_run_ends(tmp_path: Path, monkeypatch) -> None:
    tracker = SearchTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking", tmp_path)
    parent = tracker.start_parent("name: tracking\n", "tracking", {"accuracy": 0.9}, {"space": "tracking.yaml"})
    run_id = tracker.child_run(parent, "t0", [{"name": "kd", "params": {"temperature": 4}}], "trial_000")
    client = tracker.client
    calls = []
    for name in ("log_batch", "set_tag"):
        real = getattr(client, name)
        monkeypatch.setattr(
            client, name, lambda *a, real=real, name=name, **k: calls.append((name, threading.current_thread())) or real(*a, **k)
        )
    for epoch in (1, 2, 3):
        tracker.log_epoch("t0", run_id, {"val_accuracy": 0.5 + epoch / 10, "train_loss": 1.0 / epoch, "cpu_s": epoch}, step=epoch)
    tracker.finish_trial("t0", run_id, {"accuracy": 0.8, "macs": 100.0, "uncounted_ops": "add", "latency_form": "program"}, None)
    # Three epoch batches written off the caller's thread, then the final figures and text tags in one batch on it.
    assert [name for name, _ in calls] == ["log_batch"] * 4
    assert all(thread is not threading.current_thread() for _, thread in calls[:3]) and calls[3][1] is threading.current_thread()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, "val_accuracy")] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert (run.data.tags["uncounted_ops"], run.data.tags["latency_form"], run.data.metrics["accuracy"]) == ("add", "program", 0.8)


class _LostWrite:
    """An asynchronous write the driver queued and died before MLflow committed."""

    def wait(self) -> None:
        pass


def test_an_epoch_a_killed_driver_queued_reaches_mlflow_once_when_the_run_ends(tmp_path: Path, monkeypatch) -> None:
    """Epoch 3 was queued but never committed (SIGKILL), epoch 2 committed but never waited for: the
    resumed driver that ends the run writes epoch 3 and leaves epoch 2 alone."""
    from search.results import tracking

    killed = SearchTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking", tmp_path)
    parent = killed.start_parent("name: tracking\n", "tracking", {"accuracy": 0.9}, {"space": "tracking.yaml"})
    run_id = killed.child_run(parent, "t0", [{"name": "kd", "params": {"temperature": 4}}], "trial_000")
    for epoch in (1, 2):
        killed.log_epoch("t0", run_id, {"val_accuracy": 0.5 + epoch / 10, "train_loss": 1.0 / epoch}, step=epoch)
    real = killed.client.log_batch
    monkeypatch.setattr(killed.client, "log_batch", lambda *a, **k: _LostWrite())
    killed.log_epoch("t0", run_id, {"val_accuracy": 0.8, "train_loss": 1.0 / 3}, step=3)
    monkeypatch.setattr(killed.client, "log_batch", real)
    tracking._EPOCH_WRITER.submit(lambda: None).result()  # epochs 1 and 2 are committed (one writer, in order) ...
    tracking._PENDING.clear()  # ... and the driver dies: its handles go with it

    resumed = SearchTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking", tmp_path)
    resumed.log_epoch("t0", run_id, {"val_accuracy": 0.8, "train_loss": 1.0 / 3}, step=3)  # Tune replays it: skipped as logged
    resumed.finish_trial("t0", run_id, {"accuracy": 0.8}, None)
    history = resumed.client.get_metric_history(run_id, "val_accuracy")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert sorted(m.step for m in resumed.client.get_metric_history(run_id, "train_loss")) == [1, 2, 3]
    assert resumed.runs()["t0"]["unsettled"] == {}
