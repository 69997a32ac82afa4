"""The contract every registered method keeps, run over ``methods.list_methods()``.

Like timm's model tests and Optuna's sampler test suite: a method added to the registry is
tested here without touching this file. Each method is run alone in a pipeline at its defaults
and at its aggressive end (the setting ``slimtune check`` pre-flights) on ``digits_cnn`` (a
briefly trained baseline, real digits) and on ``resnet20`` (random CIFAR-shaped data). Its
capability flags are held to what it does (a method without ``needs_teacher`` runs beside a
teacher that raises, one without ``needs_labels`` on labels that raise when read, one that
``changes_architecture`` compresses at its aggressive end), and every ordered pair of methods
runs a step and exports, or is refused by :func:`methods.check_pipeline` with a reason.
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

import torch.nn.functional as F

from methods import Method, Pipeline, check_pipeline, create_method, get_method, hyperparameters, list_methods
from search.export import check_round_trip, export_model
from search.measure import count_flops, count_params, size_bytes
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


# resnet20 exports at the aggressive end only: the defaults' layer types and bit widths export on
# digits_cnn here and in every pair below (an export costs a second; the suite stays quick).
EXPORT_RUNS = [r for r in RUNS if not (r[1] == "default" and r[2] == "resnet20")]


@pytest.mark.parametrize(("name", "setting", "model_name"), EXPORT_RUNS, ids=[f"{m}-{s}-{model}" for m, s, model in EXPORT_RUNS])
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


ARCHITECTURE_CHANGING = [(m, model) for m in METHODS if get_method(m).changes_architecture for model in MODELS]


@pytest.mark.parametrize(("name", "model_name"), ARCHITECTURE_CHANGING, ids=[f"{m}-{model}" for m, model in ARCHITECTURE_CHANGING])
def test_method_that_changes_the_architecture_compresses_at_its_aggressive_end(
    compressed, digits_context, cifar_context, name: str, model_name: str
) -> None:
    """Fewer parameters or MACs; a quantizer keeps both (its layers compute in fewer bits) and stores fewer bytes."""
    result = compressed(name, "aggressive", model_name)
    before, _ = (digits_context if model_name == "digits_cnn" else cifar_context)()
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


def _one_step(digits_context):
    """``(model, ctx)`` on digits whose train loader holds one batch: each phase is one step."""
    model, ctx = digits_context()
    ctx.train_loader = ctx.train_loader[:1]
    return model, ctx


WITHOUT_TEACHER = [(m, s) for m in METHODS if not get_method(m).needs_teacher for s in SETTINGS]


@pytest.mark.parametrize(("name", "setting"), WITHOUT_TEACHER, ids=[f"{m}-{s}" for m, s in WITHOUT_TEACHER])
def test_method_without_needs_teacher_never_runs_the_teacher(digits_context, name: str, setting: str) -> None:
    model, ctx = _one_step(digits_context)
    ctx.teacher = RaisingTeacher()
    torch.manual_seed(0)
    out = Pipeline([create_method(name, params_for(name, setting))]).run(model, ctx).eval()
    assert out(torch.zeros(2, 1, 8, 8)).shape == (2, NUM_CLASSES)


WITHOUT_LABELS = [m for m in METHODS if not get_method(m).needs_labels]


@pytest.mark.parametrize("name", WITHOUT_LABELS)
def test_method_without_needs_labels_never_reads_them(digits_context, name: str) -> None:
    """At its defaults (an optional labelled fine-tune, as gal's, is off there)."""
    model, ctx = _one_step(digits_context)
    ctx.train_loader = [(inputs, PoisonedLabels()) for inputs, _ in ctx.train_loader]
    torch.manual_seed(0)
    out = Pipeline([create_method(name, {})]).run(model, ctx).eval()
    assert out(torch.zeros(2, 1, 8, 8)).shape == (2, NUM_CLASSES)


# --- every ordered pair ---------------------------------------------------------------------------

PAIRS = [(a, b) for a in METHODS for b in METHODS if a != b]


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_every_ordered_pair_runs_a_step_and_exports_or_is_refused_with_a_reason(digits_context, tmp_path, first: str, second: str) -> None:
    try:
        check_pipeline([get_method(first), get_method(second)])
    except ValueError as refusal:
        reason = str(refusal)
        assert f"'{first}'" in reason and f"'{second}'" in reason, reason
        with pytest.raises(ValueError) as built:
            Pipeline([create_method(first), create_method(second)])
        assert str(built.value) == reason
        return
    model, ctx = _one_step(digits_context)
    torch.manual_seed(0)
    pipeline = Pipeline([create_method(first), create_method(second)])
    out = pipeline.run(model, ctx).eval()
    batch = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert out(batch).shape == (3, NUM_CLASSES)
    assert all(type(v) is float and math.isfinite(v) for v in pipeline.metrics().values())
    export_model(out, torch.zeros(1, 1, 8, 8), tmp_path, {"recipe": [{"name": first}, {"name": second}]})
    assert check_round_trip(tmp_path, batch) <= 1e-5
