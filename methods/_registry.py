"""The method registry: a method module registers its class when imported."""

from __future__ import annotations

from typing import Any

from errors import did_you_mean, unknown_name
from methods._base import Method
from methods._hyperparameters import hyperparameters

__all__ = ["register_method", "get_method", "list_methods", "create_method"]

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``.

    Its config's declarations are read here, so an unsupported field type, or a default or
    search range that breaks its own declaration, fails on import.
    """
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is registered twice ({_METHODS[cls.name]} and {cls}).")
    hyperparameters(cls.Config)
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    """Return the method class registered as ``name``.

    Raises:
        errors.UserError: No method has that name (the message suggests close matches).
    """
    if name not in _METHODS:
        raise unknown_name("method", name, _METHODS)
    return _METHODS[name]


def create_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Build method ``name`` with ``params`` over its defaults.

    Each value is checked against its field's declared type and bounds, and converted where
    JSON and YAML make it necessary (:meth:`methods.HyperparameterInfo.check`), before the
    config is built; the config's ``__post_init__`` then checks rules between its fields.

    Raises:
        errors.UserError: No method has that name.
        ValueError: A key is not one of the method's hyperparameters, or a value is not valid
            for it (the message names the field and states the rule).
    """
    cls = get_method(name)
    infos = {h.name: h for h in hyperparameters(cls.Config)}
    params = dict(params or {})
    for key in params:
        if key not in infos:
            raise ValueError(
                f"method '{name}' has no hyperparameter '{key}'.{did_you_mean(key, infos)} Its hyperparameters: {', '.join(infos)}."
            )
    return cls(cls.Config(**{key: infos[key].check(value) for key, value in params.items()}))
