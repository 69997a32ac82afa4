"""What a finished search prints and picks: MLflow addresses, ``--pick`` by any metric's name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from errors import UserError
from search.results.ranking import pick_record, rank_records
from search.results.record import SearchRecord, TrialRecord, completed_records, search_progress
from search.results.report import UI_PORT, Reporter, mlflow_ui
from search.space.objectives import Objective
from tests.search.test_unfinished_trials import _stored_search


def _two_view_search(tmp_path: Path) -> tuple[SearchRecord, list[TrialRecord]]:
    record = dataclasses.replace(
        _stored_search(tmp_path, completed=False),
        objectives=(Objective("rank1", "max"), Objective("mAP", "max"), Objective("macs", "min")),
        constraints=(),
        task_metrics=("rank1", "mAP", "macs"),
    )
    points = [(0.9, 0.5, 300.0), (0.7, 0.8, 200.0), (0.6, 0.6, 100.0)]
    records = [
        TrialRecord(number=n, trial_id=f"t{n}", run_id=f"run{n}", recipe=[], metrics={"rank1": r, "mAP": m, "macs": c}, checkpoint=None)
        for n, (r, m, c) in enumerate(points)
    ]
    rank_records(record, records)
    return record, records


@pytest.mark.parametrize(("pick", "trial"), [("max-rank1", 0), ("max-mAP", 1), ("min-macs", 2)])
def test_pick_takes_metric_names_with_capitals_and_digits(tmp_path: Path, pick: str, trial: int) -> None:
    record, records = _two_view_search(tmp_path)
    assert pick_record(record, records, pick).number == trial


def test_pick_of_an_unknown_metric_or_form_is_refused(tmp_path: Path) -> None:
    record, records = _two_view_search(tmp_path)
    with pytest.raises(UserError, match="--pick max-map: no metric 'map'"):
        pick_record(record, records, "max-map")
    with pytest.raises(UserError, match=r"--pick must be knee, max-<metric> \(e.g. max-accuracy\) or min-<metric>"):
        pick_record(record, records, "largest-rank1")


def test_mlflow_ui_of_a_server_is_the_server_and_of_a_database_the_make_ui_port() -> None:
    assert mlflow_ui("https://mlflow.example.org:8443/") == ("https://mlflow.example.org:8443", None)
    assert mlflow_ui("http://10.0.0.5:8080") == ("http://10.0.0.5:8080", None)
    ui, start = mlflow_ui("sqlite:////data/mlflow.db")
    assert ui == f"http://127.0.0.1:{UI_PORT}"
    assert start == f"mlflow ui --backend-store-uri sqlite:////data/mlflow.db --host 127.0.0.1 --port {UI_PORT}"
    # The port `make ui` serves the UI on.
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert f"mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port {UI_PORT}" in makefile


@pytest.mark.parametrize("server", [False, True])
def test_a_finished_search_links_to_the_ui_that_shows_its_store(tmp_path: Path, server: bool) -> None:
    record = _stored_search(tmp_path, completed=True)
    if server:
        record = dataclasses.replace(record, tracking_uri="http://mlflow.internal:8080")
    records = completed_records(record)
    rank_records(record, records)
    lines: list[str] = []
    Reporter(log=lines.append).finished(record, records, search_progress(record), experiment_id="7")
    browse = [line for line in "\n".join(lines).splitlines() if "Browse:" in line or "then open" in line]
    if server:
        assert browse == ["Browse: http://mlflow.internal:8080/#/experiments/7?workflowType=machine_learning"]
    else:
        assert browse == [
            f"Browse: mlflow ui --backend-store-uri {record.tracking_uri} --host 127.0.0.1 --port {UI_PORT}",
            f"        then open http://127.0.0.1:{UI_PORT}/#/experiments/7?workflowType=machine_learning",
        ]
    # The trials without a result are listed after the summary.
    assert any(line.startswith("[slimtune] 3 failed trials: NonFiniteLossError: the loss became inf (2)") for line in lines), lines
