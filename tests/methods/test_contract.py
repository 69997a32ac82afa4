"""The contract every registered method keeps, run over ``methods.list_methods()``.

Like timm's model tests and Optuna's sampler test suite: a method added to the registry is
tested here without touching this file. Each method is run alone in a pipeline at its defaults
and at its aggressive end (the setting ``slimtune check`` pre-flights) on ``digits_cnn`` (a
briefly trained baseline, real digits) and on ``resnet20`` (random CIFAR-shaped data).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from methods import Method, Pipeline, create_method, get_method, hyperparameters, list_methods
from search.export import check_round_trip, export_model
from search.measure import count_params
from search.preflight import aggressive_params
from search.space import MethodSpace

METHODS = list_methods()
KINDS = {"pruning", "quantization", "distillation", "reparameterisation"}
FLAGS = ("needs_teacher", "needs_labels", "changes_architecture", "must_be_last", "loss_only")
SETTINGS = ("default", "aggressive")
MODELS = {"digits_cnn": (1, 8, 8), "resnet20": (3, 32, 32)}
NUM_CLASSES = 10


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
def test_every_hyperparameter_has_help(name: str) -> None:
    infos = hyperparameters(get_method(name).Config)
    for info in infos:
        assert info.help.strip(), f"{name}.{info.name} has no help text"
        assert info.type in (int, float, bool, str), f"{name}.{info.name} has type {info.type}"


@pytest.mark.parametrize("name", METHODS)
def test_every_search_range_end_builds_a_valid_config(name: str) -> None:
    for info in hyperparameters(get_method(name).Config):
        if info.search is None:
            continue
        for value in range_values(info):
            method = create_method(name, {info.name: value})
            assert getattr(method.config, info.name) == value
            assert type(getattr(method.config, info.name)) is info.type


WRONG_TYPE = {int: "high", float: "high", bool: "yes", str: 3}


@pytest.mark.parametrize("name", METHODS)
def test_value_of_the_wrong_type_is_a_value_error_naming_the_field(name: str) -> None:
    for info in hyperparameters(get_method(name).Config):
        wrong = WRONG_TYPE[info.type]
        with pytest.raises(ValueError, match=f"`{info.name}` must be of type {info.type.__name__}, but got {wrong!r}"):
            create_method(name, {info.name: wrong})


@pytest.mark.parametrize("name", METHODS)
def test_capability_flags(name: str) -> None:
    cls = get_method(name)
    for flag in FLAGS:
        assert type(getattr(cls, flag)) is bool, f"{name}.{flag} is {getattr(cls, flag)!r}"
    assert cls.kind in KINDS
    names = {h.name for h in hyperparameters(cls.Config)}
    assert set(cls.aggressive) <= names, f"{name}.aggressive names unknown hyperparameters"
    assert set(cls.aggressive.values()) <= {"high", "low"}
    # The aggressive end of a declared hyperparameter must come from a declared range.
    for key in cls.aggressive:
        assert next(h for h in hyperparameters(cls.Config) if h.name == key).search is not None


@pytest.mark.parametrize("name", METHODS)
def test_unknown_hyperparameter_suggests_close_match(name: str) -> None:
    infos = hyperparameters(get_method(name).Config)
    if not infos:
        pytest.skip(f"{name} has no hyperparameters")
    real = infos[0].name
    typo = real[:-1]
    with pytest.raises(ValueError, match=f"method '{name}' has no hyperparameter '{typo}'.*Did you mean '{real}'"):
        create_method(name, {typo: infos[0].default})


# --- running each method ----------------------------------------------------------------------


@dataclass
class Compressed:
    model: nn.Module
    params_before: int
    shapes_before: dict[str, tuple[int, ...]]
    metrics: dict[str, Any]
    input_shape: tuple[int, int, int]


@pytest.fixture(scope="module")
def compressed(digits_context, cifar_context):
    """``compressed(method, setting, model_name) -> Compressed``, each combination run once."""
    cache: dict[tuple[str, str, str], Compressed] = {}

    def get(name: str, setting: str, model_name: str) -> Compressed:
        key = (name, setting, model_name)
        if key not in cache:
            model, ctx = (digits_context if model_name == "digits_cnn" else cifar_context)()
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            before = count_params(model)
            pipeline = Pipeline([create_method(name, params_for(name, setting))])
            torch.manual_seed(0)
            out = pipeline.run(model, ctx).eval()
            cache[key] = Compressed(out, before, shapes, pipeline.methods[0].metrics(), MODELS[model_name])
        return cache[key]

    return get


RUNS = [(m, s, model) for m in METHODS for s in SETTINGS for model in MODELS]
RUN_IDS = [f"{m}-{s}-{model}" for m, s, model in RUNS]


@pytest.mark.parametrize(("name", "setting", "model_name"), RUNS, ids=RUN_IDS)
def test_compressed_model_outputs_one_logit_per_class(compressed, name: str, setting: str, model_name: str) -> None:
    result = compressed(name, setting, model_name)
    with torch.no_grad():
        out = result.model(torch.randn(4, *result.input_shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (4, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "setting", "model_name"), RUNS, ids=RUN_IDS)
def test_compressed_model_export_round_trips(compressed, tmp_path, name: str, setting: str, model_name: str) -> None:
    result = compressed(name, setting, model_name)
    files = export_model(result.model, torch.zeros(1, *result.input_shape), tmp_path, {"recipe": [{"name": name}]})
    assert all(size > 0 for size in files.values())
    batch = torch.randn(3, *result.input_shape, generator=torch.Generator().manual_seed(2))
    assert check_round_trip(tmp_path, batch) <= 1e-5


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
