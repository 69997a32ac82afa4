"""Every use of Ray's and Optuna's private APIs, in one module.

These attributes are not part of either library's public interface and may change in any
release, so ``pyproject.toml`` pins both libraries to the ranges they were checked against, and
importing this module fails with the package, the version found and the range when the installed
Ray or Optuna is outside it (``check_versions``).
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable, Hashable
from importlib import metadata
from typing import TYPE_CHECKING, Any

import optuna
import ray
import ray._private.ray_constants as ray_constants
import ray._private.services as ray_services
import ray.tune.execution.class_cache as tune_class_cache
from packaging.requirements import Requirement
from ray._raylet import AuthenticationTokenLoader
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from errors import UserError
from search.driver.samplers import QUALITY_CONSTRAINT, ask_distinct, config_key
from search.space.objectives import Constraint, constraint_values

if TYPE_CHECKING:
    from search.space.spec import SearchSpace

__all__ = [
    "check_versions",
    "keep_ray_on_loopback",
    "init_local_ray_with_workers",
    "trial_actors_in_started_workers",
    "answer_loopback_as_node_address",
    "forget_cached_ray_token",
    "stop_tune_run",
    "open_trial",
    "tell_metrics",
    "fail_open_trials",
    "prune_trial",
    "SlimtuneOptunaSearch",
    "TRIAL_NUMBER",
]

#: The config key (set by the space definition) that carries the Optuna trial number to Tune.
TRIAL_NUMBER = "trial_number"

#: The libraries whose private APIs this module uses.
CHECKED_PACKAGES = ("ray", "optuna")


def check_versions(packages: tuple[str, ...] = CHECKED_PACKAGES) -> None:
    """Raise UserError when an installed package is outside slimtune's declared range for it.

    The ranges come from slimtune's installed metadata (``pyproject.toml``'s dependencies); a
    checkout that is not installed has no metadata and is not checked here (the test suite
    checks ``pyproject.toml`` itself).
    """
    try:
        requirements = [Requirement(text) for text in metadata.requires("slimtune") or []]
    except metadata.PackageNotFoundError:
        return
    for requirement in requirements:
        if requirement.name not in packages or requirement.marker is not None:
            continue
        found = metadata.version(requirement.name)
        if not requirement.specifier.contains(found, prereleases=True):
            raise UserError(
                f"slimtune uses private APIs of {requirement.name} checked with {requirement.name}{requirement.specifier}, "
                f"but {requirement.name} {found} is installed. Install a version in that range: "
                f"pip install '{requirement.name}{requirement.specifier}'."
            )


check_versions()


def keep_ray_on_loopback() -> None:
    """Keep a driver that reaches Ray at a loopback address on 127.0.0.1.

    Ray swaps a loopback address for the machine's network address unless its cluster mode is
    off; the constant is read by this already-imported driver (the environment variable
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` does the same for the processes Ray starts).
    """
    ray_constants.ENABLE_RAY_CLUSTER = False


def init_local_ray_with_workers(modules: list[str], workers: int, **kwargs: Any) -> None:
    """``ray.init`` a local Ray whose workers import ``modules`` as they start, about ``workers`` of them started now.

    Ray's ``preload_python_modules`` setting has a worker import ``modules`` before it takes its
    first task (900 MB of memory and seconds of CPU each with torch and the trial's code). Ray
    starts one worker per CPU as the driver connects; on a machine with more CPUs than
    ``workers`` + 1 that start is turned off, and ``workers`` tasks that need no CPU ask for
    workers instead (Ray 2.60 starts one more with the first request), which then wait idle for
    the job's first tasks and actors (Tune's trial actors: :func:`trial_actors_in_started_workers`).
    ``kwargs`` go to ``ray.init``.
    """
    one_per_cpu = (os.cpu_count() or 1) <= workers + 1
    system_config = {"preload_python_modules": list(modules), "prestart_worker_first_driver": one_per_cpu}
    ray.init(address="local", _node_ip_address="127.0.0.1", _system_config=system_config, **kwargs)
    if not one_per_cpu:
        for _ in range(workers):
            _worker_pid.remote()  # runs though its result is dropped


@ray.remote(num_cpus=0)
def _worker_pid() -> int:
    return os.getpid()


#: The environment the workers of the local Ray this process started inherited; None: Ray is a cluster's.
_WORKERS_ENVIRONMENT: dict[str, str] | None = None


def trial_actors_in_started_workers(local: bool) -> None:
    """Let Tune's trial actors take the workers a local Ray started ahead (:func:`init_local_ray_with_workers`).

    Called by the driver just before it starts (``local``) or reaches Ray. Tune gives each trial
    actor a runtime env of environment variables (``PL_DISABLE_FORK=1``, and the driver's own
    AWS and Ray Train variables); Ray runs an actor whose runtime env is not the job's in a new
    worker only, which imports torch again (20-30 s on a loaded 2-core machine). A local Ray's
    workers inherit the driver's environment: once it holds those variables, with the same
    values when Tune creates the actors, the actors need no runtime env and take a started
    worker. On a cluster, or when a value differs, Tune's runtime env stays.
    """
    global _WORKERS_ENVIRONMENT
    if local:
        for name, value in tune_class_cache.DEFAULT_ENV_VARS.items():
            os.environ.setdefault(name, value)
        _WORKERS_ENVIRONMENT = dict(os.environ)
    else:
        _WORKERS_ENVIRONMENT = None
    cache = tune_class_cache._ActorClassCache
    if getattr(cache.get, "_slimtune", False):
        return
    tune_get = cache.get

    def get(self, trainable_cls):
        wanted = dict(tune_class_cache.DEFAULT_ENV_VARS)
        wanted.update({name: os.environ[name] for name in tune_class_cache.ENV_VARS_TO_PROPAGATE if name in os.environ})
        inherited = _WORKERS_ENVIRONMENT
        if inherited is None or any(inherited.get(name) != value for name, value in wanted.items()):
            return tune_get(self, trainable_cls)
        if trainable_cls not in self._cache:
            self._cache[trainable_cls] = ray.remote(trainable_cls)
        return self._cache[trainable_cls]

    get._slimtune = True
    cache.get = get


def answer_loopback_as_node_address() -> None:
    """Make this process's Ray answer "which address do I have" with 127.0.0.1.

    Called by a node started with ``python -m search.driver.local_cluster start`` before Ray's
    command line loads, so that a node given ``--node-ip-address=127.0.0.1`` stays there.
    """
    ray_services.node_ip_address_from_perspective = lambda *args, **kwargs: "127.0.0.1"


def forget_cached_ray_token() -> None:
    """Make this process read Ray's authentication token from the environment again (Ray caches the first one)."""
    AuthenticationTokenLoader.instance().reset_cache()


def stop_tune_run() -> None:
    """End the running ``Tuner.fit`` as its own Ctrl-C handler does: the loop stops, the state is saved.

    Tune's run loop ends when its "experiment interrupted" event is set, which only its signal
    handlers can reach; the SIGUSR1 handler (installed by every ``Tuner.fit`` in the main
    thread, whatever ``TUNE_DISABLE_SIGINT_HANDLER`` says) sets it. Trials still running stay
    RUNNING in the saved state and continue from their last checkpoint on restore.
    """
    os.kill(os.getpid(), signal.SIGUSR1)


def open_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """Trial ``number`` of ``study`` as an :class:`optuna.Trial`, to set its attributes (Optuna has no public lookup)."""
    return optuna.Trial(study, study.get_trials(deepcopy=False)[number]._trial_id)


def tell_metrics(
    study: optuna.Study, number: int, metrics: dict[str, Any] | None, objectives: list[str], constraints: tuple[Constraint, ...]
) -> bool:
    """End trial ``number`` with a trial's final ``metrics``, or as FAIL when there are none.

    Called once per trial when it ends. The study keeps the numeric metrics, the recipe and one
    constraint value per constraint (<= 0 when it holds), plus
    :data:`search.driver.samplers.QUALITY_CONSTRAINT`, which samplers and ``best_trials`` read.
    A missing or non-finite objective fails the trial: it is never a point of the front.

    Returns:
        Whether the trial ended COMPLETE.
    """
    trial = open_trial(study, number)
    if metrics is not None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        trial.set_user_attr("metrics", numbers)
        trial.set_user_attr("recipe", metrics.get("recipe", "[]"))
        for constraint, value in zip(constraints, constraint_values(constraints, numbers)):
            trial.set_constraint(str(constraint), value)
        # A diverged trial or one at chance (search.trial.body.trial_quality) is infeasible, as
        # the ranking counts it, so samplers and best_trials never take it for a good result.
        trial.set_constraint(QUALITY_CONSTRAINT, 1.0 if numbers.get("diverged") or numbers.get("at_chance") else 0.0)
        # Optuna ends a trial with a missing or non-finite objective as FAIL (with a warning).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ended = study.tell(number, [numbers.get(m) for m in objectives])
        return ended.state == optuna.trial.TrialState.COMPLETE
    study.tell(number, state=optuna.trial.TrialState.FAIL)
    return False


def fail_open_trials(study: optuna.Study, reason: str) -> list[int]:
    """End every RUNNING trial of ``study`` as FAIL with ``failure_reason``; return their numbers."""
    numbers = []
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study._storage.set_trial_user_attr(trial._trial_id, "failure_reason", reason)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        numbers.append(trial.number)
    return numbers


def prune_trial(study: optuna.Study, number: int, user_attrs: dict[str, Any]) -> bool:
    """End trial ``number`` as PRUNED with ``user_attrs``; False (and nothing written) when it had already ended."""
    stored = study.get_trials(deepcopy=False)[number]
    if stored.state.is_finished():
        return False
    for key, value in user_attrs.items():
        study._storage.set_trial_user_attr(stored._trial_id, key, value)
    study.tell(number, state=optuna.trial.TrialState.PRUNED)
    return True


class SlimtuneOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that finds a trial's Optuna record by its number and stores its result.

    The study then holds everything ``slimtune pareto`` and ``slimtune export`` need (metrics,
    recipe, constraints). Ray's searcher keeps a Tune trial id -> Optuna trial map in memory and
    in its saved state, which can lag behind the trials a resumed Tune continues; the trial's
    number (in its config and so in every result) finds the Optuna trial either way. A trial
    that ends without its final result counts as failed, never as a completed point; a trial
    the study has already ended keeps its one record.
    """

    def __init__(
        self, *args: Any, search_space: SearchSpace, trial_key: Callable[[dict[str, Any]], Hashable] = config_key, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._slimtune_space = search_space
        self._slimtune_trial_key = trial_key

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Called by Tune when a trial ends (finished, errored, or stopped before it ran)."""
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        number = ot_trial.number if ot_trial is not None else (result or {}).get(f"config/{TRIAL_NUMBER}")
        if number is None:
            return  # never asked for by this study: nothing to record
        stored = self._ot_study.get_trials(deepcopy=False)[number]
        if stored.state.is_finished():
            return
        open_trial(self._ot_study, number).set_user_attr("tune_trial_id", trial_id)
        final = result if result and not error and result.get("final") else None
        space = self._slimtune_space
        tell_metrics(self._ot_study, number, final, space.metric_names, space.constraints)

    def suggest(self, trial_id: str) -> dict | str | None:
        """Called by Tune for each new trial: a configuration no running or finished trial has.

        Ends the search (Tune's ``FINISHED``) when :func:`search.driver.samplers.ask_distinct` finds
        only tried configurations, as in a small discrete space with more trials than members.
        """
        if trial_id not in self._ot_trials:
            trial = ask_distinct(
                self._ot_study,
                lambda t: self._suggest_from_define_by_run_func(self._space, t),
                key=getattr(self, "_slimtune_trial_key", config_key),  # a searcher pickled before the key existed
            )
            if trial is None:
                return Searcher.FINISHED
            self._ot_trials[trial_id] = trial
        return super().suggest(trial_id)
