"""The SQLite stores a search creates (Optuna's and MLflow's) are created whole or not at all."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.driver.runner import _create_optuna_tables
from search.results.tracking import create_sqlite_aside


def test_optuna_storage_is_created_whole_and_existing_files_are_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'deep' / 'optuna.db'}"
    create_sqlite_aside(url, _create_optuna_tables)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["optuna.db"]  # no temporary file left
    optuna.create_study(study_name="kept", storage=url)
    create_sqlite_aside(url, _create_optuna_tables)  # an existing storage is left as it is
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["kept"]


def test_an_interrupted_creation_leaves_no_database(tmp_path: Path) -> None:
    def interrupted(url: str) -> None:
        Path(url[len("sqlite:///") :]).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_sqlite_aside(f"sqlite:///{tmp_path / 'optuna.db'}", interrupted)
    assert not (tmp_path / "optuna.db").exists()


def test_other_storages_are_left_to_their_library(tmp_path: Path) -> None:
    create_sqlite_aside("postgresql://user@127.0.0.1/optuna", _create_optuna_tables)
    assert list(tmp_path.iterdir()) == []


def test_a_new_search_does_not_take_the_study_of_another_results_folder(tmp_path, monkeypatch) -> None:
    """Two results folders share one MLflow store, and so the Optuna store beside it. Seen while
    timing the quickstart: a search named as one of the other folder's "finished" at once, with
    that search's trials and no MLflow run of its own. An explicit name is refused; a default
    name moves on to the next free one."""
    import optuna

    from errors import UserError
    from search.driver import runner

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    optuna.create_study(study_name="quickstart", storage=f"sqlite:///{tmp_path}/optuna.db")
    space = Path(__file__).resolve().parents[2] / "spaces" / "quickstart.yaml"
    started = []

    def drive(record, reporter, address, restore, preflight) -> None:
        preflight.close()
        started.append(record.name)

    monkeypatch.setattr(runner, "_drive", drive)
    with pytest.raises(
        UserError,
        match=r"^a search named 'quickstart' is already recorded in the Optuna store sqlite:///.*optuna.db, by a results folder other than",
    ):
        runner.run_search(space, name="quickstart", results_dir=tmp_path / "other", tracking_uri=tracking, log=lambda line: None)
    assert started == []
    runner.run_search(space, results_dir=tmp_path / "other", tracking_uri=tracking, log=lambda line: None)
    assert started == ["quickstart-2"]
