"""End to end: a 4-trial search on digits with Ray on 127.0.0.1, then pareto and export."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

SPACE = """
name: e2e
task: digits
model: digits_cnn
baseline: {epochs: 3}
training: {batch_size: 64, lr: 0.05}
methods:
  l1_filter:
    optional: true
    params: {ratio: {low: 0.2, high: 0.7}}
  kd:
    optional: true
  minmax_quant:
    optional: true
    params: {bits: {choices: [4, 8]}}
objectives: {accuracy: max, macs: min, size_bytes: min}
constraints: ["accuracy_drop <= 0.5"]
budget: {trials: 4, concurrent: 2, epochs: 1, cpus_per_trial: 1}
sampler: {name: random, seed: 3}
measure: {latency_repeats: 3}
"""


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    from search.driver.runner import run_search

    tmp = tmp_path_factory.mktemp("e2e")
    space = tmp / "e2e.yaml"
    space.write_text(SPACE)
    lines: list[str] = []
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # the per-trial progress lines are printed by the driver
        record = run_search(space, results_dir=tmp / "results", tracking_uri=f"sqlite:///{tmp}/mlflow.db", log=lines.append)
    return record, tmp, lines + stdout.getvalue().splitlines()


@pytest.mark.slow
def test_mlflow_holds_one_parent_and_four_children(finished_search):
    from mlflow.tracking import MlflowClient

    record, tmp, lines = finished_search
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("e2e")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("slimtune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("slimtune.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.run_id == record.parent_run_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        for metric in ("accuracy", "macs", "bops", "flops", "params", "size_bytes", "artifact_bytes", "latency_ms", "accuracy_drop"):
            assert metric in child.data.metrics, (metric, child.data.metrics)
        assert child.data.metrics["flops"] == 2 * child.data.metrics["macs"]
        assert child.data.tags["is_pareto"] in ("true", "false")
        assert "pipeline" in child.data.params
    assert sum(c.data.tags["is_pareto"] == "true" for c in children) >= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "pareto.png", "report.html"} <= artifacts
    assert parent.data.metrics["hypervolume"] > 0
    assert parent.data.metrics["baseline.accuracy"] > 0.5
    # Pareto trials carry their exported model, and it is logged as an MLflow model (registrable).
    logged = [m.source_run_id for m in client.search_logged_models([experiment.experiment_id])]
    assert sorted(logged) == sorted(c.info.run_id for c in children if c.data.tags["is_pareto"] == "true")
    for child in children:
        if child.data.tags["is_pareto"] == "true":
            names = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
            assert "model/model.pt2" in names
    progress = [line for line in lines if " done " in line and "hypervolume" in line]
    assert len(progress) == 4, lines
    assert any("on the Pareto front" in line for line in lines)


@pytest.mark.slow
def test_front_matches_optuna_best_trials(finished_search):
    import optuna

    from search.results.ranking import rank_records
    from search.results.record import completed_records

    record, _, _ = finished_search
    study = optuna.load_study(study_name=record.name, storage=record.optuna_storage)
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 4
    records = completed_records(record)
    rank_records(record, records)
    ours = sorted(r.number for r in records if r.rank == 0 and r.feasible)
    assert ours == sorted(t.number for t in study.best_trials)


@pytest.mark.slow
def test_pareto_and_export_commands(finished_search, capsys, monkeypatch):
    import torch

    from deploy import load_program
    from search.cli import main

    record, tmp, _ = finished_search
    (tmp / "elsewhere").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp / "elsewhere")  # not the folder the search started in
    results = str(tmp / "results")
    assert main(["pareto", "e2e", "--json", "--results-dir", results]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["search"] == "e2e" and table["trials"]
    assert all(row["rank"] == 0 for row in table["trials"])
    assert main(["pareto", "e2e", "--results-dir", results]) == 0
    text = capsys.readouterr().out
    assert "baseline" in text and table["trials"][0]["trial"] in text

    out = tmp / "export"
    assert main(["export", "e2e", "--pick", "knee", "--out", str(out), "--results-dir", results]) == 0
    assert {"model.pt2", "model.pt", "state_dict.pt", "recipe.json"} <= {p.name for p in out.iterdir()}
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["search"] == "e2e" and "metrics" in recipe
    # Each form written is timed as the trial timed latency_ms: its threads and batch, the baseline's too.
    timed = recipe["export_latency"]
    assert timed["threads"] == recipe["metrics"]["latency_threads"] == record.baseline_metrics["latency_threads"]
    assert timed["batch_size"] == recipe["metrics"]["latency_batch_size"] == record.baseline_metrics["latency_batch_size"]
    assert recipe["metrics"]["latency_form"] == record.baseline_metrics["latency_form"] == "program"
    assert sorted(timed["ms"]) == ["module", "program"] and min(timed["ms"].values()) > 0
    assert f"at batch {timed['batch_size']}, {timed['threads']} CPU thread" in capsys.readouterr().out
    program = load_program(out)
    module = torch.load(out / "model.pt", weights_only=False).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(program(x), module(x), atol=1e-5)

    run_id = table["trials"][0]["run_id"]
    assert main(["export", "e2e", "--run", run_id[:10], "--out", str(tmp / "export2"), "--results-dir", results]) == 0
    assert main(["export", "e2e", "--run", "nope", "--out", str(tmp / "export3"), "--results-dir", results]) == 2


FAILING_SPACE = """
name: failing
task: digits
model: digits_cnn
baseline: {epochs: 1}
methods:
  kd:
    optional: false
    params: {weight: 1.0e+39}   # overflows float32: the loss becomes inf in the first step
  minmax_quant:
    optional: true
objectives: {accuracy: max, size_bytes: min}
budget: {trials: 2, concurrent: 1, epochs: 1, max_failures: 1}
sampler: {name: random, seed: 0}
measure: {latency_repeats: 2}
"""


@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient

    import search.driver.runner
    from search.driver.runner import run_search

    # `search`'s pre-flight refuses this space up front (its own test is in test_checks.py); this
    # test is about trials that fail while they run, so the driver skips it here.
    monkeypatch.setattr(search.driver.runner, "check_before_baseline", lambda *args, **kwargs: None)

    space = tmp_path / "failing.yaml"
    space.write_text(FAILING_SPACE)
    lines: list[str] = []
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        record = run_search(space, results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log=lines.append)
    printed = "\n".join(lines) + stdout.getvalue()
    assert printed.count("FAILED (") == 2, printed
    assert "retrying from its last checkpoint" in printed  # max_failures: 1 retries once

    study = optuna.load_study(study_name="failing", storage=record.optuna_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("failing")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("slimtune.role") == "trial"]
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED"
        assert "NonFiniteLossError" in child.data.tags["failure_reason"]
        assert "loss became inf" in child.data.tags["failure_reason"]
    assert any("0 completed trials, 2 failed" in line for line in lines), lines
    assert any(
        "every trial failed; the most common reason: NonFiniteLossError: the loss became inf" in line and "of 2 failed trials)" in line
        for line in lines
    ), lines
    assert not any(line.startswith("Export:") for line in lines)
