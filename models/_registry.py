"""The model registry: a model module registers its factories when imported.

Names not registered here fall through to torchvision's classification models, so
``create_model("resnet50", ...)`` works without a wrapper; a ``torchvision:`` prefix
forces torchvision even where a registered model has the same name (``torchvision:vgg16``
is the ImageNet VGG-16, ``vgg16`` the CIFAR one). A name ``import:REF`` is a user's own model:
REF (``package.module:attr`` or ``/abs/file.py:attr``, see :mod:`errors.user_code`) names an
``nn.Module`` subclass or a function returning a module. A name ``object:...`` is such a class or
function handed to the Python API as an object, or a trained module instance, which every call
builds a copy of (weights included).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from errors import UserError, did_you_mean
from errors.user_code import import_ref, is_import, is_object, object_value
from models.torchvision_models import create_torchvision_model, torchvision_model_names

__all__ = ["register_model", "create_model", "list_models", "model_factory"]

TORCHVISION_PREFIX = "torchvision:"

ModelFactory = Callable[..., nn.Module]

_FACTORIES: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make a factory ``f(num_classes, in_channels, **options)`` available as ``name``.

    A model that is not a classifier (a super-resolution network) takes no ``num_classes``;
    its factory reads what its task's ``model_kwargs()`` gives instead (``scale``).

    Args:
        name: Registry name; must not start with the torchvision prefix.

    Returns:
        A decorator that registers the factory and returns it unchanged.
    """
    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model name '{name}' must not start with '{TORCHVISION_PREFIX}'.")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"model name '{name}' is registered twice ({_FACTORIES[name]} and {factory}).")
        _FACTORIES[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted (torchvision's are accepted too but not listed)."""
    return sorted(_FACTORIES)


def model_factory(name: str) -> ModelFactory | None:
    """The factory registered as ``name`` (its signature lists the options and their defaults);
    None for a torchvision model, whose options are ``torchvision.models.get_model``'s. For
    ``import:REF``, the user's class or function (imported on first use); for ``object:...``, the
    object handed to the API (a module instance: a function returning a copy of it)."""
    if is_import(name) or is_object(name):
        return _imported_factory(name)
    return None if name.startswith(TORCHVISION_PREFIX) else _FACTORIES.get(name)


def create_model(name: str, num_classes: int | None = None, in_channels: int = 3, **options: Any) -> nn.Module:
    """Build a freshly initialised model.

    Args:
        name: A registered name, a torchvision classification model name, or
            ``torchvision:<name>``.
        num_classes: Number of output logits; None for a model that is not a classifier
            (e.g. ``edsr``, built with ``scale=`` instead).
        in_channels: Channels of the input images.
        **options: Passed on to the factory (or to ``torchvision.models.get_model``).

    Returns:
        The model, in training mode, with random weights.

    Raises:
        UserError: ``name`` is neither registered nor a torchvision classification model, a
            registered factory has no option of that name, or the model and the task disagree
            on whether there are classes; an imported factory returns no ``nn.Module``.
    """
    if is_import(name) or is_object(name):
        return _create_imported(name, num_classes, in_channels, options)
    if not name.startswith(TORCHVISION_PREFIX) and name in _FACTORIES:
        factory = _FACTORIES[name]
        _check_classes(name, factory, num_classes)
        _check_options(name, factory, options)
        kwargs: dict[str, Any] = {"in_channels": in_channels, **options}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return factory(**kwargs)
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    if tv_name in torchvision_model_names():
        if num_classes is None:
            raise UserError(f"model '{name}' is a classifier and needs num_classes; its task has no classes. Choose a model for that task.")
        return create_torchvision_model(tv_name, num_classes=num_classes, in_channels=in_channels, **options)
    raise _unknown_model(name)


def _imported_factory(name: str) -> ModelFactory:
    factory = object_value(name) if is_object(name) else import_ref(name)
    if isinstance(factory, nn.Module):
        return _copies(factory)
    if not callable(factory):
        raise UserError(f"model '{name}': names a {type(factory).__name__}, not an nn.Module subclass or a function returning a module.")
    return factory


def _copies(trained: nn.Module) -> ModelFactory:
    """A trained instance as a factory: each call a deep copy (the user's module is never changed), in training mode."""

    def trained_copy() -> nn.Module:
        return copy.deepcopy(trained).train()

    return trained_copy


def _create_imported(name: str, num_classes: int | None, in_channels: int, options: dict[str, Any]) -> nn.Module:
    """Build a user's model: ``num_classes`` and ``in_channels`` where its signature takes them, ``options`` always."""
    factory = _imported_factory(name)
    _check_options(name, factory, options)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs: dict[str, Any] = {}
    if num_classes is not None and ("num_classes" in parameters or takes_any):
        kwargs["num_classes"] = num_classes
    if "in_channels" in parameters or takes_any:
        kwargs["in_channels"] = in_channels
    model = factory(**kwargs, **options)
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model '{name}': returned {type(model).__name__}, not an nn.Module; model.import must name an "
            "nn.Module subclass or a function that returns one."
        )
    return model


def _unknown_model(name: str) -> UserError:
    """The error for a name that is neither registered nor torchvision's, each model listed once.

    A torchvision name that a registered model shadows is listed with its prefix
    (``torchvision:vgg16``), which is how it is asked for, and said to be the ImageNet one.
    """
    registered = list_models()
    torchvision_names = [n if n not in _FACTORIES else f"{TORCHVISION_PREFIX}{n}" for n in torchvision_model_names()]
    shadowed = [n for n in torchvision_names if n.startswith(TORCHVISION_PREFIX)]
    note = ""
    if shadowed:
        one = len(shadowed) == 1
        plain = ", ".join(n.removeprefix(TORCHVISION_PREFIX) for n in shadowed)
        note = (
            f" {', '.join(shadowed)} {'is' if one else 'are'} torchvision's ImageNet {'model' if one else 'models'}; "
            f"{plain} without the prefix {'is' if one else 'are'} slimtune's own."
        )
    return UserError(
        f"unknown model '{name}'.{did_you_mean(name, registered + torchvision_names)} "
        f"Registered models: {', '.join(registered)}. "
        f"Torchvision models: {', '.join(torchvision_names)}.{note}"
    )


def _check_classes(name: str, factory: ModelFactory, num_classes: int | None) -> None:
    takes_classes = "num_classes" in inspect.signature(factory).parameters
    if num_classes is None and takes_classes:
        raise UserError(
            f"model '{name}' is a classifier and needs num_classes, but its task has no classes "
            f"(e.g. super-resolution). Choose a model for that task, such as edsr_small."
        )
    if num_classes is not None and not takes_classes:
        raise UserError(
            f"model '{name}' is not a classifier (it takes no num_classes), but its task has "
            f"{num_classes} classes. Use it with its own task (edsr, rdn: task sr)."
        )


def _check_options(name: str, factory: ModelFactory, options: dict[str, Any]) -> None:
    # Options usually come from a user's config, so a typo should read as a UserError, not a TypeError.
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [key for key in parameters if key not in ("num_classes", "in_channels")]
    for key in options:
        if key not in known:
            raise UserError(f"model '{name}' has no option '{key}'.{did_you_mean(key, known)} Its options: {', '.join(known) or 'none'}.")
