"""``slimtune check``: a seconds-long CPU pre-flight of each enabled method on the space's model.

For every method, alone and then as the whole pipeline in the space's order: compress a
randomly initialised model at the most aggressive setting the space allows, train one step,
finalize, run a forward pass and export. For each method alone it also lists the layers the
method will change on the user's model and those it leaves alone, with the reason
(:meth:`methods.Method.touches`), so that a user sees before a long search that, say,
``l1_filter`` leaves the attention projections alone. What fails here would fail in every trial, so it is
reported before any trial starts (lesson 1 of the field: physical removal fails on real
architectures).
"""

from __future__ import annotations

import copy
import enum
import math
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deploy import check_round_trip, count_params, export_model
from errors import UserError
from methods import HyperparameterInfo, Method, Range, Touches, check_value_type, create_method, get_method, hyperparameters
from search.space.spec import MethodSpace, SearchSpace
from search.trial.context import build_model, first_batch, load_task, one_batch_context, run_one_batch
from tasks import task_kind

__all__ = ["preflight", "PreflightResult", "aggressive_params", "describe_touches"]

#: How many layer names a line of ``slimtune check`` lists before it says how many more there are.
NAMES_SHOWN = 8


@dataclass
class PreflightResult:
    label: str
    ok: bool
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    touches: Touches | None = None


def aggressive_params(method: MethodSpace) -> dict[str, Any]:
    """The space's most aggressive value of every searched parameter, plus its fixed ones.

    Each hyperparameter declares which end of its values compresses more
    (``hyperparameter(..., compresses="high")``); a searched parameter takes that end of the
    space's range, and its low end when it declares none. Numbers are ordered by value,
    ``Literal`` and enum choices in the order their type lists them, other choices in the
    order the space lists them.
    """
    infos = {h.name: h for h in hyperparameters(get_method(method.name).Config)}
    params = dict(method.fixed)
    for name, rng in method.searched.items():
        info = infos[name]
        if rng.choices is None:
            params[name] = rng.high if info.compresses == "high" else rng.low
            continue
        ordered = sorted(rng.choices, key=lambda value: _order(info, rng, value))
        params[name] = ordered[-1] if info.compresses == "high" else ordered[0]
    return params


def _order(info: HyperparameterInfo, rng: Range, value: Any) -> Any:
    """Where ``value`` stands among the choices of ``rng``, from the low end to the high end."""
    if value is None:  # the space's own setting, of unknown size: the low end
        return -math.inf
    if info.choices is not None:
        value = check_value_type(info.name, info.annotation, value)
        return info.choices.index(value.value if isinstance(value, enum.Enum) else value)
    if isinstance(value, (int, float)):
        return value
    return rng.choices.index(value)


def preflight(space: SearchSpace, log: Callable[[str], None] = print) -> list[PreflightResult]:
    """Run the pre-flight checks; each result says what failed and why.

    Raises:
        UserError: If the model cannot be built for the task or rejects the task's input; no
            method could run then.
    """
    task = load_task(space)
    baseline, expected_shape = _baseline_on_task_input(space, task)
    batch = first_batch(space, task)
    _check_output_fits(space, task, baseline, batch)
    recipes: list[tuple[str, list[dict[str, Any]]]] = [(m.name, [{"name": m.name, "params": aggressive_params(m)}]) for m in space.methods]
    if len(space.methods) > 1:
        recipes.append(("pipeline " + " > ".join(m.name for m in space.methods), [r[1][0] for r in recipes]))
    results = []
    for label, recipe in recipes:
        result = _check_one(label, recipe, space, task, baseline, batch, expected_shape)
        status = "ok  " if result.ok else "FAIL"
        detail = f"params {result.params_before:,} -> {result.params_after:,}" if result.ok else result.reason
        params = json_params(recipe) if len(recipe) == 1 else ""
        log(f"  [{status}] {label}{' ' + params if params else ''}: {detail}")
        if result.ok and len(recipe) == 1:
            result.touches = _touches(recipe[0], space, task, baseline, batch)
            for line in describe_touches(result.touches, get_method(recipe[0]["name"]).applies_to):
                log(f"         {line}")
        results.append(result)
    return results


def _touches(step: dict[str, Any], space: SearchSpace, task, baseline: torch.nn.Module, batch) -> Touches:
    """The layers of the space's model that ``step`` changes (the model itself is left as it is)."""
    method = create_method(step["name"], step["params"])
    return method.touches(baseline, one_batch_context(space, task, baseline, batch))


def describe_touches(touches: Touches, applies_to: str) -> list[str]:
    """What ``slimtune check`` prints under a method: the layers it changes, then those it leaves
    alone, grouped by the reason (at most :data:`NAMES_SHOWN` names a line). A method that changes
    no layer (it changes how the model is trained) gets one line saying so."""
    if not touches.changed and applies_to == Method.applies_to:
        return [f"changes {applies_to}"]
    lines = [f"changes {_count(touches.changed, 'layer')}" + (f": {_names(touches.changed)}" if touches.changed else "")]
    reasons: dict[str, list[str]] = {}
    for layer, why in touches.left_alone:
        reasons.setdefault(why, []).append(layer)
    lines += [f"leaves alone {_names(layers)} ({why})" for why, layers in reasons.items()]
    return lines


def _count(names: tuple[str, ...] | list[str], noun: str) -> str:
    return f"{len(names)} {noun}{'' if len(names) == 1 else 's'}"


def _names(names: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown if len(names) <= NAMES_SHOWN else f"{shown} and {len(names) - NAMES_SHOWN} more"


def _baseline_on_task_input(space: SearchSpace, task) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """Build the space's model, randomly initialised, and run it on the task's example input."""
    torch.manual_seed(0)
    example = task.example_input(2)
    try:
        baseline = build_model(space, task).eval()
        with torch.no_grad():
            return baseline, tuple(baseline(example).shape)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  any failure here means the model does not fit the task
        options = f" with options {space.model_options}" if space.model_options else ""
        raise UserError(
            f"{space.path}: model: '{space.model}'{options} does not accept task '{space.task}' input of shape "
            f"{tuple(example.shape)} ({type(exc).__name__}: {_one_line(exc)}). Choose a model made for this input "
            f"(see `slimtune profile MODEL --task ...`) or task options that resize the images."
        ) from None


def _check_output_fits(space: SearchSpace, task, baseline: torch.nn.Module, batch) -> None:
    """The model's output on a batch must be what the task's loss takes (a user's model is not made for it)."""
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor):
        return  # a batch of several inputs (two-view) reaches the model through its task's own code
    with torch.no_grad():
        out = baseline(inputs)
    reason = ""
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__  # two-view models return pairs
    if task_kind(space.task) == "classification" and isinstance(out, torch.Tensor) and (out.dim() != 2 or out.shape[1] != task.num_classes):
        reason = f"a classifier's output must be (batch, {task.num_classes}), one logit per class"
    else:
        try:
            loss = task.loss(out, targets)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                reason = f"the task's loss must be one number, but is {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}"
        except Exception as exc:  # noqa: BLE001  any failure of the loss means the output does not fit
            reason = f"the task's loss fails on it: {type(exc).__name__}: {_one_line(exc)}"
    if reason:
        options = f" with options {space.model_options}" if space.model_options else ""
        raise UserError(
            f"{space.path}: model: '{space.model}'{options} outputs shape {shape}, which does not fit task "
            f"'{space.task}' ({reason}). Build the model for the task (its num_classes) or fix the task."
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "(no message)"


def json_params(recipe: list[dict[str, Any]]) -> str:
    """``(ratio=0.7, round_to=1)``: the parameters of the recipe's one step; ``""`` when it has none."""
    params = recipe[0]["params"]
    return "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else ""


def _check_one(label, recipe, space, task, baseline, batch, expected_shape) -> PreflightResult:
    model = copy.deepcopy(baseline)
    before = count_params(model)
    try:
        model, _, _ = run_one_batch(recipe, space, task, model, baseline, batch)
        with torch.no_grad():
            out = model(task.example_input(2))
        if tuple(out.shape) != expected_shape:
            raise RuntimeError(f"the compressed model outputs shape {tuple(out.shape)}, expected {expected_shape} as the baseline.")
        if not torch.isfinite(out).all():
            raise RuntimeError("the compressed model outputs NaN or inf; the method diverged at this setting.")
        with tempfile.TemporaryDirectory() as tmp:
            export_model(model, task.example_input(1), Path(tmp), {"recipe": recipe})
            check_round_trip(Path(tmp), task.example_input(2))
    except Exception as exc:  # noqa: BLE001  every failure is reported, none stops the others
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return PreflightResult(
            label, False, f"{type(exc).__name__}: {_one_line(exc)} (at {Path(where.filename).name}:{where.lineno})", before
        )
    after = count_params(model)
    return PreflightResult(label, True, "", before, after)
