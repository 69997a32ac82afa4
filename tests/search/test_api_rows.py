"""``SearchResult``'s rows are ``slimtune pareto``'s: one table, one ranking, with what the API adds."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from search import api
from search.cli import main
from search.results.record import SearchRecord
from search.space.objectives import Constraint, Objective

ROOT = Path(__file__).resolve().parents[2]

# (accuracy max, macs min; accuracy_drop <= 0.1): trials 0 and 4 are the front; trial 1 would be on it
# but scores what guessing scores (flagged "at chance"), trial 2 is dominated by trial 0, trial 3
# breaks the constraint.
TRIALS = [
    {"accuracy": 0.95, "macs": 500.0, "accuracy_drop": 0.02, "params": 900.0},
    {"accuracy": 0.90, "macs": 100.0, "accuracy_drop": 0.07, "params": 200.0, "at_chance": 1.0},
    {"accuracy": 0.94, "macs": 600.0, "accuracy_drop": 0.03, "params": 950.0},
    {"accuracy": 0.50, "macs": 10.0, "accuracy_drop": 0.47},
    {"accuracy": 0.92, "macs": 300.0, "accuracy_drop": 0.05, "params": 500.0},
]


def _stored_search(tmp_path: Path) -> SearchRecord:
    """A finished search's folder as the driver leaves it: manifest, run map and study."""
    record = SearchRecord(
        name="rows", folder=tmp_path / "results" / "rows", space_yaml=(ROOT / "spaces" / "quickstart.yaml").read_text(), space_path="quickstart.yaml", trials=5,
        objectives=(Objective("accuracy", "max"), Objective("macs", "min")), constraints=(Constraint("accuracy_drop", "<=", 0.1),),
        task_metrics=("accuracy", "accuracy_drop", "macs", "params"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        optuna_storage=f"sqlite:///{tmp_path}/optuna.db", parent_run_id="parent", baseline_metrics={"accuracy": 0.97, "macs": 600.0},
    )  # fmt: skip
    record.save()
    study = optuna.create_study(study_name="rows", storage=record.optuna_storage, directions=["maximize", "minimize"])
    for number, metrics in enumerate(TRIALS):
        study.add_trial(
            optuna.trial.create_trial(
                values=[metrics["accuracy"], metrics["macs"]],
                user_attrs={
                    "metrics": metrics,
                    "recipe": json.dumps([{"name": "kd", "params": {"weight": number}}]),
                    "tune_trial_id": f"t{number}",
                },
                constraints={"accuracy_drop <= 0.1": metrics["accuracy_drop"] - 0.1},
            )
        )
    runs = {f"t{n}": {"run_id": f"run{n}", "status": "FINISHED", "name": f"trial_{n:03d}"} for n in range(len(TRIALS))}
    (record.folder / "runs.json").write_text(json.dumps(runs))
    return record


def test_the_api_rows_are_the_pareto_json_rows_in_its_order(tmp_path: Path, capsys) -> None:
    results = str(_stored_search(tmp_path).folder.parent)
    assert main(["pareto", "rows", "--json", "--results-dir", results]) == 0
    front = json.loads(capsys.readouterr().out)["trials"]
    assert main(["pareto", "rows", "--json", "--all", "--results-dir", results]) == 0
    every = json.loads(capsys.readouterr().out)["trials"]

    result = api.load("rows", results)
    assert [row["trial"] for row in result.front] == [row["trial"] for row in front] == ["trial_000", "trial_004"]
    assert [row["trial"] for row in result.rows] == [row["trial"] for row in every] and len(every) == 5
    for table_row, row in zip(every, result.rows):
        assert {key: row[key] for key in table_row} == table_row  # every key pareto prints, with its value
        assert row["mlflow_run_id"] == table_row["run_id"] and row["recipe"][0]["params"]["weight"] == int(row["trial"][-1])
        assert row["metrics"] == TRIALS[int(row["trial"][-1])]
    quality = {row["trial"]: row.get("quality") for row in result.rows}
    assert quality == {"trial_000": None, "trial_001": "at chance", "trial_002": None, "trial_003": None, "trial_004": None}
    assert [r.name for r in result.trials] == [row["trial"] for row in every]
