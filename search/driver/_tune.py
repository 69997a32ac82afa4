"""The Ray Tune and Optuna pieces of a search (imported only when a search runs).

Everything here is a module-level class so Tune can pickle it into its experiment state,
which is what lets ``slimtune resume`` continue after the driver dies. Private Ray and Optuna
APIs stay in ``search.driver._private``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from methods import get_method, hyperparameters
from search.driver import samplers
from search.driver._private import TRIAL_NUMBER, SlimtuneOptunaSearch, prune_trial, stop_tune_run
from search.driver.duplicates import EffectiveRecipes
from search.driver.halving import Rungs, milestones
from search.results.record import SearchRecord, exported_model_dir, open_optuna_storage, search_progress, study_trials, trial_state
from search.results.report import Reporter
from search.space.objectives import epoch_key
from search.space.spec import SearchSpace
from search.trial.body import TrialSpec, recipe_from_config, run_trial
from search.trial.graceful_stop import GracefulStop, sigint_stops_gracefully
from tasks import task_metrics

__all__ = [
    "SpaceDefinition",
    "make_sampler",
    "make_searcher",
    "make_scheduler",
    "MultiObjectiveASHA",
    "ScalarASHA",
    "TrialTracker",
    "fit",
    "reuse_trial_actors",
]


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded and sized for its budget (:func:`search.driver.samplers.make_sampler`)."""
    return samplers.make_sampler(space.sampler, space.seed, space.budget.trials)


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
        return {TRIAL_NUMBER: trial.number}


def make_searcher(space: SearchSpace, study_name: str, storage_url: str, first_points: list[dict] | None = None) -> SlimtuneOptunaSearch:
    """The searcher over a persistent Optuna study named after the search.

    ``first_points`` (Optuna parameters, as :func:`search.driver.warm_start.warm_start_points` makes
    them) are enqueued in the study and become its first trials.
    """
    return SlimtuneOptunaSearch(
        space=SpaceDefinition(space),
        metric=space.metric_names,
        mode=space.modes,
        sampler=make_sampler(space),
        study_name=study_name,
        storage=open_optuna_storage(storage_url),
        seed=space.seed,
        search_space=space,
        trial_key=EffectiveRecipes(space),
        points_to_evaluate=first_points or None,
    )


# ----------------------------------------------------------------------------------------------
# Early stopping (``budget.scheduler``).
# ----------------------------------------------------------------------------------------------


class StoppedTrials:
    """Ends a trial that a scheduler stops as PRUNED in the study, with its last epoch's figures.

    Written before Tune stops the trial, so that the searcher, the MLflow callback and the
    close-out all find the trial's outcome where every other outcome is: in the study.
    """

    def __init__(self, study_name: str, storage_url: str) -> None:
        self.study_name = study_name
        self.storage_url = storage_url
        self._study: optuna.Study | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_study": None}

    def settle(self, trial, result: dict, goes_on: bool) -> str:
        """Called by a scheduler with its verdict on a per-epoch result; returns Tune's decision."""
        if goes_on or result.get("final"):
            return TrialScheduler.CONTINUE
        if self._study is None:
            self._study = optuna.load_study(study_name=self.study_name, storage=open_optuna_storage(self.storage_url))
        figures = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        attrs = {
            "metrics": figures,
            "recipe": result.get("recipe", "[]"),
            "tune_trial_id": trial.trial_id,
            "stopped_at_epoch": int(result["epoch"]),
        }
        prune_trial(self._study, trial.config[TRIAL_NUMBER], attrs)
        return TrialScheduler.STOP


class MultiObjectiveASHA(FIFOScheduler):
    """Asynchronous successive halving on each epoch's objective vector (:class:`search.driver.halving.Rungs`)."""

    def __init__(self, rungs: Rungs, stops: StoppedTrials) -> None:
        super().__init__()
        self.rungs = rungs
        self.stops = stops

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """Called by Tune with every result a trial reports."""
        goes_on = "epoch" not in result or self.rungs.goes_on(trial.trial_id, int(result["epoch"]), result)
        return self.stops.settle(trial, result, goes_on)


class ScalarASHA(ASHAScheduler):
    """Tune's ASHA on one per-epoch metric; a trial it stops ends PRUNED in the study.

    A trial that has trained ``max_t`` epochs (the longest pipeline) has no epoch left to save:
    it goes on to its final result, where Tune's ASHA would stop it (and a search whose every
    pipeline is that long would end with no completed trial).
    """

    def __init__(self, stops: StoppedTrials, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stops = stops
        self.last_epoch = kwargs["max_t"]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """Called by Tune with every result a trial reports."""
        if result.get("epoch", 0) >= self.last_epoch:
            return self.stops.settle(trial, result, True)
        decision = super().on_trial_result(tune_controller, trial, result)
        return self.stops.settle(trial, result, decision != TrialScheduler.STOP)


def make_scheduler(record: SearchRecord) -> TrialScheduler | None:
    """The scheduler ``budget.scheduler`` names (None: Tune's FIFO, every trial runs to its end).

    Rungs are counted in the epochs a trial has trained (the ``epoch`` of its results, across
    all of its methods' phases); the last rung lies below the longest pipeline the space allows
    (``budget.epochs`` per method).
    """
    space = record.space
    budget = space.budget
    if budget.scheduler == "fifo":
        return None
    stops = StoppedTrials(record.name, record.optuna_storage)
    max_epochs = budget.epochs * len(space.methods)
    quality = tuple(task_metrics(space.task))
    if budget.scheduler == "asha":
        first = space.objectives[0]
        return ScalarASHA(
            stops,
            time_attr="epoch",
            metric=epoch_key(first.metric, quality),
            mode=first.direction,
            max_t=max_epochs,
            grace_period=budget.grace,
            reduction_factor=budget.reduction_factor,
        )
    rungs = Rungs(
        objectives=tuple(space.objectives),
        constraints=tuple(space.constraints),
        quality=quality,
        milestones=milestones(budget.grace, budget.reduction_factor, max_epochs),
        reduction_factor=budget.reduction_factor,
    )
    return MultiObjectiveASHA(rungs, stops)


class TrialTracker(tune.Callback):
    """Writes every trial to MLflow from the driver and reports one line per finished trial.

    Called by Tune after the searcher, so a trial's outcome is already in the study (the source
    of truth) when MLflow and the run map are written and the line is printed.
    """

    def __init__(self, record: SearchRecord, reporter: Reporter) -> None:
        self.record = record
        self.reporter = reporter

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
        tracker = self.record.tracker()
        if tracker.runs().get(trial.trial_id, {}).get("status") == "FINISHED":
            return  # a resumed Tune replayed the end of a trial that was already recorded
        result = trial.last_result or {}
        run_id = self._run_id(trial)
        state = trial_state(self.record, trial.config.get(TRIAL_NUMBER, -1))
        if state == "PRUNED":
            epoch = int(result.get("epoch", 0))
            tracker.stop_trial_early(trial.trial_id, run_id, epoch)
            self.reporter.trial_stopped(self.record, trial_name(trial), result, search_progress(self.record))
            return
        if state != "COMPLETE":
            reason = "the trial ended without a final result" if not result.get("final") else f"the study recorded the trial as {state}"
            tracker.fail_trial(trial.trial_id, run_id, reason)
            return
        checkpoint = checkpoint_uri(trial.checkpoint) if trial.checkpoint is not None else None
        # Files the methods wrote about the final model (decouple's report) go to every trial's run.
        with exported_model_dir(checkpoint) as model_dir:
            if model_dir is not None and (model_dir / "artifacts").is_dir():
                tracker.client.log_artifacts(run_id, str(model_dir / "artifacts"), "artifacts")
        tracker.finish_trial(trial.trial_id, run_id, result, checkpoint)
        self.reporter.trial_done(self.record, trial_name(trial), result, search_progress(self.record))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = error_reason(trial)
        self.record.tracker().fail_trial(trial.trial_id, self._run_id(trial), reason)
        self.reporter.trial_failed(self.record, trial_name(trial), reason, search_progress(self.record))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.reporter.trial_retried(trial_name(trial), error_reason(trial))


def fit(record: SearchRecord, reporter: Reporter, restore: bool) -> None:
    """Run (or, with ``restore``, continue) the trials on the Ray that the driver reached.

    Returns when every trial has ended or when Tune stopped on the first SIGINT (after the
    running trials saved a checkpoint at the end of their epoch; see ``search.trial.graceful_stop``).
    Those trials stay RUNNING in the study and continue on ``resume``; a second SIGINT raises
    KeyboardInterrupt at once.
    """
    space = record.space
    # Tune logs each failed trial's traceback; slimtune prints one line with the reason and the
    # full traceback stays in the trial's error.txt and in MLflow.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    baseline_state = torch.load(record.folder / "baseline.pt", weights_only=True)
    spec = TrialSpec(space=space, baseline_state=baseline_state, baseline_metrics=record.baseline_metrics)
    resources = {"cpu": space.budget.cpus_per_trial, "gpu": space.budget.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)
    storage = record.checkpoint_storage
    experiment = f"{storage.rstrip('/')}/tune"
    if restore and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        # A search stopped before Tune first saved its state starts Tune afresh for the trials
        # its study does not hold yet.
        remaining = record.trials - search_progress(record).done
        if remaining <= 0:
            return
        # Warm-start points go into the study once, before its first trial.
        first_points = record.warm_start_points if not study_trials(record) else None
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, record.name, record.optuna_storage, first_points),
                scheduler=make_scheduler(record),
                num_samples=remaining,
                max_concurrent_trials=space.budget.concurrent,
                reuse_actors=reuse_trial_actors(),
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=storage,
                verbose=0,
                log_to_file=True,
                callbacks=[TrialTracker(record, reporter), GracefulStop(reporter.say, stop_tune_run)],
                failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    with sigint_stops_gracefully():
        tuner.fit()


def reuse_trial_actors() -> bool:
    """Whether a finished trial's actor runs the next trial (Tune's ``reuse_actors``): on one node only.

    Tune hands a free cached actor to a pending trial whose own actor is still starting, and
    removes that starting actor. On a cluster, the node whose trial actor starts cold (a new
    worker process importing torch) then never runs a trial while trials are shorter than that
    start: the warm node's actor takes each in turn and the other node's CPUs wait (one node of
    two ran all six trials of ``tests/clusters/test_multinode.py``). Without reuse each trial
    keeps the actor of its own placement group, so every node with a free CPU runs trials; each
    trial then pays one actor start. On one node there is no other node to leave idle, and reuse
    saves that start. The start costs a few seconds per trial: the 6 trials of 3 short epochs of
    that test took 134 and 200 s without reuse against 100 and 150 s with it (a loaded 2-core
    machine), little beside trials of minutes. Called when Tune starts a search (Ray is connected);
    a resumed search keeps the choice it started with.
    """
    return sum(1 for node in ray.nodes() if node["Alive"]) <= 1


def checkpoint_uri(checkpoint) -> str:
    """A local path, or ``s3://...`` / ``gs://...`` when Tune's storage is remote."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def trial_name(trial) -> str:
    """``trial_007``: the Optuna trial number, the name a trial has everywhere in slimtune."""
    return f"trial_{trial.config.get(TRIAL_NUMBER, 0):03d}"


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
