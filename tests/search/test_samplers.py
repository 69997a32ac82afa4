"""Samplers and distinct configurations: no two running trials, and no tried configuration, twice."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest

from methods import create_method
from search.driver import samplers
from search.driver._private import tell_metrics
from search.driver.samplers import ask_distinct, make_sampler
from search.results.record import DUPLICATE_OF, space_exhausted
from search.space.objectives import Constraint
from search.space.spec import load_space, parse_space

optuna.logging.set_verbosity(optuna.logging.ERROR)

QUICKSTART = Path(__file__).resolve().parents[2] / "spaces" / "quickstart.yaml"


def bits(trial: optuna.Trial) -> None:
    """A space of three configurations."""
    trial.suggest_categorical("minmax_quant/bits", [2, 4, 8])


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random"])
def test_running_trials_never_share_a_configuration(name: str) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(name, seed=0, trials=12))
    running = [ask_distinct(study, bits) for _ in range(3)]
    assert sorted(t.params["minmax_quant/bits"] for t in running) == [2, 4, 8]
    # All three configurations are running: a fourth is refused, and every refused proposal is
    # closed as FAIL naming the running trial it equals.
    assert ask_distinct(study, bits, max_asks=5) is None
    refused = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(refused) == len(study.trials) - 3 >= 5
    by_bits = {t.params["minmax_quant/bits"]: t.number for t in running}
    assert all(t.user_attrs[DUPLICATE_OF] == by_bits[t.params["minmax_quant/bits"]] for t in refused)


def test_a_completed_configuration_is_not_proposed_again_but_a_failed_one_is() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", seed=1, trials=12))
    first = ask_distinct(study, bits)
    tell_metrics(study, first.number, {"accuracy": 0.9, "macs": 10.0}, ["accuracy", "macs"], ())
    second = ask_distinct(study, bits)
    tell_metrics(study, second.number, None, ["accuracy", "macs"], ())  # the trial crashed
    tried = {first.params["minmax_quant/bits"]}
    left = {2, 4, 8} - tried
    # The failed configuration is free again: the two untried ones come next, then nothing.
    proposals = [ask_distinct(study, bits) for _ in range(2)]
    assert {t.params["minmax_quant/bits"] for t in proposals} == left
    assert ask_distinct(study, bits) is None


def test_tell_metrics_stores_constraints_and_fails_a_non_finite_objective() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("random", seed=0, trials=4))
    drop = Constraint(metric="accuracy_drop", op="<=", bound=0.1)
    good, bad = ask_distinct(study, bits), ask_distinct(study, bits)
    metrics = {"accuracy": 0.8, "accuracy_drop": 0.15, "macs": 5.0, "recipe": "[]"}
    assert tell_metrics(study, good.number, metrics, ["accuracy", "macs"], (drop,))
    assert not tell_metrics(study, bad.number, {**metrics, "macs": math.nan}, ["accuracy", "macs"], (drop,))
    stored = study.trials
    assert stored[good.number].values == [0.8, 5.0]
    assert stored[good.number].constraints == pytest.approx({"accuracy_drop <= 0.1": 0.05, "quality": 0.0})
    assert stored[bad.number].state == optuna.trial.TrialState.FAIL


@pytest.mark.parametrize("mark", ["diverged", "at_chance"])
def test_a_trial_whose_result_cannot_be_trusted_is_infeasible_for_optuna(mark: str) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("random", seed=0, trials=4))
    trusted, marked = ask_distinct(study, bits), ask_distinct(study, bits)
    assert tell_metrics(study, trusted.number, {"accuracy": 0.8, "macs": 5.0}, ["accuracy", "macs"], ())
    # Better on both objectives, but marked: Optuna's front must not hold it, as slimtune's does not.
    assert tell_metrics(study, marked.number, {"accuracy": 0.9, "macs": 1.0, mark: 1.0}, ["accuracy", "macs"], ())
    assert study.trials[marked.number].constraints == {"quality": 1.0}
    assert [t.number for t in study.best_trials] == [trusted.number]


def test_samplers_are_sized_for_the_budget() -> None:
    assert [samplers.startup_trials(n) for n in (6, 32, 64, 200)] == [4, 8, 10, 10]
    assert [samplers.population_size(n) for n in (6, 32, 64, 400)] == [4, 8, 16, 50]
    tpe = make_sampler("tpe", seed=3, trials=32)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert (tpe._multivariate, tpe._group, tpe._constant_liar, tpe._n_startup_trials) == (True, True, True, 8)
    assert [tpe._gamma(n) for n in (4, 10, 24)] == [1, 3, 6]
    assert isinstance(make_sampler("gp", seed=0, trials=32), optuna.samplers.GPSampler)
    with pytest.raises(ValueError, match="sampler must be one of tpe, nsga2, gp, random, got 'cmaes'"):
        make_sampler("cmaes", seed=0, trials=8)


def test_the_tune_searcher_ends_the_search_when_every_configuration_is_taken() -> None:
    from ray.tune.search import Searcher

    from search.driver._private import SlimtuneOptunaSearch
    from search.driver._tune import SpaceDefinition

    space = parse_space({
        "name": "dedupe",
        "task": "digits",
        "model": "digits_cnn",
        "methods": {"minmax_quant": {"params": {"bits": {"choices": [4, 8]}}}},
        "objectives": {"accuracy": "max", "macs": "min"},
        "sampler": {"name": "tpe", "seed": 0},
    })  # fmt: skip
    searcher = SlimtuneOptunaSearch(
        space=SpaceDefinition(space),
        metric=space.metric_names,
        mode=space.modes,
        sampler=make_sampler(space.sampler, space.seed, trials=8),
        study_name="dedupe",
        storage=optuna.storages.InMemoryStorage(),
        search_space=space,
    )
    configs = [searcher.suggest(f"t{i}") for i in range(2)]
    assert sorted(c["minmax_quant"]["bits"] for c in configs) == [4, 8]
    assert searcher.suggest("t2") == Searcher.FINISHED


def test_a_sampler_stuck_on_a_tried_configuration_is_overruled_by_random_proposals() -> None:
    # A sampler that always proposes bits=2, as TPE does once it has converged on it.
    stuck = optuna.samplers.PartialFixedSampler({"minmax_quant/bits": 2}, optuna.samplers.RandomSampler(seed=0))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=stuck)
    first = ask_distinct(study, bits)
    tell_metrics(study, first.number, {"accuracy": 0.9, "macs": 10.0}, ["accuracy", "macs"], ())
    second = ask_distinct(study, bits, sampler_asks=3)
    assert (first.params, second.params["minmax_quant/bits"] in (4, 8)) == ({"minmax_quant/bits": 2}, True)
    refused = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    # The sampler's three proposals were refused, then random proposals until one was new.
    assert len(refused) >= 3 and all(t.user_attrs[DUPLICATE_OF] == first.number for t in refused)
    assert study.sampler is stuck


def test_a_search_that_runs_out_of_configurations_ends_and_says_why() -> None:
    from search.results.record import Progress
    from search.results.report import Reporter

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", seed=0, trials=8))
    for accuracy in (0.7, 0.8, 0.9):
        trial = ask_distinct(study, bits)
        # The last configurations are found after refused proposals: not exhausted yet.
        assert not space_exhausted(study.get_trials(deepcopy=False))
        tell_metrics(study, trial.number, {"accuracy": accuracy, "macs": 1.0}, ["accuracy", "macs"], ())
    assert ask_distinct(study, bits) is None
    assert space_exhausted(study.get_trials(deepcopy=False))
    progress = Progress(budget=8, completed=3, failed=0, reasons={}, exhausted=True)
    lines: list[str] = []
    Reporter(lines.append).exhausted(progress)
    assert progress.finished and lines == [
        "[slimtune] the space is exhausted: 3 of 8 trials ran, and every new proposal equalled an earlier trial; "
        "for more trials, widen the ranges (or add choices) in the space, or run fewer trials"
    ]
    lines.clear()
    Reporter(lines.append).exhausted(Progress(budget=3, completed=3, failed=0, reasons={}, exhausted=True))
    assert lines == []


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_pickles_and_proposes_after_unpickling(name: str) -> None:
    # Tune pickles the searcher, sampler included, into its experiment state.
    import pickle

    sampler = pickle.loads(pickle.dumps(make_sampler(name, seed=0, trials=8)))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(5):
        trial = ask_distinct(study, bits, max_asks=10)
        if trial is None:
            break
        tell_metrics(study, trial.number, {"accuracy": 0.5, "macs": 1.0 * trial.params["minmax_quant/bits"]}, ["accuracy", "macs"], ())
    assert {t.params["minmax_quant/bits"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE} == {2, 4, 8}


QUICKSTART_L1 = {"l1_filter/use": True, "kd/use": False, "minmax_quant/use": False}


def test_a_proposal_that_builds_a_tried_model_is_refused_as_its_duplicate() -> None:
    """Issue #28: the quickstart's ratios 0.133 and 0.129 prune the same channels of digits_cnn; the second is not trained again."""
    from search.driver._tune import SpaceDefinition
    from search.driver.duplicates import EffectiveRecipes

    space = load_space(QUICKSTART)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", seed=0, trials=12))
    study.enqueue_trial({**QUICKSTART_L1, "l1_filter/ratio": 0.133})
    study.enqueue_trial({**QUICKSTART_L1, "l1_filter/ratio": 0.129})
    key = EffectiveRecipes(space)
    first = ask_distinct(study, SpaceDefinition(space), key=key)
    tell_metrics(study, first.number, {"accuracy": 0.9, "macs": 10.0}, ["accuracy", "macs"], ())
    second = ask_distinct(study, SpaceDefinition(space), key=key)
    refused = study.trials[1]
    assert (refused.params["l1_filter/ratio"], refused.state, refused.user_attrs[DUPLICATE_OF]) == (
        0.129,
        optuna.trial.TrialState.FAIL,
        first.number,
    )
    assert second.number == 2 and key(second.params) != key(first.params)


def test_the_effective_recipe_holds_the_enabled_methods_and_resolves_each() -> None:
    from search.driver.duplicates import EffectiveRecipes

    key = EffectiveRecipes(load_space(QUICKSTART))
    l1 = {**QUICKSTART_L1, "l1_filter/ratio": 0.133}
    assert key(l1) == key({**l1, "l1_filter/ratio": 0.129}) != key({**l1, "l1_filter/ratio": 0.141})
    with_kd = {**l1, "kd/use": True, "kd/temperature": 4.0, "kd/weight": 1.0}
    assert [name for name, _ in key(with_kd)] == ["l1_filter", "kd"]
    assert key(with_kd) != key(l1) and key(with_kd) == key({**with_kd, "l1_filter/ratio": 0.129})
    # kd keeps its values as they are: another temperature is another trial.
    assert key(with_kd) != key({**with_kd, "kd/temperature": 4.5})
    # minmax_quant follows l1_filter, which changes the architecture: compared as sampled (its bits are ints anyway).
    quantized = {**l1, "minmax_quant/use": True, "minmax_quant/bits": 4}
    assert dict(key(quantized))["minmax_quant"] == tuple(sorted(asdict(create_method("minmax_quant", {"bits": 4}).config).items()))
