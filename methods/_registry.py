"""The method registry: a method module registers its class when imported."""

from __future__ import annotations

import difflib
from typing import Any

from methods._base import Method, check_config_types, check_value_type, hyperparameters

__all__ = ["register_method", "get_method", "list_methods", "create_method"]

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is registered twice ({_METHODS[cls.name]} and {cls}).")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def _suggest(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return (" Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?") if matches else ""


def get_method(name: str) -> type[Method]:
    """Return the method class registered as ``name``; ValueError with close matches otherwise."""
    if name not in _METHODS:
        known = list_methods()
        raise ValueError(f"unknown method '{name}'.{_suggest(name, known)} Known methods: {', '.join(known)}.")
    return _METHODS[name]


def create_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Build method ``name`` with ``params`` over its defaults; ValueError names a bad key or value."""
    cls = get_method(name)
    params = dict(params or {})
    types = {h.name: h.type for h in hyperparameters(cls.Config)}
    known = list(types)
    for key in params:
        if key not in known:
            raise ValueError(
                f"method '{name}' has no hyperparameter '{key}'.{_suggest(key, known)} "
                f"Its hyperparameters: {', '.join(known)}."
            )
    # Types first: the config's own range checks would fail on a string with a bare TypeError.
    params = {key: check_value_type(key, types[key], value) for key, value in params.items()}
    config = cls.Config(**params)
    check_config_types(config)
    return cls(config)
