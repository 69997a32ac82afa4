"""Early stopping (budget.scheduler), warm start and the baseline cache.

The promotion rule is tested without Ray (``search.driver.halving``); one small search shows a stopped
trial ending PRUNED in the study, KILLED and tagged ``stopped_early`` in MLflow, counted in the
budget and never ranked.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from errors import UserError
from search.driver.halving import Rungs, milestones, near
from search.results.pareto import best_first, crowding_distances
from search.space.objectives import Constraint, Objective
from search.space.spec import parse_space

SPACE = {
    "name": "early",
    "task": "digits",
    "model": "digits_cnn",
    "baseline": {"epochs": 1},
    "methods": {"l1_filter": {"optional": False, "params": {"ratio": {"low": 0.2, "high": 0.7}}}},
    "objectives": {"accuracy": "max", "size_bytes": "min"},
    # The baseline trains 1 epoch (test accuracy 0.61): a trial must beat it by 8 points (held on
    # the final result only), and its model must fit in 50 kB (held at every rung too).
    "constraints": ["accuracy_drop <= -0.08", "size_bytes <= 50000"],
    "budget": {"trials": 2, "concurrent": 1, "epochs": 2, "scheduler": "mo_asha", "grace_epochs": 1, "reduction_factor": 2},
    "sampler": {"name": "random", "seed": 2},
    "measure": {"latency_repeats": 1},
}


def _space(**budget):
    data = copy.deepcopy(SPACE)
    data["budget"].update(budget)
    return parse_space(data, "early.yaml", yaml.safe_dump(data))


def test_crowding_distance_and_best_first_order() -> None:
    # (accuracy max, macs min): a, b, c are mutually non-dominated; d is dominated by all three.
    points = [[0.9, 100.0], [0.8, 50.0], [0.85, 75.0], [0.7, 200.0]]
    assert crowding_distances(points[:3], ["max", "min"]) == [math.inf, math.inf, pytest.approx(2.0)]
    assert best_first(points, ["max", "min"]) == [0, 1, 2, 3]
    # a breaks a constraint: every feasible point goes first, d (rank 1 among them) included.
    assert best_first(points, ["max", "min"], [0.5, 0.0, 0.0, 0.0]) == [1, 2, 3, 0]


def _result(accuracy: float, size: float, drop: float = 0.0, macs: float | None = None) -> dict:
    return {"val_accuracy": accuracy, "size_bytes": size, "val_accuracy_drop": drop, "macs": macs}


def test_rungs_keep_the_best_of_each_rung_by_rank_feasibility_and_arrival() -> None:
    rungs = Rungs(
        objectives=(Objective("accuracy", "max"), Objective("size_bytes", "min")),
        constraints=(Constraint("accuracy_drop", "<=", 0.1), Constraint("size_bytes", "<=", 150.0)),
        quality=("accuracy",),
        milestones=milestones(1, 2, 4),
        reduction_factor=2,
    )
    assert rungs.milestones == (1, 2) and milestones(2, 2, 12) == (2, 4, 8) and milestones(1, 3, 18) == (1, 3, 9)

    result = _result
    assert rungs.goes_on("t0", 1, result(0.80, 100.0))  # alone at the rung
    assert not rungs.goes_on("t1", 1, result(0.70, 120.0))  # dominated by t0: 1 of 2 goes on
    assert rungs.goes_on("t2", 1, result(0.90, 90.0))  # dominates both: 2 of 3 go on
    assert not rungs.goes_on("t3", 1, result(0.99, 160.0))  # best accuracy, but breaks the size constraint
    assert not rungs.goes_on("t4", 1, result(0.69, 130.0))  # dominated by t0, t1 and t2: 3 of 5 go on
    assert rungs.goes_on("t5", 1, result(0.50, 50.0))  # a new extreme of the front: 3 of 6 go on
    assert rungs.goes_on("t1", 1, result(0.70, 120.0))  # an epoch replayed after a restore changes nothing
    assert rungs.goes_on("t1", 3, result(0.70, 120.0))  # between rungs
    assert rungs.goes_on("t6", 2, {"val_accuracy": 0.5})  # no size: not compared
    assert list(rungs.recorded[1]) == ["t0", "t1", "t2", "t3", "t4", "t5"]

    # Past the quota, a feasible vector that nothing at the rung dominates still goes on.
    rungs = Rungs(rungs.objectives, rungs.constraints, ("accuracy",), (1,), reduction_factor=4)
    assert rungs.goes_on("t0", 1, result(0.80, 100.0))
    assert rungs.goes_on("t1", 1, result(0.70, 50.0))  # 1 of 2 by the quota (t0, the earlier), but on the front
    assert not rungs.goes_on("t2", 1, result(0.60, 60.0))  # dominated by t1
    # The validation drop breaks accuracy_drop <= 0.1, but a quality constraint waits for the end.
    assert rungs.goes_on("t3", 1, result(0.90, 40.0, drop=0.2))
    # A cost constraint is held at once (the final model's size is known): even alone at a rung.
    assert not Rungs(rungs.objectives, rungs.constraints, ("accuracy",), (1,), 2).goes_on("t0", 1, result(0.99, 151.0))


def test_a_freshly_pruned_trial_is_not_stopped_by_its_mid_phase_accuracy_drop() -> None:
    """The quickstart with mo_asha and 4 trials: the one trial that compressed stopped after 1 epoch."""
    rungs = Rungs(
        objectives=(Objective("accuracy", "max"), Objective("macs", "min"), Objective("size_bytes", "min")),
        constraints=(Constraint("accuracy_drop", "<=", 0.1),),
        quality=("accuracy",),
        milestones=(1, 2, 4, 8),
        reduction_factor=2,
    )
    # kd(temperature=3.97, weight=0.692) after 1 epoch, then l1_filter(ratio=0.575) > minmax_quant(bits=8).
    assert rungs.goes_on("kd", 1, _result(0.9722, 97128.0, drop=0.0222, macs=599680.0))
    assert rungs.goes_on("pruned", 1, _result(0.7056, 5949.0, drop=0.2889, macs=99198.0))


def test_a_trial_alone_in_its_region_of_the_known_cost_goes_on() -> None:
    rungs = Rungs(
        objectives=(Objective("accuracy", "max"), Objective("macs", "min"), Objective("size_bytes", "min")),
        constraints=(),
        quality=("accuracy",),
        milestones=(2,),
        reduction_factor=2,
    )
    assert near([100.0, 10.0], [200.0, 5.0]) and not near([100.0, 10.0], [201.0, 10.0]) and not near([0.0], [1.0])
    assert rungs.goes_on("small", 2, _result(0.95, 1000.0, macs=50000.0))
    assert rungs.goes_on("smaller", 2, _result(0.96, 400.0, macs=20000.0))
    # Dominated by "smaller" (cheaper on both costs, more accurate), but no trial at the rung has
    # a cost near its own (both costs at least twice as high): it goes on.
    assert rungs.goes_on("large", 2, _result(0.90, 4000.0, macs=200000.0))
    # Near "large" on both costs and dominated by it: past the quota (2 of 4), it stops.
    assert not rungs.goes_on("large2", 2, _result(0.89, 4100.0, macs=210000.0))
    # Near "small" on MACs only (its size is more than twice): alone, so it goes on, though dominated.
    assert rungs.goes_on("wide", 2, _result(0.80, 2500.0, macs=60000.0))

    # Without a cost objective every trial is in the same region: the quota and dominance decide.
    alone = Rungs((Objective("accuracy", "max"), Objective("accuracy_drop", "min")), (), ("accuracy",), (2,), 2)
    assert alone.goes_on("a", 2, {"val_accuracy": 0.9, "val_accuracy_drop": 0.0})
    assert not alone.goes_on("b", 2, {"val_accuracy": 0.8, "val_accuracy_drop": 0.1})


def test_the_stopped_early_line_names_the_recipe_and_the_figures_it_was_judged_on(tmp_path: Path) -> None:
    from search.results.record import Progress, SearchRecord
    from search.results.report import Reporter

    space = _space()
    record = SearchRecord.from_space("early", tmp_path / "early", space, "sqlite:///unused.db", "sqlite:///unused-optuna.db")
    recipe = [{"name": "l1_filter", "params": {"ratio": 0.5750350228495987}}, {"name": "minmax_quant", "params": {"bits": 8}}]
    result = {"epoch": 1, "recipe": json.dumps(recipe), "val_accuracy": 0.7056, "size_bytes": 5949.0, "macs": 99198.0, "cpu_s": 1.5}
    lines: list[str] = []
    Reporter(lines.append).trial_stopped(record, "trial_001", result, Progress(budget=2, completed=0, failed=0, reasons={}, stopped=1))
    assert lines == [
        "[slimtune] trial_001 stopped early after 1 epoch (1/2 done)  l1_filter(ratio=0.575) > minmax_quant(bits=8)  |  "
        "val_accuracy 0.7056  size_bytes 5.9k  |  the scheduler ranked it below the trials it kept"
    ]


def test_budget_scheduler_is_validated() -> None:
    space = _space(epochs=6, grace_epochs=None)
    assert (space.budget.scheduler, space.budget.grace, space.budget.reduction_factor) == ("mo_asha", 3, 2)
    assert parse_space({k: v for k, v in SPACE.items() if k != "budget"}).budget.scheduler == "fifo"
    with pytest.raises(UserError, match=r"^early.yaml: budget.scheduler: must be one of fifo, asha, mo_asha, but got 'hyperband'\.$"):
        _space(scheduler="hyperband")
    with pytest.raises(UserError, match=r"budget.reduction_factor: must be >= 2, but got 1"):
        _space(reduction_factor=1)
    data = copy.deepcopy(SPACE)
    data["objectives"] = {"size_bytes": "min", "accuracy": "max"}
    data["budget"]["scheduler"] = "asha"
    with pytest.raises(UserError, match=r"budget.scheduler: asha stops trials on the first objective's value .* is size_bytes"):
        parse_space(data, "early.yaml")
    data["objectives"] = {"accuracy": "max", "latency_ms": "min"}
    data["budget"]["scheduler"] = "mo_asha"
    with pytest.raises(UserError, match=r"budget.scheduler: mo_asha compares .* but latency_ms is measured only on the final model"):
        parse_space(data, "early.yaml")


# ----------------------------------------------------------------------------------------------
# Warm start.
# ----------------------------------------------------------------------------------------------


def _earlier_search(root: Path, ratios: list[float], accuracies: list[float]) -> None:
    """A finished search 'first' in ``root``: manifest and a study of l1_filter trials."""
    from search.results.record import SearchRecord

    space = _space()
    storage = f"sqlite:///{root}/optuna.db"
    record = SearchRecord.from_space("first", root / "first", space, f"sqlite:///{root}/mlflow.db", storage)
    record.save()
    study = optuna.create_study(study_name="first", storage=storage, directions=["maximize", "minimize"])
    for ratio, accuracy in zip(ratios, accuracies):
        metrics = {"accuracy": accuracy, "size_bytes": 1000 * (1 - ratio), "accuracy_drop": -0.2}
        recipe = [{"name": "l1_filter", "params": {"ratio": ratio}}]
        study.add_trial(
            optuna.trial.create_trial(
                values=[accuracy, metrics["size_bytes"]], user_attrs={"metrics": metrics, "recipe": json.dumps(recipe)}
            )
        )


def test_warm_start_enqueues_the_pareto_recipes_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    from search.driver._tune import make_searcher
    from search.driver.warm_start import warm_start_points

    # Trial 2 (ratio 0.3, accuracy 0.8) is dominated by trial 0 (ratio 0.3 too, accuracy 0.9).
    _earlier_search(tmp_path, [0.3, 0.6, 0.3], [0.9, 0.7, 0.8])
    points = warm_start_points(_space(), "first", tmp_path)
    assert points == [{"l1_filter/ratio": 0.3}, {"l1_filter/ratio": 0.6}]
    searcher = make_searcher(_space(), "second", f"sqlite:///{tmp_path}/second.db", points)
    waiting = searcher._ot_study.get_trials(states=[optuna.trial.TrialState.WAITING])
    assert [t.system_attrs["fixed_params"] for t in waiting] == points

    with pytest.raises(UserError, match=r"^--warm-start nope: no search named 'nope'"):
        warm_start_points(_space(), "nope", tmp_path)
    narrow = copy.deepcopy(SPACE)
    narrow["methods"]["l1_filter"]["params"]["ratio"] = {"low": 0.4, "high": 0.7}
    with pytest.raises(
        UserError, match=r"^--warm-start first: trial_000's recipe has l1_filter.ratio = 0.3, outside this space's range \[0.4, 0.7\]\.$"
    ):
        warm_start_points(parse_space(narrow, "narrow.yaml"), "first", tmp_path)
    other = copy.deepcopy(SPACE)
    other["methods"] = {"minmax_quant": {"optional": False}}
    with pytest.raises(UserError, match=r"trial_000's recipe uses method l1_filter, which this space does not list under methods"):
        warm_start_points(parse_space(other, "other.yaml"), "first", tmp_path)
    other = copy.deepcopy(SPACE)
    other["task"] = {"name": "digits", "options": {"val_fraction": 0.2}}
    with pytest.raises(
        UserError, match=r"that search ran task 'digits', this space runs task 'digits' with options \{'val_fraction': 0.2\}"
    ):
        warm_start_points(parse_space(other, "other.yaml"), "first", tmp_path)


# ----------------------------------------------------------------------------------------------
# Baseline cache.
# ----------------------------------------------------------------------------------------------


class _Tracker:
    def start_parent(self, *args, **kwargs) -> str:
        return "parent"


def test_a_second_search_with_the_same_key_reuses_the_baseline(tmp_path: Path, monkeypatch) -> None:
    from importlib import metadata

    import search.driver.runner
    from search.driver.baselines import baseline_key, cached_baseline
    from search.results.record import SearchRecord
    from search.results.report import Reporter

    trained = []

    def train(space, address, reporter):
        trained.append(space.lr)
        return {"w": torch.full((2,), float(len(trained)))}, {"accuracy": 0.5 + len(trained) / 10}

    monkeypatch.setattr(search.driver.runner, "_baseline", train)
    lines: list[str] = []
    spaces = {"a": _space(), "b": _space(), "c": _space().with_overrides(lr=0.01)}
    records = {}
    for name, space in spaces.items():
        record = SearchRecord.from_space(name, tmp_path / name, space, "sqlite:///unused.db", "sqlite:///unused-optuna.db")
        record.tracker = _Tracker
        record.save()
        search.driver.runner._prepare_baseline(record, None, Reporter(lines.append))
        records[name] = record
    # b has a's key and reuses a's baseline; c trains with another learning rate.
    assert trained == [0.05, 0.01]
    assert torch.load(tmp_path / "b" / "baseline.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]
    assert torch.load(tmp_path / "c" / "baseline.pt", weights_only=True)["w"].tolist() == [2.0, 2.0]
    assert (records["a"].baseline_metrics, records["b"].baseline_metrics, records["c"].baseline_metrics) == (
        {"accuracy": 0.6},
        {"accuracy": 0.6},
        {"accuracy": 0.7},
    )
    folder = cached_baseline(tmp_path, baseline_key(spaces["a"]))[2]
    assert [line for line in lines if "reused" in line] == [
        f"[slimtune] reused the baseline trained by search 'a' from {folder} (same task and options, package versions "
        f"numpy {metadata.version('numpy')}, scikit-learn {metadata.version('scikit-learn')}, torch {metadata.version('torch')}, task and model code, model options, "
        "baseline and training settings, seed)"
    ]


# ----------------------------------------------------------------------------------------------
# One search with mo_asha (Ray on 127.0.0.1).
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stopped_trials_end_pruned_killed_and_off_the_front(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from search.driver.runner import run_search
    from search.results.record import completed_records, search_progress

    space = tmp_path / "early.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    lines: list[str] = []
    with contextlib.redirect_stdout(io.StringIO()):
        record = run_search(space, results_dir=tmp_path / "results", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log=lines.append)
    study = optuna.load_study(study_name="early", storage=record.optuna_storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    # The first trial (l1_filter ratio 0.418) is alone at the rung (epoch 1) and goes on. The
    # second (ratio 0.213) keeps more than 50 kB, which its first epoch already reports: it stops.
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    for t in pruned:
        assert t.user_attrs["stopped_at_epoch"] == 1
        metrics = t.user_attrs["metrics"]
        # The cost the final model will have, known from the first epoch, and the trial's CPU time.
        assert 50000 < metrics["size_bytes"] < record.baseline_metrics["size_bytes"] and metrics["cpu_s"] > 0
        assert 0 < metrics["val_accuracy"] <= 1
    progress = search_progress(record)
    assert (progress.done, progress.completed, progress.stopped, progress.finished) == (2, 1, 1, True)
    assert sorted(r.number for r in completed_records(record)) == [
        t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
    ]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    children = [
        r for r in client.search_runs([client.get_experiment_by_name("early").experiment_id]) if r.data.tags.get("slimtune.role") == "trial"
    ]
    stopped = {r.info.run_name for r in children if r.info.status == "KILLED" and r.data.tags.get("stopped_early") == "true"}
    assert stopped == {f"trial_{t.number:03d}" for t in pruned}
    assert all("is_pareto" not in r.data.tags for r in children if r.info.run_name in stopped)
    runs = json.loads((record.folder / "runs.json").read_text())
    assert {r["name"] for r in runs.values() if r["status"] == "STOPPED_EARLY"} == stopped
    stopped_lines = [line for line in lines if "stopped early after 1 epoch" in line]
    assert len(stopped_lines) == len(pruned) and "trial_001 stopped early" in stopped_lines[0], lines
    assert "  l1_filter(ratio=0.213)  |  val_accuracy " in stopped_lines[0], lines


def test_asha_lets_a_trial_at_the_longest_pipeline_s_last_epoch_reach_its_final_result() -> None:
    """Tune's ASHA stops every trial that reaches ``max_t``, before its final result arrives."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from search.driver._private import TRIAL_NUMBER
    from search.driver._tune import ScalarASHA, StoppedTrials

    scheduler = ScalarASHA(
        StoppedTrials("unused", "sqlite://"),
        time_attr="epoch",
        metric="val_accuracy",
        mode="max",
        max_t=2,
        grace_period=1,
        reduction_factor=2,
    )
    trials = [SimpleNamespace(trial_id=name, config={TRIAL_NUMBER: n}) for n, name in enumerate(("good", "worse"))]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    # Epoch 1 is a rung both pass; at epoch 2 (max_t) "worse" is worse, but its training is over.
    accuracies = {1: (0.9, 0.95), 2: (0.9, 0.5)}
    decisions = [
        scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_accuracy": accuracy})
        for epoch in (1, 2)
        for trial, accuracy in zip(trials, accuracies[epoch])
    ]
    assert decisions == [TrialScheduler.CONTINUE] * 4
