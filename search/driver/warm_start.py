"""``slimtune search SPACE --warm-start NAME``: an earlier search's Pareto recipes run first.

The earlier search (in the same results folder) must have compressed the same model on the
same task, both with the same options; each of its feasible Pareto-optimal recipes becomes the
Optuna parameters of one trial (``method/use`` and ``method/param``, as
``search.driver._tune.SpaceDefinition`` names them), which the searcher enqueues before its first
trial. A recipe this space cannot sample is refused, naming the trial, the method or parameter
and why.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from errors import UserError
from methods import Range, get_method, hyperparameters
from search.results.ranking import front, rank_records
from search.results.record import completed_records, load_search
from search.space.spec import MethodSpace, SearchSpace

__all__ = ["warm_start_points"]


def warm_start_points(space: SearchSpace, name: str, results_dir: str | Path) -> list[dict[str, Any]]:
    """The Optuna parameters of search ``name``'s Pareto recipes, at most ``budget.trials`` of them.

    Called by ``run_search`` before anything is written or trained.

    Raises:
        UserError: The search does not exist, ran another task or model (or other options), has
            no feasible Pareto-optimal trial, or a recipe does not fit this space.
    """
    try:
        record = load_search(name, results_dir)
    except UserError as exc:
        raise UserError(f"--warm-start {name}: {exc}") from None
    earlier = record.space
    for what, theirs, ours in (
        ("task", (earlier.task, earlier.task_options), (space.task, space.task_options)),
        ("model", (earlier.model, earlier.model_options), (space.model, space.model_options)),
    ):
        if theirs != ours:
            raise UserError(
                f"--warm-start {name}: that search ran {what} {_named(*theirs)}, this space runs {what} {_named(*ours)}; "
                f"a warm start reuses recipes on the same task and model (with the same options)."
            )
    records = completed_records(record)
    rank_records(record, records)
    best = sorted(front(records), key=lambda r: r.number)
    if not best:
        raise UserError(f"--warm-start {name}: that search has no feasible Pareto-optimal trial to start from.")
    return [_point(space, r.recipe, f"--warm-start {name}: {r.name}'s recipe") for r in best[: space.budget.trials]]


def _named(name: str, options: dict[str, Any]) -> str:
    return f"'{name}'" + (f" with options {options}" if options else "")


def _point(space: SearchSpace, recipe: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The Optuna parameters that make this space sample ``recipe``; UserError when it cannot."""
    listed = [m.name for m in space.methods]
    steps = {step["name"]: dict(step["params"]) for step in recipe}
    for method in steps:
        if method not in listed:
            raise UserError(f"{where} uses method {method}, which this space does not list under methods.")
    used_order = [m for m in listed if m in steps]
    if used_order != [step["name"] for step in recipe]:
        raise UserError(f"{where} applies {' > '.join(steps)}, but this space orders them {' > '.join(used_order)}.")
    point: dict[str, Any] = {}
    for method in space.methods:
        used = method.name in steps
        if not method.optional and not used:
            raise UserError(f"{where} does not use {method.name}, which this space always uses (optional: false).")
        if method.optional:
            point[f"{method.name}/use"] = used
        if used:
            point.update(_params(method, steps[method.name], where))
    return point


def _params(method: MethodSpace, params: dict[str, Any], where: str) -> dict[str, Any]:
    types = {h.name: h.type for h in hyperparameters(get_method(method.name).Config)}
    out = {}
    for pname, value in params.items():
        key = f"{method.name}.{pname}"
        if pname in method.fixed:
            if method.fixed[pname] != value:
                raise UserError(f"{where} has {key} = {value!r}, but this space fixes it at {method.fixed[pname]!r}.")
        elif pname in method.searched:
            outside = _outside(method.searched[pname], types[pname], value)
            if outside:
                raise UserError(f"{where} has {key} = {value!r}, {outside}.")
            out[f"{method.name}/{pname}"] = value
        else:
            raise UserError(
                f"{where} sets {key} = {value!r}, which this space leaves at the method's default; fix or search it under methods.{method.name}.params."
            )
    for pname in set(method.fixed) | set(method.searched):
        if pname not in params:
            raise UserError(
                f"{where} has no {method.name}.{pname} (its search left it at the default), which this space sets; remove it from this space or warm-start from another search."
            )
    return out


def _outside(rng: Range, kind: type, value: Any) -> str | None:
    """Why ``value`` is not in the range ``rng`` of a parameter of type ``kind`` (None: it is)."""
    if rng.choices is not None:
        return None if value in rng.choices else f"not one of this space's choices {list(rng.choices)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not a number as this space's range [{rng.low}, {rng.high}] needs"
    if not rng.low <= value <= rng.high:
        return f"outside this space's range [{rng.low}, {rng.high}]"
    step = rng.step or (1 if kind is int else None)
    if step is not None and not math.isclose((value - rng.low) / step, round((value - rng.low) / step), abs_tol=1e-8):
        return f"off this space's grid from {rng.low} in steps of {step}"
    return None
