"""The method registry: a method module registers its class when imported."""

from __future__ import annotations

from typing import Any

from errors import did_you_mean
from methods._base import Method, hyperparameters

__all__ = ["register_method", "get_method", "list_methods", "create_method"]

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``.

    Its config's annotations are read here, so an unsupported field type fails on import.
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
    """Return the method class registered as ``name``; ValueError with close matches otherwise."""
    if name not in _METHODS:
        known = list_methods()
        raise ValueError(f"unknown method '{name}'.{did_you_mean(name, known)} Known methods: {', '.join(known)}.")
    return _METHODS[name]


def create_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Build method ``name`` with ``params`` over its defaults; ValueError names a bad key or value.

    The config checks and converts the values' types when it is built (see
    :func:`methods._base.check_config_types`), then its own ranges.
    """
    cls = get_method(name)
    params = dict(params or {})
    known = [h.name for h in hyperparameters(cls.Config)]
    for key in params:
        if key not in known:
            raise ValueError(
                f"method '{name}' has no hyperparameter '{key}'.{did_you_mean(key, known)} "
                f"Its hyperparameters: {', '.join(known)}."
            )
    return cls(cls.Config(**params))
