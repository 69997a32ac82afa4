"""The Optuna samplers a space can name, and asking a study for a configuration not tried yet.

Used by the Tune searcher (:mod:`search.driver._tune`, :mod:`search.driver._private`, which also
ends trials with their metrics: ``tell_metrics``) and by
``bench/search_quality.py``, which measured the default: see README's "Choosing a sampler".
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import optuna

from search.results.record import DUPLICATE_OF, MAX_ASKS

__all__ = [
    "make_sampler",
    "PicklableNSGAIISampler",
    "startup_trials",
    "good_trials",
    "population_size",
    "config_key",
    "ask_distinct",
    "SAMPLER_ASKS",
    "QUALITY_CONSTRAINT",
]

#: The constraint every finished trial carries in the study: 1 when its result cannot be
#: trusted (diverged, or at chance), else 0.
QUALITY_CONSTRAINT = "quality"

#: Of those, the asks answered by the study's sampler; the rest sample at random.
SAMPLER_ASKS = 3

#: Trial states whose configuration counts as tried: running or waiting (another trial is on it)
#: and finished with a result (complete, or stopped early by a scheduler). A failed trial's
#: configuration may be proposed again.
TRIED = (
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
)


def startup_trials(trials: int) -> int:
    """Random trials before a model-based sampler (TPE, GP) fits: a quarter of the budget, 4 to 10."""
    return max(4, min(10, trials // 4))


def good_trials(finished: int) -> int:
    """How many of the ``finished`` trials TPE models as good: a quarter, the best by Pareto rank.

    Optuna's multi-objective default is a tenth (one or two trials at a laptop's budget), which
    keeps proposals near one or two points of a front that has many; a quarter spreads them along it.
    """
    return math.ceil(0.25 * finished)


def population_size(trials: int) -> int:
    """NSGA-II's population for a budget of ``trials``: about four generations, 4 to 50."""
    return max(4, min(50, trials // 4))


#: The types of the locks a sampler may hold (``threading.Lock()`` and ``threading.RLock()``).
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler that pickles without its locks and makes new ones when unpickled.

    Tune pickles the searcher, and with it the sampler, into its experiment state; Optuna's
    NSGA-II sampler holds a lock (Optuna 5.1), which cannot be pickled. A lock guards only the
    process it lives in, so a fresh one is what an unpickled sampler needs.
    """

    def __getstate__(self) -> dict[str, Any]:
        """Called by pickle: every attribute, each lock replaced by the name of its type."""
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, _LOCK_TYPES):
                state[key] = _LockPlaceholder(reentrant=not isinstance(value, _LOCK_TYPES[0]))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Called by pickle: the attributes back, each lock a new one of its type."""
        for key, value in state.items():
            if isinstance(value, _LockPlaceholder):
                state[key] = threading.RLock() if value.reentrant else threading.Lock()
        self.__dict__.update(state)


class _LockPlaceholder:
    """Where a pickled sampler had a lock: whether it was reentrant."""

    def __init__(self, reentrant: bool) -> None:
        self.reentrant = reentrant


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (``tpe``, ``nsga2``, ``gp`` or ``random``), seeded and sized for ``trials``.

    Called once per search when its study is created (and by the bench for each run).
    TPE is multivariate over groups of parameters that appear together (a method's parameters
    exist only when the method is on) and puts a running trial's configuration among the bad
    ones while it runs (constant liar), so concurrent trials are steered apart; it models a
    quarter of the finished trials as good (:func:`good_trials`). Constraints
    reach every sampler through ``Trial.set_constraint``.

    Raises:
        ValueError: ``name`` is not one of the four.
    """
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # ``group``
            # ``gamma`` is deprecated from Optuna 4.9 and removed in 6; pyproject pins optuna < 6.
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.TPESampler(
                seed=seed,
                multivariate=True,
                group=True,
                constant_liar=True,
                n_startup_trials=startup_trials(trials),
                gamma=good_trials,
            )
    if name == "nsga2":
        return PicklableNSGAIISampler(population_size=population_size(trials), seed=seed)
    if name == "gp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(trials))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Imported here: ``slimtune pareto`` counts trials through this module without torch, which search.space.spec loads.
    from search.space.spec import SAMPLERS

    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}.")


def config_key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What makes two trials the same configuration: their sampled parameters, by name."""
    return tuple(sorted(params.items()))


def ask_distinct(
    study: optuna.Study,
    define: Callable[[optuna.Trial], Any],
    max_asks: int = MAX_ASKS,
    sampler_asks: int = SAMPLER_ASKS,
    key: Callable[[dict[str, Any]], Hashable] = config_key,
) -> optuna.Trial | None:
    """Ask ``study`` for a trial whose configuration no running or finished trial has.

    Called whenever a new trial is to start. ``define`` samples the configuration on the asked
    trial (the space's define-by-run function). Two trials have the same configuration when
    ``key`` maps their parameters to equal values: the parameters themselves by default, what
    they will build in a search (:class:`search.driver.duplicates.EffectiveRecipes`). A trial found equal to a tried one is refused:
    it stays running while the study is asked again, so a sampler that reads running trials
    (TPE's constant liar, GP's pending points) steers away from it, and is then closed as FAIL
    with the user attribute :data:`DUPLICATE_OF` (the tried trial's number); samplers skip
    failed trials, so the refusal leaves nothing behind that they learn from. The study's
    sampler proposes the first ``sampler_asks`` times; the remaining asks sample at random
    (seeded by the study's trial count, so a seeded search stays reproducible), for a sampler
    that has converged on a tried configuration.

    Returns:
        The new trial, still running; None when ``max_asks`` proposals in a row were all tried
        already (the space is exhausted).
    """
    sampler = study.sampler
    refused: list[optuna.Trial] = []
    try:
        for attempt in range(max_asks):
            if attempt == sampler_asks:
                study.sampler = optuna.samplers.RandomSampler(seed=len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            define(trial)
            proposed = key(trial.params)
            twin = next(
                (
                    other.number
                    for other in study.get_trials(deepcopy=False, states=TRIED)
                    if other.number != trial.number and DUPLICATE_OF not in other.user_attrs and key(other.params) == proposed
                ),
                None,
            )
            if twin is None:
                return trial
            trial.set_user_attr(DUPLICATE_OF, twin)
            refused.append(trial)
        return None
    finally:
        study.sampler = sampler
        for trial in refused:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
