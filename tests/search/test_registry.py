"""Handing a finished search off: its Pareto models in MLflow and the Model Registry, and its HTML report.

One stored search (no Ray, no training): three digits trials with tiny exported models, real
MLflow runs in a SQLite store, closed out by the driver's own ``finish_search``.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from deploy import export_model, load_program
from search.results.ranking import hypervolume_history, rank_records, search_hypervolume
from search.results.record import SearchRecord, TrialRecord, completed_records, exported_model_dir
from search.space.objectives import Objective

ROOT = Path(__file__).resolve().parents[2]
BASELINE = {"accuracy": 0.97, "macs": 600.0, "params": 24000.0}
# (accuracy max, macs min): trials 0 and 1 are the front (0 the knee: lowest index of a tie),
# trial 2 is dominated by trial 0. Trial 2 completes first, trial 0 last.
TRIALS = [
    ({"accuracy": 0.95, "accuracy_drop": 0.02, "macs": 500.0, "params": 9000.0}, 3),
    ({"accuracy": 0.90, "accuracy_drop": 0.07, "macs": 100.0, "params": 2000.0}, 1),
    ({"accuracy": 0.80, "accuracy_drop": 0.17, "macs": 600.0, "params": 9500.0}, 2),
]
COMPLETED_AT = [30.0, 20.0, 10.0]


def _tiny(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(), nn.Linear(width * 36, 10)).eval()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The search's record, its three models and the folder it lives in, after ``finish_search``."""
    tmp = tmp_path_factory.mktemp("registry")
    record, models = _stored_search(tmp)
    return record, models, tmp


def _stored_search(tmp: Path) -> tuple[SearchRecord, list[nn.Module]]:
    """A search of three stored trials in ``tmp``, closed out by ``finish_search``."""
    from search.driver.runner import finish_search
    from search.results.report import Reporter

    space_yaml = (ROOT / "spaces" / "quickstart.yaml").read_text().replace("  size_bytes: min\n", "")  # objectives: accuracy, macs
    record = SearchRecord(
        name="handoff", folder=tmp / "results" / "handoff", space_yaml=space_yaml, space_path="quickstart.yaml", trials=3,
        objectives=(Objective("accuracy", "max"), Objective("macs", "min")), constraints=(),
        task_metrics=("accuracy", "accuracy_drop", "macs", "params"), tracking_uri=f"sqlite:///{tmp}/mlflow.db",
        optuna_storage=f"sqlite:///{tmp}/optuna.db", baseline_metrics=BASELINE,
    )  # fmt: skip
    record.folder.mkdir(parents=True)
    tracker = record.tracker()
    record.parent_run_id = tracker.start_parent(space_yaml, "quickstart", BASELINE, {"space": "quickstart"})
    record.save()
    study = optuna.create_study(study_name="handoff", storage=record.optuna_storage, directions=["maximize", "minimize"])
    models = []
    for number, (metrics, width) in enumerate(TRIALS):
        model = _tiny(width, number)
        models.append(model)
        recipe = [{"name": "l1_filter", "params": {"ratio": 0.1 * (number + 1)}}]
        checkpoint = tmp / f"checkpoint_{number}"
        export_model(model, torch.zeros(1, 1, 8, 8), checkpoint / "model", {"pipeline": recipe, "metrics": metrics})
        run_id = tracker.child_run(record.parent_run_id, f"t{number}", recipe, f"trial_{number:03d}")
        tracker.finish_trial(f"t{number}", run_id, metrics, str(checkpoint))
        trial = optuna.trial.create_trial(
            values=[metrics["accuracy"], metrics["macs"]],
            user_attrs={"metrics": metrics, "recipe": json.dumps(recipe), "tune_trial_id": f"t{number}"},
        )
        trial.datetime_complete = datetime.datetime.fromtimestamp(1.7e9 + COMPLETED_AT[number])
        study.add_trial(trial)
    finish_search(record, Reporter(log=lambda line: None))
    return record, models


def _logged_models(record: SearchRecord, name: str = "program") -> dict[str, int]:
    """Trial run id -> how many logged models called ``name`` its run has."""
    tracker = record.tracker()
    counts: dict[str, int] = {}
    for model in tracker.client.search_logged_models([tracker.experiment_id], filter_string=f"name = '{name}'"):
        counts[model.source_run_id] = counts.get(model.source_run_id, 0) + 1
    return counts


def test_finish_search_logs_each_pareto_model_once_with_example_and_signature(finished) -> None:
    from mlflow.models import Model

    record, _, _ = finished
    runs = {r.name: r.run_id for r in completed_records(record)}
    assert _logged_models(record) == {runs["trial_000"]: 1, runs["trial_001"]: 1}
    tracker = record.tracker()
    logged = {m.source_run_id: m for m in tracker.client.search_logged_models([tracker.experiment_id])}
    model = Model.load(logged[runs["trial_001"]].artifact_location)
    assert model.signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 1, 8, 8)}}]
    assert model.saved_input_example_info["type"] == "ndarray"
    assert (Path(logged[runs["trial_001"]].artifact_location) / "data" / "model.pt2").is_file()  # torch.export, no pickle


def test_export_register_sets_the_pick_alias_and_the_registered_model_matches_the_export(finished, capsys) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from search.cli import main

    record, models, tmp = finished
    results = str(record.folder.parent)
    out = tmp / "knee"
    assert main(["export", "handoff", "--pick", "knee", "--register", "digits-small", "--out", str(out), "--results-dir", results]) == 0
    assert "registered as digits-small version 1 with alias @knee" in capsys.readouterr().out
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(record.tracking_uri)
    try:
        loaded = mlflow.pytorch.load_model("models:/digits-small@knee")
    finally:
        mlflow.set_tracking_uri(previous)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(x) - load_program(out)(x)).abs().max().item() <= 1e-6
        assert (loaded(x) - models[0](x)).abs().max().item() <= 1e-5  # the knee is trial 0
    client = MlflowClient(tracking_uri=record.tracking_uri)
    version = client.get_model_version_by_alias("digits-small", "knee")
    assert (str(version.version), version.tags["slimtune.trial"], version.tags["slimtune.pick"]) == ("1", "trial_000", "knee")

    # The knee's model was logged by finish_search and is not logged again (nor by a resumed search's).
    assert sum(_logged_models(record).values()) == 2
    # Its ONNX model, which the trial did not write (program runtime) and export did, is logged now beside it.
    knee_run = next(r.run_id for r in completed_records(record) if r.number == 0)
    assert _logged_models(record, "onnx") == {knee_run: 1}
    onnx_model = next(
        m for m in client.search_logged_models([record.tracker().experiment_id], filter_string="name = 'onnx'")
    )  # fmt: skip
    mlflow.set_tracking_uri(record.tracking_uri)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{onnx_model.model_id}")  # runs in ONNX Runtime
    finally:
        mlflow.set_tracking_uri(previous)
    (predicted,) = served.predict(x.numpy()).values()  # one array per output of the ONNX graph
    assert abs(predicted - load_program(out)(x).detach().numpy()).max() <= 1e-4
    # By run id: trial 2 is not on the front, so its model is logged now; no alias is set.
    run_2 = next(r.run_id for r in completed_records(record) if r.number == 2)
    assert (
        main(["export", "handoff", "--run", run_2[:8], "--register", "digits-small", "--out", str(tmp / "run"), "--results-dir", results])
        == 0
    )
    assert "version 2 (no alias: picked by --run)" in capsys.readouterr().out
    assert _logged_models(record)[run_2] == 1 and sum(_logged_models(record).values()) == 3
    assert _logged_models(record, "onnx")[run_2] == 1  # logged with its program
    assert {k: str(v) for k, v in client.get_registered_model("digits-small").aliases.items()} == {"knee": "1"}
    assert client.get_model_version("digits-small", "2").tags["slimtune.trial"] == "trial_002"


def test_register_trial_searches_the_run_s_logged_models_once(finished, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from search.results.registry import register_trial

    record, _, tmp = finished
    trial = next(r for r in completed_records(record) if r.number == 1)  # a front trial: its program is logged already
    searches = []
    search = MlflowClient.search_logged_models

    def counted(self, *args, **kwargs):
        searches.append(kwargs.get("filter_string"))
        return search(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_logged_models", counted)
    version = register_trial(record, trial, tmp / "checkpoint_1" / "model", "searched-once", None)
    assert len(searches) == 1, searches
    assert version.run_id == trial.run_id and version.tags["slimtune.trial"] == "trial_001"


def test_a_store_that_refuses_the_registry_is_one_error_line(finished, capsys, monkeypatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ENDPOINT_NOT_FOUND
    from mlflow.tracking import MlflowClient

    from search.cli import main

    record, _, tmp = finished

    def refuse(self, name):  # what a tracking server without a registry answers
        raise MlflowException(
            "API request to endpoint /api/2.0/mlflow/registered-models/get failed with error code 404", error_code=ENDPOINT_NOT_FOUND
        )

    monkeypatch.setattr(MlflowClient, "get_registered_model", refuse)
    code = main(
        [
            "export",
            "handoff",
            "--pick",
            "min-macs",
            "--register",
            "m",
            "--out",
            str(tmp / "refused"),
            "--results-dir",
            str(record.folder.parent),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--register m: the MLflow store sqlite:///" in err and "ENDPOINT_NOT_FOUND" in err and "Traceback" not in err


def test_hypervolume_history_follows_completion_order() -> None:
    record = SearchRecord(
        name="h", folder=Path("/nonexistent"), space_yaml="", space_path="", trials=3,
        objectives=(Objective("accuracy", "max"), Objective("macs", "min")), constraints=(),
        task_metrics=("accuracy", "macs"), tracking_uri="sqlite:///x.db", optuna_storage="sqlite:///y.db", baseline_metrics=BASELINE,
    )  # fmt: skip
    records = [TrialRecord(n, f"t{n}", None, [], metrics, None, completed_at=COMPLETED_AT[n]) for n, (metrics, _) in enumerate(TRIALS)]
    history = hypervolume_history(record, records)
    assert [h["trial"] for h in history] == ["trial_002", "trial_001", "trial_000"]
    # Normalised by the baseline; reference accuracy 0, macs 1.1 x 600.
    first = (0.80 / 0.97) * (1.1 - 1.0)
    second = (0.90 / 0.97) * (1.1 - 100 / 600)  # trial 1 dominates trial 2
    third = second + (0.95 - 0.90) / 0.97 * (1.1 - 500 / 600)
    assert [h["hypervolume"] for h in history] == pytest.approx([first, second, third], rel=1e-12)
    rank_records(record, records)
    assert history[-1]["hypervolume"] == search_hypervolume(record, records)
    assert all(r.rank == 0 or r.number == 2 for r in records)


def _report_data(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="slimtune-data">(.*?)</script>', html, flags=re.S)
    assert block, "the report has no data block"
    return json.loads(block.group(1))


def test_report_holds_what_pareto_json_prints_and_is_logged_on_the_search_run(finished, capsys) -> None:
    from search.cli import main

    record, _, tmp = finished
    results = str(record.folder.parent)
    assert main(["pareto", "handoff", "--json", "--results-dir", results]) == 0
    front = json.loads(capsys.readouterr().out)
    assert main(["pareto", "handoff", "--json", "--all", "--results-dir", results]) == 0
    every = json.loads(capsys.readouterr().out)
    out = tmp / "report" / "handoff.html"
    assert main(["report", "handoff", "--out", str(out), "--results-dir", results]) == 0
    html = out.read_text()
    data = _report_data(html)
    assert data["pareto"] == front and data["trials"] == every["trials"]
    assert [row["trial"] for row in data["pareto"]["trials"]] == ["trial_000", "trial_001"]
    history = data["hypervolume_history"]
    assert [h["completed"] for h in history] == [1, 2, 3] and history[-1]["hypervolume"] == front["hypervolume"]
    for row in every["trials"]:
        link = data["links"][row["trial"]]
        assert link["mlflow"].endswith(f"/runs/{row['run_id']}") and f"--run {row['run_id']} " in link["export"]
    # Self-contained: nothing is fetched when it opens.
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html)
    client = record.tracker().client
    assert "report.html" in {a.path for a in client.list_artifacts(record.parent_run_id)}
    assert (record.folder / "report.html").is_file()  # written by finish_search


def test_a_driver_killed_while_logging_a_model_leaves_no_open_run_and_no_half_model(tmp_path: Path) -> None:
    """Logging a Pareto model reopens the trial's run; a driver killed in between left the run
    RUNNING and a PENDING logged model. The next close-out (a resume's) ends the run as the run
    map has it and logs the model again, once."""
    from search.driver.runner import finish_search
    from search.results.report import Reporter

    record, _ = _stored_search(tmp_path)
    tracker = record.tracker()
    client = tracker.client
    run_id = {r.name: r.run_id for r in completed_records(record)}["trial_000"]
    for model in client.search_logged_models([tracker.experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        client.delete_logged_model(model.model_id)
    half = client.create_logged_model(tracker.experiment_id, name="program", source_run_id=run_id)  # PENDING
    client.update_run(run_id, status="RUNNING")
    # A Ctrl-C there left the other front trial's run FAILED (MLflow's start_run block on an exception).
    other = {r.name: r.run_id for r in completed_records(record)}["trial_001"]
    client.set_terminated(other, status="FAILED")

    finish_search(record, Reporter(log=lambda line: None))
    assert client.get_run(run_id).info.status == "FINISHED" and client.get_run(other).info.status == "FINISHED"
    models = client.search_logged_models([tracker.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [(m.name, m.status.name) for m in models] == [("program", "READY")]
    assert half.model_id not in {m.model_id for m in models}


def test_an_interrupted_model_logging_leaves_the_run_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """A Ctrl-C while MLflow logs a trial's model: the run it reopened ends as it was (FINISHED), not FAILED."""
    import mlflow

    from search.results.registry import log_trial_model

    record, _ = _stored_search(tmp_path)
    trial = next(r for r in completed_records(record) if r.name == "trial_002")  # not on the front: no model yet

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.pytorch, "log_model", interrupted)
    with pytest.raises(KeyboardInterrupt), exported_model_dir(trial.checkpoint) as model_dir:
        log_trial_model(record, trial, model_dir)
    assert record.tracker().client.get_run(trial.run_id).info.status == "FINISHED"
