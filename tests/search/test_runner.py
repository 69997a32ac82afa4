"""Pieces of the driver that need no Ray: the Optuna storage it creates."""

from __future__ import annotations

from pathlib import Path

import optuna

from search.runner import create_sqlite_storage


def test_sqlite_storage_is_created_whole_and_existing_files_are_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'deep' / 'optuna.db'}"
    create_sqlite_storage(url)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["optuna.db"]  # no partial file left
    optuna.create_study(study_name="kept", storage=url)
    create_sqlite_storage(url)  # an existing storage is left as it is
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["kept"]


def test_other_storages_are_left_to_optuna(tmp_path: Path) -> None:
    create_sqlite_storage("postgresql://user@127.0.0.1/optuna")
    assert list(tmp_path.iterdir()) == []
