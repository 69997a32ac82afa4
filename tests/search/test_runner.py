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
