"""What a proposed trial will build: the key under which the duplicate check compares trials.

Two proposals are the same trial when their pipelines would build and train the same model:
the same methods in the same order, each with the same *effective* configuration
(:meth:`methods.Method.effective_config`: a pruning ratio counts as the channels it keeps on the
space's model, so ratios 0.133 and 0.129 that remove the same channels are one trial). A method
resolves against facts about the model it will see (:meth:`methods.Method.model_facts`), which
are read once per search from the space's model as the baseline is built; a method after one that
changes the architecture sees another model, so its values are compared as they are. A disabled
method's parameters are never sampled, so they cannot tell two proposals apart.

Used by the searcher (:func:`search.driver._tune.make_searcher`) through
:func:`search.driver.samplers.ask_distinct`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import asdict
from typing import Any

from methods import NotApplicable, create_method, get_method
from search.driver.samplers import config_key
from search.space.spec import SearchSpace
from search.trial.body import recipe_from_config
from search.trial.context import build_model, load_task

__all__ = ["EffectiveRecipes", "unflatten"]


def unflatten(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Optuna's flat parameters (``{"l1_filter/ratio": 0.3}``) as Ray hands them to a trial (``{"l1_filter": {"ratio": 0.3}}``)."""
    config: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        method, _, param = name.partition("/")
        config.setdefault(method, {})[param] = value
    return config


class EffectiveRecipes:
    """The duplicate check's key of a trial's parameters: its pipeline as it will build, method by method.

    Called by :func:`search.driver.samplers.ask_distinct` for every proposal and for every tried
    trial; a key is computed once per distinct set of parameters. The model facts are read on the
    first call (the space's model is built once, on the CPU, untrained) and are not pickled with
    the searcher: a resumed search reads them again.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self._facts: dict[str, Any] | None = None
        self._keys: dict[tuple, Hashable] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"space": self.space, "_facts": None, "_keys": {}}

    def facts(self) -> dict[str, Any]:
        """Each method's :meth:`~methods.Method.model_facts` on the space's model; None where the method declines it."""
        if self._facts is None:
            task = load_task(self.space)
            model = build_model(self.space, task)
            example = task.example_input(1)
            self._facts = {}
            for method in self.space.methods:
                try:
                    self._facts[method.name] = get_method(method.name).model_facts(model, example)
                except NotApplicable:  # the trials fail with the method's reason; compare them as they are
                    self._facts[method.name] = None
        return self._facts

    def __call__(self, params: dict[str, Any]) -> Hashable:
        raw = config_key(params)
        if raw not in self._keys:
            self._keys[raw] = self._resolve(params)
        return self._keys[raw]

    def _resolve(self, params: dict[str, Any]) -> Hashable:
        recipe = recipe_from_config(self.space, unflatten(params))
        key = []
        restructured = False  # by an earlier method: the model facts no longer describe what a method sees
        for step in recipe:
            cls = get_method(step["name"])
            try:
                config = create_method(step["name"], step["params"]).config
            except ValueError:  # the trial will fail on it; compare its parameters as they are
                return ("as sampled", config_key(params))
            values = asdict(config) if restructured else cls.effective_config(config, self.facts()[step["name"]])
            key.append((step["name"], tuple(sorted(values.items()))))
            restructured = restructured or cls.changes_architecture
        return tuple(key)
