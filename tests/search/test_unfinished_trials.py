"""Trials without a result (failed, stopped early) are shown, with their reasons, by ``pareto`` and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from search.cli import main
from search.results.record import SearchRecord
from search.space.objectives import Constraint, Objective

REASONS = ["NonFiniteLossError: the loss became inf", "NonFiniteLossError: the loss became inf", "TrialTimeLimitError: over 60 s"]


def _stored_search(tmp_path: Path, completed: bool) -> SearchRecord:
    """A search as the driver leaves it: three failed trials, one stopped early, and one completed trial or none."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    record = SearchRecord(
        name="broken",
        folder=tmp_path / "results" / "broken",
        space_yaml="task: digits\nmodel: digits_cnn\n",
        space_path="broken.yaml",
        trials=5,
        objectives=(Objective("accuracy", "max"), Objective("macs", "min")),
        constraints=(Constraint("accuracy_drop", "<=", 0.1),),
        task_metrics=("accuracy", "accuracy_drop", "macs", "params"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        optuna_storage=storage,
        parent_run_id=None,
        baseline_metrics={"accuracy": 0.97, "macs": 600.0},
    )
    record.save()
    study = optuna.create_study(study_name="broken", storage=storage, directions=["maximize", "minimize"])
    runs = {}
    for number, reason in enumerate(REASONS):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"failure_reason": reason}))
        runs[f"t{number}"] = {"run_id": f"run{number}", "status": "FAILED", "name": f"trial_{number:03d}", "reason": reason}
    metrics = {"accuracy": 0.9, "macs": 100.0, "accuracy_drop": 0.07}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"metrics": metrics, "stopped_at_epoch": 1}))
    runs["t3"] = {"run_id": "run3", "status": "KILLED", "name": "trial_003"}
    if completed:
        study.add_trial(
            optuna.trial.create_trial(values=[0.95, 500.0], user_attrs={"metrics": metrics, "recipe": "[]", "tune_trial_id": "t4"})
        )
        runs["t4"] = {"run_id": "run4", "status": "FINISHED", "name": "trial_004"}
    (record.folder / "runs.json").write_text(json.dumps(runs))
    return record


@pytest.mark.parametrize("completed", [False, True])
def test_pareto_shows_failed_and_stopped_trials_with_their_reasons(capsys, tmp_path: Path, completed: bool) -> None:
    _stored_search(tmp_path, completed)
    assert main(["pareto", "broken", "--all", "--results-dir", str(tmp_path / "results")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"search 'broken': {int(completed)} completed trial")
    assert lines[1] == "3 failed trials: NonFiniteLossError: the loss became inf (2); TrialTimeLimitError: over 60 s (1)"
    assert lines[2].startswith("1 trial stopped early by the scheduler (budget.scheduler)")
    assert main(["pareto", "broken", "--json", "--results-dir", str(tmp_path / "results")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["unfinished"] == {
        "failed": 3,
        "failure_reasons": {"NonFiniteLossError: the loss became inf": 2, "TrialTimeLimitError: over 60 s": 1},
        "stopped": 1,
    }


def test_the_report_holds_failed_and_stopped_trials_with_their_reasons(capsys, tmp_path: Path) -> None:
    _stored_search(tmp_path, completed=False)
    out = tmp_path / "report.html"
    assert main(["report", "broken", "--out", str(out), "--results-dir", str(tmp_path / "results")]) == 0
    page = out.read_text()
    data = json.loads(
        re.search(r'<script type="application/json" id="slimtune-data">(.*?)</script>', page, flags=re.DOTALL)
        .group(1)
        .replace("<\\/", "</")
    )
    assert data["trials"] == []
    assert data["pareto"]["unfinished"] == {
        "failed": 3,
        "failure_reasons": {"NonFiniteLossError: the loss became inf": 2, "TrialTimeLimitError: over 60 s": 1},
        "stopped": 1,
    }
    # The page's header draws them from that block, and says what the hypervolume is relative to.
    assert "failed trial${U.failed === 1" in page and "stopped early by the scheduler" in page
    assert set(data["pareto"]["hypervolume_reference"]) == {"accuracy", "macs"}
    assert "(reference point ` +" in page and "P.hypervolume_reference" in page
