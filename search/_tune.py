"""The Ray Tune and Optuna pieces of a search (imported only when a search runs).

Everything here is a module-level class so Tune can pickle it into its experiment state,
which is what lets ``slimtune resume`` continue after the driver dies.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from methods import get_method, hyperparameters
from search.space import SearchSpace
from search.trial import recipe_from_config

__all__ = ["SpaceDefinition", "make_sampler", "make_searcher", "TrialTracker", "constraint_values"]


def constraint_values(space: SearchSpace, metrics: dict[str, float]) -> list[float]:
    """Optuna's convention: one value per constraint, <= 0 when it holds."""
    values = []
    for c in space.constraints:
        value = metrics[c.metric]
        values.append(value - c.bound if c.op == "<=" else c.bound - value)
    return values


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """NSGA-II (default), TPE or random, seeded.

    Constraints reach the samplers through ``Trial.set_constraint`` (see
    :class:`SlimtuneOptunaSearch`), which Optuna 5's samplers and ``best_trials`` read.
    """
    if space.sampler == "nsga2":
        # A small population lets a laptop-sized budget run several generations.
        population = max(4, min(50, space.budget.trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=space.seed)
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=max(2, min(10, space.budget.trials // 3)))
    return optuna.samplers.RandomSampler(seed=space.seed)


class SpaceDefinition:
    """Optuna define-by-run space: a method's parameters are sampled only when the method is on.

    Parameter names are ``method/param`` (``method/use`` for the on/off choice); Ray unflattens
    them into ``{"method": {"param": value}}`` for the trial.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, int]:
        optional = [m.name for m in self.space.methods if m.optional]
        any_used = any(not m.optional for m in self.space.methods)
        for method in self.space.methods:
            # A trial with every method off would only re-measure the baseline: the last
            # optional method is forced on when nothing was chosen before it.
            forced_on = method.optional and not any_used and method.name == optional[-1]
            if method.optional and not forced_on and not trial.suggest_categorical(f"{method.name}/use", [True, False]):
                continue
            any_used = True
            types = {h.name: h.type for h in hyperparameters(get_method(method.name).Config)}
            for pname, rng in method.searched.items():
                key = f"{method.name}/{pname}"
                if rng.choices is not None:
                    trial.suggest_categorical(key, list(rng.choices))
                elif types[pname] is int:
                    trial.suggest_int(key, int(rng.low), int(rng.high), step=int(rng.step or 1), log=rng.log)
                else:
                    trial.suggest_float(key, float(rng.low), float(rng.high), step=rng.step, log=rng.log)
        # One name per trial everywhere (progress line, MLflow run, Pareto table): Optuna's number.
        return {"trial_number": trial.number}


class SlimtuneOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that also stores each trial's metrics, recipe and constraints in the study.

    The study then holds everything ``slimtune pareto`` and ``slimtune export`` need. A trial
    that ends without its final result counts as failed, never as a completed point.
    """

    def __init__(self, *args: Any, search_space: SearchSpace, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slimtune_space = search_space

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._already_told(ot_trial):
            # A resumed search may replay the end of a trial the study has already recorded
            # (Tune's experiment state lags the study): the study keeps its one record.
            self._completed_trials.add(trial_id)
            return
        if ot_trial is not None and trial_id not in self._completed_trials:
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            if result and not error and result.get("final"):
                metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                ot_trial.set_user_attr("metrics", metrics)
                ot_trial.set_user_attr("recipe", result.get("recipe", "[]"))
                for constraint, value in zip(self._slimtune_space.constraints, constraint_values(self._slimtune_space, metrics)):
                    ot_trial.set_constraint(str(constraint), value)
            elif result:
                result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)


    def _already_told(self, ot_trial) -> bool:
        stored = self._ot_study.get_trials(deepcopy=False)[ot_trial.number]
        return stored.state.is_finished()


def make_searcher(space: SearchSpace, study_name: str, storage_url: str) -> SlimtuneOptunaSearch:
    """The searcher over a persistent Optuna study named after the search."""
    return SlimtuneOptunaSearch(
        space=SpaceDefinition(space),
        metric=space.metric_names,
        mode=space.modes,
        sampler=make_sampler(space),
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage_url),
        seed=space.seed,
        search_space=space,
    )


class TrialTracker(tune.Callback):
    """Writes every trial to MLflow from the driver and prints one line per finished trial."""

    def __init__(self, record) -> None:
        self.record = record

    def _finished_count(self) -> int:
        # Counted from the run map, so a resumed search goes on counting where it stopped.
        return sum(1 for run in self.record.tracker().runs().values() if run.get("status") in ("FINISHED", "FAILED"))

    def _run_id(self, trial) -> str:
        recipe = recipe_from_config(self.record.space, trial.config)
        return self.record.tracker().child_run(self.record.parent_run_id, trial.trial_id, recipe, trial_name=trial_name(trial))

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self._run_id(trial)
        if result.get("node_id"):
            self.record.tracker().note_node(trial.trial_id, run_id, result["node_id"], result.get("pid"))
        if result.get("final"):
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.record.tracker().log_epoch(trial.trial_id, run_id, result, step=step)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        from search.runner import print_progress

        result = trial.last_result or {}
        run_id = self._run_id(trial)
        if not result.get("final"):
            self.record.tracker().fail_trial(trial.trial_id, run_id, "the trial ended without a final result")
            return
        checkpoint = checkpoint_uri(trial.checkpoint) if trial.checkpoint is not None else None
        self.record.tracker().finish_trial(trial.trial_id, run_id, result, checkpoint)
        print_progress(self.record, trial_name(trial), result, self._finished_count())

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = error_reason(trial)
        self.record.tracker().fail_trial(trial.trial_id, self._run_id(trial), reason)
        print(f"[slimtune] {trial_name(trial)} FAILED ({self._finished_count()}/{self.record.space.budget.trials} done): {reason}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        print(f"[slimtune] {trial_name(trial)} failed ({error_reason(trial)}); retrying from its last checkpoint", flush=True)


def checkpoint_uri(checkpoint) -> str:
    """A local path, or ``s3://...`` / ``gs://...`` when Tune's storage is remote."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def trial_name(trial) -> str:
    """``trial_007``: the Optuna trial number, the name a trial has everywhere in slimtune."""
    return f"trial_{trial.config.get('trial_number', 0):03d}"


def error_reason(trial) -> str:
    """The exception that ended a trial, as one line.

    Read from the files Tune has just written beside the trial (its copy in the experiment's
    storage is synced later, so ``trial.get_error()`` can still be empty here).
    """
    text = ""
    for path in (trial.error_file, getattr(trial, "pickled_error_file", None)):
        if path and Path(path).is_file() and path.endswith(".txt"):
            text = Path(path).read_text()
            break
    if not text:
        try:
            error = trial.get_pickled_error() or trial.get_error()
        except Exception:  # noqa: BLE001  a missing error file must not break the search
            error = None
        text = str(error) if error is not None else ""
    # The traceback ends with "module.ErrorType: message"; keep that line, without the module.
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error (see the trial's error.txt)"
    match = re.match(r"^([A-Za-z_][\w.]*): (.*)$", lines[-1])
    return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}" if match else lines[-1]
