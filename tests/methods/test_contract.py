"""The contract every registered method keeps, run over ``methods.list_methods()``.

Like timm's model tests and Optuna's sampler test suite: a method added to the registry is
tested here without touching this file. Each method is run alone in a pipeline at its defaults
and at its aggressive end (the setting ``slimtune check`` pre-flights) on every model it names in
``Method.example_models``, each on its task (``tests/methods/conftest.py``, ``ExampleModels``):
``digits_cnn`` (a briefly trained baseline, real digits), ``resnet20`` (random CIFAR-shaped
data), ``gru`` (random sequences) and ``two_branch_digits`` (``digits_2view``). Its capability
flags are held to what it does on its first model (a method without ``needs_teacher`` runs beside
a teacher that raises, one without ``needs_labels`` on labels that raise when read, one that
``changes_architecture`` compresses at its aggressive end), and every ordered pair of methods is
refused by :func:`methods.check_pipeline` with a reason, or runs a step and exports on the first
model both name. Only the models a method names are generated, so nothing is skipped: a method
that raises :class:`methods.NotApplicable` for one of them fails, and so does a method that
names no model the suite builds.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods._registry
from deploy import check_round_trip, count_flops, count_params, export_model, size_bytes
from errors import UserError
from methods import (
    Bounds,
    HyperparameterInfo,
    Method,
    NotApplicable,
    Pipeline,
    Range,
    check_pipeline,
    create_method,
    get_method,
    hyperparameter,
    hyperparameters,
    list_methods,
    register_method,
)
from models import list_models
from search.space.spec import MethodSpace
from search.trial.preflight import aggressive_params

METHODS = list_methods()
KINDS = {"pruning", "quantization", "distillation", "reparameterisation"}
FLAGS = ("needs_teacher", "needs_labels", "changes_architecture", "must_be_last", "loss_only")
SETTINGS = ("default", "aggressive")
NUM_CLASSES = 10  # of every example model's task


def aggressive(name: str) -> dict[str, Any]:
    """The most compressing end of every hyperparameter's default range, as the pre-flight picks it."""
    searched = {h.name: h.search for h in hyperparameters(get_method(name).Config) if h.search is not None}
    return aggressive_params(MethodSpace(name=name, optional=False, fixed={}, searched=searched))


def params_for(name: str, setting: str) -> dict[str, Any]:
    return {} if setting == "default" else aggressive(name)


def range_values(info) -> list[Any]:
    """Both ends of a range, or every choice."""
    rng = info.search
    if rng.choices is not None:
        return list(rng.choices)
    ends = [rng.low, rng.high]
    return [int(v) for v in ends] if info.type is int else [float(v) for v in ends]


def examples(name: str) -> tuple[str, ...]:
    """The models the contract runs method ``name`` on."""
    return get_method(name).example_models


def run_declared(pipeline: Pipeline, model: nn.Module, ctx, model_name: str) -> nn.Module:
    """``pipeline.run(model, ctx)``; a failure naming the model when a method refuses a model it names as an example."""
    try:
        return pipeline.run(model, ctx)
    except NotApplicable as refusal:
        names = [m.name for m in pipeline.methods]
        pytest.fail(f"{names} name '{model_name}' in `example_models`, but refuse it: {refusal}")


def input_shape(ctx) -> tuple[int, ...]:
    return tuple(ctx.example_input.shape[1:])


# --- what can be checked without training -----------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_defaults_build_a_valid_method(name: str) -> None:
    cls = get_method(name)
    method = create_method(name, {})
    assert isinstance(method, cls) and isinstance(method, Method)
    assert method.name == name
    assert method.config == cls.Config()
    for info in hyperparameters(cls.Config):
        assert getattr(method.config, info.name) == info.default
        if info.default is None:
            assert info.optional, f"{name}.{info.name} defaults to None but its type {info.annotation} does not allow it"
        else:
            assert isinstance(info.default, info.type), f"{name}.{info.name} default {info.default!r} is not a {info.type}"


@pytest.mark.parametrize("name", METHODS)
def test_config_is_frozen_and_survives_json(name: str) -> None:
    for setting in SETTINGS:
        pipeline = Pipeline([create_method(name, params_for(name, setting))])
        rebuilt = Pipeline.from_recipe(json.loads(json.dumps(pipeline.recipe())))
        assert rebuilt.methods[0].config == pipeline.methods[0].config
    config = create_method(name, {}).config
    first = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, first, getattr(config, first))


@pytest.mark.parametrize("name", METHODS)
def test_every_hyperparameter_is_declared(name: str) -> None:
    """Help, a supported type, and what the pre-flight reads: which end compresses, which fields are budgets."""
    for info in hyperparameters(get_method(name).Config):
        assert info.help.strip(), f"{name}.{info.name} has no help text"
        assert info.type in (int, float, bool, str, tuple) or issubclass(info.type, enum.Enum), f"{name}.{info.name} has type {info.type}"
        assert "0 uses" not in info.help and "0 means" not in info.help, f"{name}.{info.name}: use None, not a 0 sentinel"
        assert info.compresses in (None, "high", "low")
        if info.compresses is not None:
            # The pre-flight takes the compressing end of a range: the field needs one.
            assert info.search is not None, f"{name}.{info.name} declares `compresses` without a search range"
        if info.budget:
            assert info.type is int, f"{name}.{info.name} is a budget (epochs, iterations) but not an int"
        if info.choices is not None and info.search is not None and info.search.choices is not None:
            assert set(info.search.choices) <= set(info.choices), f"{name}.{info.name} searches values its type refuses"


@pytest.mark.parametrize("name", METHODS)
def test_every_search_range_end_builds_a_valid_config(name: str) -> None:
    for info in hyperparameters(get_method(name).Config):
        if info.search is None:
            continue
        for value in range_values(info):
            method = create_method(name, {info.name: value})
            assert getattr(method.config, info.name) == value
            assert type(getattr(method.config, info.name)) is info.type


def expected_type_error(info: HyperparameterInfo) -> str:
    """A pattern of what the message says a value must be: the choices, a type or a list, and None where allowed."""
    if info.choices:
        what = re.escape(f"one of {', '.join(map(str, info.choices))}")
    elif info.type is tuple:
        what = "a list of .+"  # the items' types: tested on the toy config below
    else:
        what = re.escape(f"of type {info.type.__name__}")
    return what + (re.escape(" or null (None)") if info.optional else "")


WRONG_TYPE = {int: "high", float: "high", bool: "yes", str: 3, tuple: 3}


@pytest.mark.parametrize("name", METHODS)
def test_value_of_the_wrong_type_is_a_value_error_naming_the_field(name: str) -> None:
    cls = get_method(name)
    for info in hyperparameters(cls.Config):
        wrong = "no such choice" if info.choices else WRONG_TYPE[info.type]
        message = re.escape(f"`{info.name}` must be ") + expected_type_error(info) + re.escape(f", but got {wrong!r}.")
        with pytest.raises(ValueError, match=message):
            create_method(name, {info.name: wrong})


def just_outside(info: HyperparameterInfo) -> list[Any]:
    """A value past each declared end of a field's bounds: the end itself where it is strict, one past it otherwise."""
    b = info.bounds
    values = []
    if b.low is not None:
        values.append(b.low if b.low_strict else b.low - 1)
    if b.high is not None:
        values.append(b.high if b.high_strict else b.high + 1)
    return [info.type(v) for v in values]


@pytest.mark.parametrize("name", METHODS)
def test_a_value_outside_the_declared_bounds_is_refused_with_the_rule(name: str) -> None:
    bounded = [info for info in hyperparameters(get_method(name).Config) if info.bounds is not None]
    for info in bounded:
        for value in just_outside(info):
            with pytest.raises(ValueError) as raised:
                create_method(name, {info.name: value})
            message = str(raised.value)
            assert message.startswith(f"`{info.bounds.rule(info.name)}` must hold, but got {info.name}={value}"), message
            if info.default is None:
                assert "; leave it unset (null) to use " in message, f"{name}.{info.name}: {message}"


@pytest.mark.parametrize("name", METHODS)
def test_method_class_has_its_own_one_line_summary(name: str) -> None:
    """``slimtune methods`` shows it; methods that share a module (vsd, vcd, vml) still differ."""
    summaries = {m: (get_method(m).__dict__.get("__doc__") or "").strip().partition("\n")[0] for m in METHODS}
    assert summaries[name], f"{get_method(name).__name__} has no docstring of its own"
    others = [m for m in METHODS if m != name and summaries[m] == summaries[name]]
    assert not others, f"{name} shares its summary with {others}"


def test_unknown_method_is_a_user_error_with_close_matches() -> None:
    with pytest.raises(UserError, match=r"^unknown method 'l1_filtr'\. Did you mean 'l1_filter'\? Known methods: decouple, "):
        get_method("l1_filtr")
    with pytest.raises(UserError, match="unknown method 'kdd'"):
        create_method("kdd", {})


@pytest.mark.parametrize("name", METHODS)
def test_method_names_example_models_the_suite_runs_it_on(example_models, name: str) -> None:
    """So no method goes unchecked: each names registered models that the suite builds, on a task of a kind it accepts."""
    cls = get_method(name)
    assert type(cls.example_models) is tuple and cls.example_models, f"{name} names no example model: the contract checks it on none"
    for model_name in cls.example_models:
        assert model_name in list_models(), f"{name} names '{model_name}' in `example_models`, which is no registered model"
        assert model_name in example_models.factories, (
            f"{name} names '{model_name}' in `example_models`, but the suite cannot build it: add its context to "
            f"ExampleModels in tests/methods/conftest.py (it builds {sorted(example_models.factories)})"
        )
        kind = example_models.task_kind(model_name)
        assert cls.task_kinds is None or kind in cls.task_kinds, (
            f"{name} applies to {cls.task_kinds} tasks, but its example '{model_name}' runs on a {kind} task"
        )


@pytest.mark.parametrize("name", METHODS)
def test_capability_flags(name: str) -> None:
    cls = get_method(name)
    for flag in FLAGS:
        assert type(getattr(cls, flag)) is bool, f"{name}.{flag} is {getattr(cls, flag)!r}"
    assert cls.kind in KINDS


@pytest.mark.parametrize("name", METHODS)
def test_unknown_hyperparameter_suggests_close_match(name: str) -> None:
    infos = hyperparameters(get_method(name).Config)
    if not infos:
        pytest.skip(f"{name} has no hyperparameters")
    real = infos[0].name
    typo = real[:-1]
    with pytest.raises(ValueError, match=f"method '{name}' has no hyperparameter '{typo}'.*Did you mean '{real}'"):
        create_method(name, {typo: infos[0].default})


# --- every field type a config may use, on a toy method ------------------------------------------


class Pool(str, enum.Enum):
    MAX = "max"
    AVG = "avg"


@dataclass(frozen=True)
class TypedConfig:
    steps: int | None = hyperparameter(None, "steps; unset: the space's", Range(1, 9), budget=True)
    scale: float | None = hyperparameter(None, "a scale", Range(0.1, 1.0), compresses="high")
    kernel: tuple[int, ...] = hyperparameter((3, 3), "kernel sizes")
    pair: tuple[float, str] = hyperparameter((0.5, "a"), "a number and a name")
    pool: Pool = hyperparameter(Pool.MAX, "pooling", Range(choices=("avg", "max")), compresses="low")
    mode: Literal["fast", "exact"] = hyperparameter("fast", "mode", Range(choices=("exact", "fast")), compresses="high")
    width: Literal[8, 16, 32] | None = hyperparameter(None, "width")


class Typed(Method):
    name = "typed_toy"
    Config = TypedConfig
    kind = "reparameterisation"


@pytest.fixture
def typed_toy(monkeypatch):
    """``typed_toy`` in the registry for one test."""
    monkeypatch.setitem(methods._registry._METHODS, Typed.name, Typed)
    return Typed.name


def test_field_types_are_read_from_the_annotations() -> None:
    infos = {h.name: h for h in hyperparameters(TypedConfig)}
    read = {name: (h.type, h.optional, h.choices, h.type_name) for name, h in infos.items()}
    assert read == {
        "steps": (int, True, None, "int"),
        "scale": (float, True, None, "float"),
        "kernel": (tuple, False, None, "tuple[int, ...]"),
        "pair": (tuple, False, None, "tuple[float, str]"),
        "pool": (Pool, False, ("max", "avg"), "str"),
        "mode": (str, False, ("fast", "exact"), "str"),
        "width": (int, True, (8, 16, 32), "int"),
    }
    assert (infos["steps"].budget, infos["scale"].compresses, infos["mode"].compresses) == (True, "high", "high")


def test_typed_fields_coerce_what_json_and_yaml_give(typed_toy: str) -> None:
    config = create_method(
        typed_toy, {"steps": 4.0, "scale": 1, "kernel": [5, 3.0, 1], "pair": [2, "b"], "pool": "avg", "width": 16}
    ).config
    assert config == TypedConfig(steps=4, scale=1.0, kernel=(5, 3, 1), pair=(2.0, "b"), pool=Pool.AVG, width=16)
    assert (type(config.steps), type(config.scale), type(config.pair[0]), config.pool) == (int, float, float, Pool.AVG)
    assert create_method(typed_toy, {"steps": None, "scale": None, "width": None}).config == TypedConfig()


BAD_VALUES = [
    ({"steps": "4"}, "`steps` must be of type int or null (None), but got '4'."),
    ({"steps": 2.5}, "`steps` must be of type int or null (None), but got 2.5."),
    ({"scale": True}, "`scale` must be of type float or null (None), but got True."),
    ({"scale": float("nan")}, "`scale` must be finite, but got nan."),
    ({"kernel": 3}, "`kernel` must be a list of int, but got 3."),
    ({"kernel": [3, "x"]}, "`kernel[1]` must be of type int, but got 'x'."),
    ({"kernel": None}, "`kernel` must be a list of int, but got None."),
    ({"pair": [1.0]}, "`pair` must be a list of 2 values (float, str), but got [1.0]."),
    ({"pool": "sum"}, "`pool` must be one of max, avg, but got 'sum'."),
    ({"mode": "fats"}, "`mode` must be one of fast, exact, but got 'fats'. Did you mean 'fast'?"),
    ({"width": 12}, "`width` must be one of 8, 16, 32 or null (None), but got 12."),
    ({"width": True}, "`width` must be one of 8, 16, 32 or null (None), but got True."),
]


@pytest.mark.parametrize(("params", "message"), BAD_VALUES, ids=[next(iter(p)) + "=" + repr(next(iter(p.values()))) for p, _ in BAD_VALUES])
def test_typed_fields_reject_wrong_values_naming_the_field(typed_toy: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        create_method(typed_toy, params)
    assert str(raised.value) == message


def test_typed_fields_round_trip_through_a_json_recipe(typed_toy: str) -> None:
    params = {"steps": 3, "kernel": [1, 3], "pair": [0.25, "z"], "pool": "avg", "mode": "exact", "width": 32}
    pipeline = Pipeline([create_method(typed_toy, params)])
    stored = json.dumps(pipeline.recipe())
    assert json.loads(stored)[0]["params"] == {"scale": None, **params}
    rebuilt = Pipeline.from_recipe(json.loads(stored))
    assert rebuilt.methods[0].config == pipeline.methods[0].config
    assert rebuilt.methods[0].config.pool is Pool.AVG and rebuilt.methods[0].config.kernel == (1, 3)


def test_unsupported_field_type_is_refused_where_the_method_registers() -> None:
    @dataclass(frozen=True)
    class Loose:
        mixed: int | str = hyperparameter(1, "int or str")

    class LooseMethod(Method):
        name = "loose_toy"
        Config = Loose
        kind = "pruning"

    with pytest.raises(TypeError, match=r"Loose.mixed: a hyperparameter is int, float, bool, str, .* but got int \| str"):
        register_method(LooseMethod)
    assert "loose_toy" not in list_methods()


def test_compresses_must_name_an_end() -> None:
    with pytest.raises(ValueError, match="`compresses` must be 'high', 'low' or None, but got 'more'"):
        hyperparameter(1, "x", compresses="more")


# --- declared bounds, on a toy method ------------------------------------------------------------


@dataclass(frozen=True)
class BoundedConfig:
    """No ``__post_init__``: create_method alone checks each value's type and bounds."""

    ratio: float = hyperparameter(0.5, "a fraction", Range(0.1, 0.9), at_least=0.0, below=1.0)
    gate: float = hyperparameter(0.5, "an open interval", above=0.0, below=1.0)
    count: int = hyperparameter(1, "a count", at_least=1)
    bits: int = hyperparameter(8, "bits", at_least=2, at_most=8)
    cap: float = hyperparameter(1.0, "at most 2", at_most=2.0)
    lr: float | None = hyperparameter(None, "a learning rate; unset (null): the space's training.lr", above=0.0)
    width: int | None = hyperparameter(None, "a width; unset (null): the model's width", Range(4, 64), at_least=1)


class Bounded(Method):
    name = "bounded_toy"
    Config = BoundedConfig
    kind = "reparameterisation"


@pytest.fixture
def bounded_toy(monkeypatch):
    """``bounded_toy`` in the registry for one test."""
    monkeypatch.setitem(methods._registry._METHODS, Bounded.name, Bounded)
    return Bounded.name


OUT_OF_BOUNDS = [
    ({"ratio": 1}, "`0 <= ratio < 1` must hold, but got ratio=1.0."),
    ({"ratio": -0.5}, "`0 <= ratio < 1` must hold, but got ratio=-0.5."),
    ({"gate": 0.0}, "`0 < gate < 1` must hold, but got gate=0.0."),
    ({"count": 0}, "`count >= 1` must hold, but got count=0."),
    ({"bits": 9.0}, "`2 <= bits <= 8` must hold, but got bits=9."),
    ({"cap": 2.5}, "`cap <= 2` must hold, but got cap=2.5."),
    ({"lr": 0}, "`lr > 0` must hold, but got lr=0.0; leave it unset (null) to use the space's training.lr."),
    ({"width": 0}, "`width >= 1` must hold, but got width=0; leave it unset (null) to use the model's width."),
]


@pytest.mark.parametrize(
    ("params", "message"), OUT_OF_BOUNDS, ids=[next(iter(p)) + "=" + repr(next(iter(p.values()))) for p, _ in OUT_OF_BOUNDS]
)
def test_declared_bounds_give_the_rule_in_the_message(bounded_toy: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        create_method(bounded_toy, params)
    assert str(raised.value) == message


def test_create_method_checks_types_and_bounds_of_a_config_that_checks_nothing(bounded_toy: str) -> None:
    with pytest.raises(ValueError, match=re.escape("`count` must be of type int, but got 'two'.")):
        create_method(bounded_toy, {"count": "two"})
    with pytest.raises(ValueError, match=re.escape("`count >= 1` must hold")):
        create_method(bounded_toy, {"count": -3})
    config = create_method(bounded_toy, {"ratio": 0, "gate": 0.999, "count": 5.0, "bits": 2, "cap": 2, "lr": None, "width": 1}).config
    assert config == BoundedConfig(ratio=0.0, gate=0.999, count=5, bits=2, cap=2.0, lr=None, width=1)
    assert (type(config.ratio), type(config.count), type(config.cap)) == (float, int, float)
    assert BoundedConfig(count=-3).count == -3  # the bounds are the registry's to check, not the dataclass's


def test_bounds_are_read_from_the_declaration() -> None:
    infos = {h.name: h for h in hyperparameters(BoundedConfig)}
    assert infos["ratio"].bounds == Bounds(low=0.0, high=1.0, low_strict=False, high_strict=True)
    assert infos["gate"].bounds == Bounds(low=0.0, high=1.0, low_strict=True, high_strict=True)
    assert infos["cap"].bounds == Bounds(high=2.0)
    assert infos["lr"].bounds.rule("lr") == "lr > 0"
    assert 0.0 in infos["ratio"].bounds and 1.0 not in infos["ratio"].bounds and 0.0 not in infos["gate"].bounds


def test_a_declaration_that_breaks_its_own_bounds_is_refused_where_the_method_registers() -> None:
    @dataclass(frozen=True)
    class BadDefault:
        ratio: float = hyperparameter(1.0, "a fraction", at_least=0.0, below=1.0)

    @dataclass(frozen=True)
    class BadRange:
        ratio: float = hyperparameter(0.5, "a fraction", Range(0.5, 1.5), at_least=0.0, below=1.0)

    @dataclass(frozen=True)
    class BadType:
        mode: str = hyperparameter("a", "a name", at_least=0)

    for config, message in [
        (BadDefault, "BadDefault.ratio: the default breaks the field's declaration: `0 <= ratio < 1` must hold, but got ratio=1.0."),
        (BadRange, "BadRange.ratio: the search range breaks the field's declaration: `0 <= ratio < 1` must hold, but got ratio=1.5."),
        (BadType, "BadType.mode: bounds (at_least, above, at_most, below) need an int or float field, but got <class 'str'>."),
    ]:
        cls = type(f"{config.__name__}Method", (Method,), {"name": f"{config.__name__.lower()}_toy", "Config": config, "kind": "pruning"})
        with pytest.raises(TypeError) as raised:
            register_method(cls)
        assert str(raised.value) == message
        assert cls.name not in list_methods()


def test_an_end_is_inclusive_or_strict_not_both() -> None:
    with pytest.raises(ValueError, match="give `at_least` or `above`, not both, but got at_least=0, above=0"):
        hyperparameter(1, "x", at_least=0, above=0)
    with pytest.raises(ValueError, match="give `at_most` or `below`, not both, but got at_most=1, below=2"):
        hyperparameter(1, "x", at_most=1, below=2)


# --- running each method ----------------------------------------------------------------------


@dataclass
class Compressed:
    model: nn.Module
    params_before: int
    shapes_before: dict[str, tuple[int, ...]]
    metrics: dict[str, Any]
    input_shape: tuple[int, ...]


@pytest.fixture(scope="module")
def compressed(example_models):
    """``compressed(method, setting, model_name) -> Compressed``, each combination run once."""
    cache: dict[tuple[str, str, str], Compressed] = {}

    def get(name: str, setting: str, model_name: str) -> Compressed:
        key = (name, setting, model_name)
        if key not in cache:
            model, ctx = example_models(model_name)
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            before = count_params(model)
            pipeline = Pipeline([create_method(name, params_for(name, setting))])
            torch.manual_seed(0)
            out = run_declared(pipeline, model, ctx, model_name).eval()
            cache[key] = Compressed(out, before, shapes, pipeline.methods[0].metrics(), input_shape(ctx))
        return cache[key]

    return get


RUNS = [(m, s, model) for m in METHODS for s in SETTINGS for model in examples(m)]
RUN_IDS = [f"{m}-{s}-{model}" for m, s, model in RUNS]


@pytest.mark.parametrize(("name", "setting", "model_name"), RUNS, ids=RUN_IDS)
def test_compressed_model_outputs_one_logit_per_class(compressed, name: str, setting: str, model_name: str) -> None:
    result = compressed(name, setting, model_name)
    with torch.no_grad():
        out = result.model(torch.randn(4, *result.input_shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (4, NUM_CLASSES)
    assert torch.isfinite(out).all()


# A method's further models (resnet20 after digits_cnn) export at the aggressive end only: the
# defaults' layer types and bit widths export on its first model here and in the pairs below (an
# export costs a second; the suite stays quick).
EXPORT_RUNS = [r for r in RUNS if r[1] == "aggressive" or r[2] == examples(r[0])[0]]


@pytest.mark.parametrize(("name", "setting", "model_name"), EXPORT_RUNS, ids=[f"{m}-{s}-{model}" for m, s, model in EXPORT_RUNS])
def test_compressed_model_export_round_trips(compressed, tmp_path, name: str, setting: str, model_name: str) -> None:
    result = compressed(name, setting, model_name)
    files = export_model(result.model, torch.zeros(1, *result.input_shape), tmp_path, {"recipe": [{"name": name}]})
    assert all(size > 0 for size in files.values())
    batch = torch.randn(3, *result.input_shape, generator=torch.Generator().manual_seed(2))
    # The program has its batch norms folded: equal up to rounding, relative to the outputs'
    # size (an aggressively quantized resnet20 outputs values near 1e23); raises otherwise.
    check_round_trip(tmp_path, batch, rtol=1e-5)


@pytest.mark.parametrize(("name", "setting", "model_name"), RUNS, ids=RUN_IDS)
def test_method_metrics_are_finite_floats(compressed, name: str, setting: str, model_name: str) -> None:
    metrics = compressed(name, setting, model_name).metrics
    assert isinstance(metrics, dict)
    for key, value in metrics.items():
        assert isinstance(key, str) and key
        assert type(value) is float and math.isfinite(value), f"{name} metric {key}={value!r}"


ARCHITECTURE_KEEPING = [r for r in RUNS if not get_method(r[0]).changes_architecture]


@pytest.mark.parametrize(
    ("name", "setting", "model_name"), ARCHITECTURE_KEEPING, ids=[f"{m}-{s}-{model}" for m, s, model in ARCHITECTURE_KEEPING]
)
def test_method_that_keeps_the_architecture_keeps_every_parameter_shape(compressed, name: str, setting: str, model_name: str) -> None:
    result = compressed(name, setting, model_name)
    assert count_params(result.model) == result.params_before
    assert {n: tuple(p.shape) for n, p in result.model.named_parameters()} == result.shapes_before


ARCHITECTURE_CHANGING = [(m, model) for m in METHODS if get_method(m).changes_architecture for model in examples(m)]


@pytest.mark.parametrize(("name", "model_name"), ARCHITECTURE_CHANGING, ids=[f"{m}-{model}" for m, model in ARCHITECTURE_CHANGING])
def test_method_that_changes_the_architecture_compresses_at_its_aggressive_end(
    compressed, example_models, name: str, model_name: str
) -> None:
    """Fewer parameters or MACs; a quantizer keeps both (its layers compute in fewer bits) and stores fewer bytes."""
    result = compressed(name, "aggressive", model_name)
    before, _ = example_models(model_name)
    if get_method(name).kind == "quantization":
        assert size_bytes(result.model) < size_bytes(before)
        return
    example = torch.zeros(1, *result.input_shape)
    params, macs = count_params(result.model), count_flops(result.model, example).macs
    params_before, macs_before = count_params(before), count_flops(before, example).macs
    assert params < params_before or macs < macs_before, (
        f"{name} at its aggressive end kept {params} of {params_before} parameters and {macs} of {macs_before} MACs"
    )


# --- what a method may touch: the teacher, the labels ---------------------------------------------


class TeacherTouched(AssertionError):
    pass


class RaisingTeacher(nn.Module):
    """A teacher for methods that declare ``needs_teacher = False``: running it fails the test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TeacherTouched("the method ran the teacher although it declares needs_teacher = False")


class LabelsRead(AssertionError):
    pass


class PoisonedLabels:
    """Labels for methods that declare ``needs_labels = False``: any use (an attribute, ``.to``,
    ``len``, indexing, a torch function such as ``cross_entropy``) fails the test."""

    def _read(self, *args: Any, **kwargs: Any) -> Any:
        raise LabelsRead("the method read the labels although it declares needs_labels = False")

    __getattr__ = _read
    __len__ = __iter__ = __getitem__ = __bool__ = __index__ = __int__ = __float__ = __eq__ = _read
    __hash__ = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise LabelsRead(f"the method passed the labels to {getattr(func, '__name__', func)} although it declares needs_labels = False")


def test_poisoned_labels_and_raising_teacher_fail_when_used() -> None:
    with pytest.raises(LabelsRead):
        F.cross_entropy(torch.zeros(2, 10), PoisonedLabels())
    with pytest.raises(LabelsRead):
        PoisonedLabels().to("cpu")
    with pytest.raises(TeacherTouched):
        RaisingTeacher()(torch.zeros(1, 1, 8, 8))


def _one_step(example_models, model_name: str):
    """``(model, ctx)`` of ``model_name`` whose train loader holds one batch: each phase is one step."""
    model, ctx = example_models(model_name)
    ctx.train_loader = ctx.train_loader[:1]
    return model, ctx


WITHOUT_TEACHER = [(m, s) for m in METHODS if not get_method(m).needs_teacher for s in SETTINGS]


@pytest.mark.parametrize(("name", "setting"), WITHOUT_TEACHER, ids=[f"{m}-{s}" for m, s in WITHOUT_TEACHER])
def test_method_without_needs_teacher_never_runs_the_teacher(example_models, name: str, setting: str) -> None:
    """On the method's first example model."""
    model_name = examples(name)[0]
    model, ctx = _one_step(example_models, model_name)
    ctx.teacher = RaisingTeacher()
    torch.manual_seed(0)
    out = run_declared(Pipeline([create_method(name, params_for(name, setting))]), model, ctx, model_name).eval()
    assert out(torch.zeros(2, *input_shape(ctx))).shape == (2, NUM_CLASSES)


WITHOUT_LABELS = [m for m in METHODS if not get_method(m).needs_labels]


@pytest.mark.parametrize("name", WITHOUT_LABELS)
def test_method_without_needs_labels_never_reads_them(example_models, name: str) -> None:
    """On the method's first example model, at its defaults (an optional labelled fine-tune, as gal's, is off there)."""
    model_name = examples(name)[0]
    model, ctx = _one_step(example_models, model_name)
    ctx.train_loader = [(inputs, PoisonedLabels()) for inputs, _ in ctx.train_loader]
    torch.manual_seed(0)
    out = run_declared(Pipeline([create_method(name, {})]), model, ctx, model_name).eval()
    assert out(torch.zeros(2, *input_shape(ctx))).shape == (2, NUM_CLASSES)


# --- every ordered pair ---------------------------------------------------------------------------


def _refused(first: str, second: str) -> bool:
    try:
        check_pipeline([get_method(first), get_method(second)])
    except ValueError:
        return True
    return False


def _shared_model(first: str, second: str) -> str | None:
    """The first of ``first``'s example models that ``second`` names too; None when they share none."""
    return next((model for model in examples(first) if model in examples(second)), None)


PAIRS = [(a, b) for a in METHODS for b in METHODS if a != b]
REFUSED_PAIRS = [(a, b) for a, b in PAIRS if _refused(a, b)]
# A pair that may be built runs on a model both methods name; a pair without one (wavelet, on
# recurrent models, and l1_filter, on convolutional ones) has no model to run on.
RUNNABLE_PAIRS = [(a, b, _shared_model(a, b)) for a, b in PAIRS if not _refused(a, b) and _shared_model(a, b) is not None]


@pytest.mark.parametrize(("first", "second"), REFUSED_PAIRS, ids=[f"{a}-then-{b}" for a, b in REFUSED_PAIRS])
def test_ordered_pair_that_cannot_work_is_refused_with_a_reason_naming_both(first: str, second: str) -> None:
    with pytest.raises(ValueError) as checked:
        check_pipeline([get_method(first), get_method(second)])
    reason = str(checked.value)
    assert f"'{first}'" in reason and f"'{second}'" in reason, reason
    with pytest.raises(ValueError) as built:
        Pipeline([create_method(first), create_method(second)])
    assert str(built.value) == reason


@pytest.mark.parametrize(("first", "second", "model_name"), RUNNABLE_PAIRS, ids=[f"{a}-then-{b}-{model}" for a, b, model in RUNNABLE_PAIRS])
def test_ordered_pair_runs_a_step_and_exports(example_models, tmp_path, first: str, second: str, model_name: str) -> None:
    model, ctx = _one_step(example_models, model_name)
    torch.manual_seed(0)
    pipeline = Pipeline([create_method(first), create_method(second)])
    out = run_declared(pipeline, model, ctx, model_name).eval()
    batch = torch.randn(3, *input_shape(ctx), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert out(batch).shape == (3, NUM_CLASSES)
    assert all(type(v) is float and math.isfinite(v) for v in pipeline.metrics().values())
    export_model(out, ctx.example_input, tmp_path, {"recipe": [{"name": first}, {"name": second}]})
    check_round_trip(tmp_path, batch, rtol=1e-5)  # folded batch norms: equal up to rounding (raises otherwise)
