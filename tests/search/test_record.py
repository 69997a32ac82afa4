"""A search's record and ranking read without torch, Ray or any method: ``slimtune pareto`` stays light."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from search.results.record import INTERRUPTED, SearchRecord, completed_records, load_search, search_progress
from search.space.objectives import Constraint, Objective

ROOT = Path(__file__).resolve().parents[2]

#: Modules `slimtune pareto` must not import (each costs seconds, or pulls in the others).
HEAVY = ("torch", "torchvision", "torch_pruning", "ray", "methods", "models", "tasks")

# (accuracy max, macs min); constraint accuracy_drop <= 0.1. Trial 2 is dominated by trial 0,
# trial 3 breaks the constraint; trial 4 failed; trial 5 was lost to an interrupt.
TRIALS = [
    {"accuracy": 0.95, "macs": 500.0, "accuracy_drop": 0.02},
    {"accuracy": 0.90, "macs": 100.0, "accuracy_drop": 0.07},
    {"accuracy": 0.94, "macs": 600.0, "accuracy_drop": 0.03},
    {"accuracy": 0.50, "macs": 10.0, "accuracy_drop": 0.47},
]


@pytest.fixture
def stored_search(tmp_path: Path) -> SearchRecord:
    """A search folder as the driver leaves it: manifest, run map and a study of six trials."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    record = SearchRecord(
        name="light",
        folder=tmp_path / "results" / "light",
        space_yaml="(not parsed by pareto)",
        space_path="light.yaml",
        trials=6,
        objectives=(Objective("accuracy", "max"), Objective("macs", "min")),
        constraints=(Constraint("accuracy_drop", "<=", 0.1),),
        task_metrics=("accuracy", "accuracy_drop", "macs", "params"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        optuna_storage=storage,
        parent_run_id="parent",
        baseline_metrics={"accuracy": 0.97, "macs": 600.0},
    )
    record.save()
    study = optuna.create_study(study_name="light", storage=storage, directions=["maximize", "minimize"])
    runs = {}
    for number, metrics in enumerate(TRIALS):
        trial = optuna.trial.create_trial(
            values=[metrics["accuracy"], metrics["macs"]],
            user_attrs={
                "metrics": metrics,
                "recipe": json.dumps([{"name": "kd", "params": {"weight": number}}]),
                "tune_trial_id": f"t{number}",
            },
            constraints={"accuracy_drop <= 0.1": metrics["accuracy_drop"] - 0.1},
        )
        study.add_trial(trial)
        runs[f"t{number}"] = {"run_id": f"run{number}", "status": "FINISHED", "name": f"trial_{number:03d}"}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    runs["t4"] = {"run_id": "run4", "status": "FAILED", "name": "trial_004", "reason": "NonFiniteLossError: loss became inf"}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"failure_reason": INTERRUPTED}))
    runs["t5"] = {"run_id": "run5", "status": "FAILED", "name": "trial_005", "reason": INTERRUPTED}
    (record.folder / "runs.json").write_text(json.dumps(runs))
    return record


def test_manifest_round_trip_and_progress(stored_search: SearchRecord) -> None:
    loaded = load_search("light", stored_search.folder.parent)
    assert loaded.objectives == stored_search.objectives and loaded.constraints == stored_search.constraints
    assert loaded.task_metrics == stored_search.task_metrics and loaded.trials == 6
    assert [r.number for r in completed_records(loaded)] == [0, 1, 2, 3]
    progress = search_progress(loaded)
    # The lost trial does not count: its slot went to another trial.
    assert (progress.completed, progress.failed, progress.done, progress.finished) == (4, 1, 5, False)
    assert progress.common_failure() == "NonFiniteLossError: loss became inf (1 of 1 failed trials)"


def test_pareto_imports_neither_torch_nor_ray_and_matches_optuna(stored_search: SearchRecord) -> None:
    script = (
        "import json, sys\n"
        "from search.cli import main\n"
        f"code = main(['pareto', 'light', '--json', '--all', '--results-dir', {str(stored_search.folder.parent)!r}])\n"
        f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    table_text, status_text = out.rsplit("\n{", 1)
    status = json.loads("{" + status_text)
    assert status == {"code": 0, "heavy": []}, status
    rows = json.loads(table_text)["trials"]
    assert [(row["trial"], row["rank"], row["feasible"]) for row in rows] == [
        ("trial_000", 0, True),
        ("trial_001", 0, True),
        ("trial_002", 1, True),
        ("trial_003", 2, False),
    ]
    study = optuna.load_study(study_name="light", storage=stored_search.optuna_storage)
    assert sorted(t.number for t in study.best_trials) == [int(row["trial"][-3:]) for row in rows if row["rank"] == 0]


def test_the_manifest_holds_the_resolved_space_read_alike_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    import torch

    from search.space.spec import load_space

    started, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (started / "data").mkdir(parents=True)
    elsewhere.mkdir()
    torch.save({}, started / "base.pt")
    (started / "space.yaml").write_text(
        "task: {name: cifar10, options: {root: data}}\nmodel: resnet20\nbaseline: {checkpoint: base.pt}\n"
        "methods: {l1_filter: {}}\nobjectives: {accuracy: max, macs: min}\n"
        "output: {optuna_storage: 'sqlite:///optuna.db', checkpoint_storage: tune_store}\n"
    )
    monkeypatch.chdir(started)
    space = load_space("space.yaml")
    record = SearchRecord.from_space("moved", tmp_path / "results" / "moved", space, "sqlite:///x.db", space.optuna_storage)
    record.save()
    monkeypatch.chdir(elsewhere)
    loaded = load_search("moved", tmp_path / "results").space
    assert loaded.baseline_checkpoint == str(started / "base.pt")
    assert loaded.task_options == {"root": str(started / "data")}
    assert (loaded.optuna_storage, loaded.checkpoint_storage) == (f"sqlite:///{started}/optuna.db", str(started / "tune_store"))
    assert loaded.path == str(started / "space.yaml") and loaded.methods == space.methods
    stored = yaml.safe_load(json.loads(record.manifest.read_text())["space_yaml"])
    assert stored["baseline"]["checkpoint"] == str(started / "base.pt") and stored["task"]["options"]["root"] == str(started / "data")


def test_a_front_that_beats_the_baseline_somewhere_never_has_hypervolume_0(tmp_path: Path) -> None:
    """sr_quickstart's case: an 8-bit trial beats the baseline on PSNR and size but is slower than 1.1 x its latency."""
    from search.results.ranking import describe_reference, hypervolume_history, hypervolume_reference, rank_records, search_hypervolume
    from search.results.record import TrialRecord

    record = SearchRecord(
        name="sr", folder=tmp_path / "sr", space_yaml="", space_path="sr.yaml", trials=2,
        objectives=(Objective("psnr", "max"), Objective("size_bytes", "min"), Objective("latency_ms", "min")), constraints=(),
        task_metrics=("psnr", "size_bytes", "latency_ms"), tracking_uri="sqlite:///unused.db", optuna_storage="sqlite:///unused.db",
        baseline_metrics={"psnr": 30.0, "size_bytes": 100_000.0, "latency_ms": 2.0},
    )  # fmt: skip
    eight_bit = TrialRecord(0, "t0", None, [], {"psnr": 30.5, "size_bytes": 30_000.0, "latency_ms": 5.0}, None, completed_at=1.0)
    records = [eight_bit]
    rank_records(record, records)
    reference = hypervolume_reference(record, records)
    # Latency's reference moves past the trial by a tenth of the baseline's (5 + 0.2); the others are the baseline's.
    assert reference == pytest.approx({"psnr": 0.0, "size_bytes": 110_000.0, "latency_ms": 5.2})
    # Normalised by the baseline: psnr 30.5/30 over 0, size 0.3 under 1.1, latency 2.5 under 2.6.
    assert search_hypervolume(record, records) == pytest.approx((30.5 / 30) * (1.1 - 0.3) * (2.6 - 2.5))
    assert (
        describe_reference(reference)
        == "reference point psnr 0, size_bytes 1.1e+05, latency_ms 5.2, each objective divided by the baseline's"
    )
    # A front inside the baseline's box keeps the baseline's reference point.
    fast = TrialRecord(1, "t1", None, [], {"psnr": 29.0, "size_bytes": 50_000.0, "latency_ms": 1.0}, None, completed_at=2.0)
    rank_records(record, [fast])
    assert hypervolume_reference(record, [fast]) == pytest.approx({"psnr": 0.0, "size_bytes": 110_000.0, "latency_ms": 2.2})
    # The history uses the whole search's reference point: it never falls and ends at the search's figure.
    both = [dataclasses.replace(eight_bit), dataclasses.replace(fast)]
    history = [h["hypervolume"] for h in hypervolume_history(record, both)]
    rank_records(record, both)
    assert 0 < history[0] <= history[1] == pytest.approx(search_hypervolume(record, both))


def test_the_optuna_storage_schema_is_checked_once_per_url_and_process(tmp_path: Path) -> None:
    """Optuna checks a storage's schema with alembic each time one is made (0.35 s); a search opens its
    study many times: the first storage of a URL checks it, later ones do not."""
    import shutil
    import sqlite3

    from search.results.record import open_optuna_storage

    url = f"sqlite:///{tmp_path}/checked.db"
    open_optuna_storage(url).engine.dispose()
    with sqlite3.connect(tmp_path / "checked.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'from-another-optuna'")
    shutil.copy(tmp_path / "checked.db", tmp_path / "unchecked.db")
    open_optuna_storage(url).engine.dispose()  # checked already in this process
    with pytest.raises(RuntimeError, match="no longer compatible with the table schema"):
        open_optuna_storage(f"sqlite:///{tmp_path}/unchecked.db")
