"""recipe.json describes everything in effect, and ``slimtune replay`` retrains a trial to the same metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from search.cli import main
from search.space.spec import load_space
from search.trial.body import TrialSpec, run_pipeline, train_baseline

ROOT = Path(__file__).resolve().parents[2]
SAMPLED = [
    {"name": "l1_filter", "params": {"ratio": 0.3}},
    {"name": "kd", "params": {"temperature": 2.0}},
    {"name": "minmax_quant", "params": {"bits": 4}},
]
TIMINGS = {"latency_ms", "measured_latency_ms"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trial run as the search runs one: the baseline (2 epochs), then the pipeline (1 epoch a phase)."""
    space = load_space(ROOT / "spaces" / "quickstart.yaml")
    space = space.with_overrides(baseline_epochs=2, budget=dataclasses.replace(space.budget, epochs=1), latency_repeats=2)
    baseline, baseline_metrics = train_baseline(space, log=lambda m: None)
    spec = TrialSpec(space, {k: v.detach().cpu() for k, v in baseline.state_dict().items()}, baseline_metrics)
    out = tmp_path_factory.mktemp("trial")
    metrics = run_pipeline(spec, SAMPLED, out, torch.device("cpu"), seed=space.seed)
    return out, metrics, baseline_metrics


def test_recipe_holds_everything_in_effect(exported) -> None:
    out, metrics, baseline_metrics = exported
    recipe = json.loads((out / "recipe.json").read_text())
    pipeline = {step["name"]: step["params"] for step in recipe["pipeline"]}
    # Defaults nobody sampled are written too.
    assert pipeline["l1_filter"]["ratio"] == 0.3 and "round_to" in pipeline["l1_filter"]
    assert pipeline["minmax_quant"]["bits"] == 4 and pipeline["minmax_quant"]["quantize_activations"] is True
    assert pipeline["kd"]["temperature"] == 2.0 and "weight" in pipeline["kd"]
    assert recipe["training"] == {"batch_size": 64, "lr": 0.05, "optimizer": "sgd", "weight_decay": 0.0005, "epochs": 1, "seed": 0}
    assert recipe["baseline"]["epochs"] == 2 and recipe["baseline"]["checkpoint"] is None
    assert recipe["baseline"]["metrics"]["accuracy"] == baseline_metrics["accuracy"]
    assert recipe["task"]["name"] == "digits" and recipe["task"]["options"] == {"seed": 0}
    assert recipe["task"]["input_shape"] == [1, 8, 8]
    assert "train-split mean and std" in recipe["task"]["preprocessing"]["description"]
    assert recipe["model"] == {
        "name": "digits_cnn",
        "options": recipe["model"]["options"],
        "task_arguments": {"num_classes": 10, "in_channels": 1},
    }
    assert recipe["measure"] == {"latency_batch_size": 1, "latency_repeats": 2}
    assert recipe["run"]["device"] == "cpu" and recipe["run"]["torch_threads"] == torch.get_num_threads()
    assert recipe["versions"]["torch"] == torch.__version__ and recipe["versions"]["slimtune"]
    # The trial's own metrics, nothing Tune adds.
    assert recipe["metrics"] == json.loads(json.dumps(metrics))
    assert not {"pid", "timestamp", "time_total_s", "config/trial_number", "node_id", "recipe"} & set(recipe["metrics"])


def test_replay_gets_the_same_metrics_and_weights(exported, tmp_path: Path, capsys) -> None:
    out, metrics, baseline_metrics = exported
    replayed = tmp_path / "replayed"
    assert main(["replay", str(out / "recipe.json"), "--out", str(replayed)]) == 0
    printed = capsys.readouterr().out
    assert "baseline weights equal the recorded ones" in printed
    assert "metrics equal the recipe's within 1e-6" in printed
    again = json.loads((replayed / "recipe.json").read_text())
    for key, value in metrics.items():
        if key not in TIMINGS:
            assert (
                again["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6)
                if isinstance(value, float)
                else again["metrics"][key] == value
            ), key
    assert again["metrics"]["accuracy"] == metrics["accuracy"]
    first = torch.load(out / "state_dict.pt", weights_only=True)
    second = torch.load(replayed / "state_dict.pt", weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_replay_says_when_metrics_differ(exported, tmp_path: Path, capsys) -> None:
    out, metrics, _ = exported
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["metrics"]["accuracy"] = metrics["accuracy"] - 0.01
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(recipe))
    assert main(["replay", str(changed), "--out", str(tmp_path / "replayed")]) == 1
    err = capsys.readouterr().err
    assert "1 of " in err and f"accuracy: recorded {metrics['accuracy'] - 0.01!r}, replayed {metrics['accuracy']!r}" in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.json", "no such file"),
        (lambda tmp: _write(tmp / "old.json", {"recipe": [], "task": "digits"}), "has format 1, but this one has None"),
        (lambda tmp: _write(tmp / "partial.json", {"format": 1, "task": {"name": "digits"}}), "the key 'task.options' is missing"),
    ],
)
def test_replay_of_a_bad_recipe_is_one_line_exit_2(tmp_path: Path, capsys, make, message: str) -> None:
    assert main(["replay", str(make(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0]


def test_replay_refuses_a_folder_that_is_not_empty(exported, tmp_path: Path, capsys) -> None:
    out, _, _ = exported
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["replay", str(out), "--out", str(tmp_path / "taken")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


SPACE = """
name: replayed
task: digits
model: digits_cnn
baseline: {epochs: 2}
methods:
  l1_filter:
    optional: false
    params: {ratio: {low: 0.2, high: 0.6}}
  minmax_quant:
    optional: false
    params: {bits: {choices: [4, 8]}}
objectives: {accuracy: max, macs: min}
budget: {trials: 1, concurrent: 1, epochs: 1, cpus_per_trial: 1}
sampler: {name: random, seed: 5}
measure: {latency_repeats: 2}
"""


@pytest.mark.slow
def test_a_searched_and_exported_trial_replays_to_its_metrics(tmp_path: Path, capsys) -> None:
    """The real path: the baseline in the driver, the trial in a Ray worker, `slimtune export`, then replay."""
    from search.driver.runner import run_search

    space = tmp_path / "replayed.yaml"
    space.write_text(SPACE)
    with contextlib.redirect_stdout(io.StringIO()):
        run_search(space, results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log=lambda m: None)
    export = tmp_path / "export"
    assert main(["export", "replayed", "--pick", "max-accuracy", "--out", str(export), "--results-dir", str(tmp_path / "results")]) == 0
    recipe = json.loads((export / "recipe.json").read_text())
    assert (recipe["search"], recipe["trial"]) == ("replayed", "trial_000")
    assert not {"pid", "timestamp", "config/trial_number"} & set(recipe["metrics"])
    capsys.readouterr()
    assert main(["replay", str(export / "recipe.json"), "--out", str(tmp_path / "replayed")]) == 0
    printed = capsys.readouterr().out
    assert "baseline weights equal the recorded ones" in printed and "metrics equal the recipe's" in printed


def test_recipe_model_options_include_the_factorys_defaults_but_not_what_the_task_supplies() -> None:
    from search.trial.context import load_task
    from search.trial.recipe import recipe_document

    space = load_space(ROOT / "spaces" / "quickstart.yaml").with_overrides(model="digits_resnet")
    task = load_task(space)
    doc = recipe_document(space, task, [], torch.device("cpu"), {"w": torch.ones(2)}, {}, {"torch_threads": 1.0})
    assert doc["model"]["options"] == {"shortcut": "A"}
    assert doc["model"]["task_arguments"] == {"num_classes": 10, "in_channels": 1}
    assert doc["baseline"]["torch_threads"] is None and doc["run"]["torch_threads"] == 1
