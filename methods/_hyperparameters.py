"""Hyperparameters: what a method's config declares about each field, and the checks built from it.

A method's config is a frozen dataclass whose fields are made with :func:`hyperparameter`: the
field's annotation is its type, and the declaration adds its help line, its default search
distribution (:class:`Range`), its valid values (:class:`Bounds`), which end compresses more and
whether it is a training budget. ``slimtune methods``, YAML spaces, ``slimtune check`` and
:func:`methods.create_method` all read this one declaration (:func:`hyperparameters`), so a
config states a field's rules once and writes no checks of its own beyond rules between fields.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from errors import did_you_mean

__all__ = ["Bounds", "HyperparameterInfo", "Range", "check_value_type", "hyperparameter", "hyperparameters"]


@dataclass(frozen=True)
class Range:
    """The default search distribution of one hyperparameter.

    Either ``choices`` (categorical) or ``low``/``high`` (uniform, or log-uniform with ``log``;
    integers when the field is an ``int``; ``step`` for a grid).
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if len(self.choices) == 0:
                raise ValueError("`choices` must name at least one value, but got an empty list.")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"a range needs `low` and `high` or `choices`, but got {self}.")
        if not self.low <= self.high:
            raise ValueError(f"`low <= high` must hold, but got (low={self.low}, high={self.high}).")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs `low > 0`, but got low={self.low}.")

    def as_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Bounds:
    """The values a numeric hyperparameter accepts: ``low <= value <= high``, either end strict or open.

    Made by :func:`hyperparameter` from its ``at_least``, ``above``, ``at_most`` and ``below``
    arguments; :meth:`HyperparameterInfo.check` states :meth:`rule` when a value breaks it.

    Attributes:
        low: The lowest value, or None for no lower end.
        high: The highest value, or None for no upper end.
        low_strict: ``low`` itself is refused (``above``).
        high_strict: ``high`` itself is refused (``below``).
    """

    low: float | None = None
    high: float | None = None
    low_strict: bool = False
    high_strict: bool = False

    def rule(self, name: str) -> str:
        """The rule as a message states it: ``0 <= ratio < 1``, ``lr > 0``, ``bits <= 8``."""
        if self.high is None:
            return f"{name} {'>' if self.low_strict else '>='} {_number(self.low)}"
        text = f"{name} {'<' if self.high_strict else '<='} {_number(self.high)}"
        if self.low is None:
            return text
        return f"{_number(self.low)} {'<' if self.low_strict else '<='} {text}"

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_strict else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_strict else value <= self.high)


def _number(value: float | None) -> str:
    """``0`` for ``0.0`` (rules read as arithmetic), the value's own form otherwise."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def hyperparameter(
    default: Any,
    help: str,
    search: Range | None = None,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    compresses: str | None = None,
    budget: bool = False,
) -> Any:
    """Declare a field of a method's config.

    The field's annotation is its type: ``int``, ``float``, ``bool``, ``str``, a ``Literal`` of
    str or int choices, an enum whose members are str or int (``class Kind(str, Enum)``, so a
    recipe stays JSON), a ``tuple[X, ...]`` or ``tuple[X, Y]`` of those, or any of them
    ``| None``. A ``None`` default means "use the space's setting" (``budget.epochs``,
    ``training.lr``); the field's help says which, as ``unset (null): the space's budget.epochs``,
    and the message for a value out of bounds repeats it.

    :func:`methods.create_method` checks every value it is given against the type and the bounds,
    so a config's ``__post_init__`` checks only rules between fields (or others no bound states,
    such as an even length). The default and the search range's ends must keep the declaration:
    :func:`hyperparameters` refuses a config whose own values break it.

    Args:
        default: The value when neither the space nor the recipe sets one.
        help: One line, shown by ``slimtune methods``.
        search: The default search distribution (``params: {name: search}`` in a space).
        at_least: The lowest valid value (an int or float field only).
        above: The valid values are greater than this (instead of ``at_least``).
        at_most: The highest valid value.
        below: The valid values are less than this (instead of ``at_most``).
        compresses: Which end of the field's values compresses more, ``"high"`` or ``"low"``;
            None when neither does. Numbers are ordered by value, ``Literal`` and enum choices
            in the order the type lists them: list them from least to most compressing (or the
            reverse, with ``compresses="low"``). ``slimtune check`` pre-flights each searched
            field at its compressing end, and at its low end when ``compresses`` is None.
        budget: The field counts epochs or iterations of training; ``slimtune check`` caps it
            at 1.
    """
    if compresses not in (None, "high", "low"):
        raise ValueError(f"`compresses` must be 'high', 'low' or None, but got {compresses!r}.")
    if at_least is not None and above is not None:
        raise ValueError(f"give `at_least` or `above`, not both, but got at_least={at_least}, above={above}.")
    if at_most is not None and below is not None:
        raise ValueError(f"give `at_most` or `below`, not both, but got at_most={at_most}, below={below}.")
    low = above if above is not None else at_least
    high = below if below is not None else at_most
    bounds = None if low is None and high is None else Bounds(low, high, above is not None, below is not None)
    metadata = {"help": help, "search": search, "bounds": bounds, "compresses": compresses, "budget": budget}
    return field(default=default, metadata=metadata)


#: Where a help line says what an unset (null) value means: "...; unset (null): the space's budget.epochs".
_UNSET = re.compile(r"unset \(null\): ([^;]+)")


@dataclass(frozen=True)
class HyperparameterInfo:
    """One field of a method's config, as :func:`hyperparameter` declared it.

    Attributes:
        name: The field's name.
        annotation: Its resolved type (``int``, ``int | None``, ``tuple[int, ...]``,
            ``Literal["a", "b"]``, an enum).
        type: The type of a value other than None: ``int``, ``float``, ``bool``, ``str``,
            ``tuple`` or the enum; for a ``Literal``, the type of its choices.
        optional: None is a valid value.
        choices: The values a ``Literal`` or enum field allows (an enum's member values), in the
            order the type lists them; None for other fields.
        default: As given to :func:`hyperparameter`, and so are the attributes below.
        help: One line for ``slimtune methods``.
        search: The default search distribution, or None.
        bounds: The valid values of a number, or None for any.
        compresses: ``"high"``, ``"low"`` or None.
        budget: The field counts epochs or iterations.
    """

    name: str
    annotation: Any
    type: type
    optional: bool
    choices: tuple[Any, ...] | None
    default: Any
    help: str
    search: Range | None
    bounds: Bounds | None
    compresses: str | None
    budget: bool

    @property
    def type_name(self) -> str:
        """The type as ``slimtune methods`` shows it (``int``, ``tuple[int, ...]``), None and choices apart."""
        return _type_name(_without_none(self.annotation))

    def check(self, value: Any) -> Any:
        """Return ``value`` as a value of this field (converted as :func:`check_value_type` does).

        Raises:
            ValueError: ``value`` is not of the field's type (the message says what it must
                be), or is outside its bounds (the message states the rule and, for a field
                whose default is None, what leaving it unset does).
        """
        value = check_value_type(self.name, self.annotation, value)
        if value is None or self.bounds is None or value in self.bounds:
            return value
        unset = _UNSET.search(self.help) if self.default is None else None
        hint = f"; leave it unset (null) to use {unset.group(1).strip()}" if unset else ""
        raise ValueError(f"`{self.bounds.rule(self.name)}` must hold, but got {self.name}={value}{hint}.")


def hyperparameters(config_cls: type) -> list[HyperparameterInfo]:
    """List the hyperparameters of a method's config class, in declaration order.

    Raises:
        TypeError: A field's annotation is not one of the types :func:`hyperparameter` lists,
            it has bounds but is not a number, or its default or an end of its search range
            breaks its own type or bounds.
    """
    return list(_hyperparameters(config_cls))


@functools.cache
def _hyperparameters(config_cls: type) -> tuple[HyperparameterInfo, ...]:
    # String annotations (`from __future__ import annotations`) resolve in the config's module.
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        where = f"{config_cls.__name__}.{f.name}"
        annotation = hints[f.name]
        if not _supported(annotation):
            raise TypeError(
                f"{where}: a hyperparameter is int, float, bool, str, a Literal of str or int "
                f"choices, an enum of str or int values, a tuple of those, or any of them | None, but got {annotation!r}."
            )
        inner = _without_none(annotation)
        choices = _choices(inner)
        if typing.get_origin(inner) is Literal:
            value_type = type(choices[0])
        elif typing.get_origin(inner) is tuple:
            value_type = tuple
        else:
            value_type = inner
        info = HyperparameterInfo(
            name=f.name,
            annotation=annotation,
            type=value_type,
            optional=inner is not annotation,
            choices=choices,
            default=f.default,
            help=f.metadata.get("help", ""),
            search=f.metadata.get("search"),
            bounds=f.metadata.get("bounds"),
            compresses=f.metadata.get("compresses"),
            budget=f.metadata.get("budget", False),
        )
        if info.bounds is not None and (value_type not in (int, float) or choices is not None):
            raise TypeError(f"{where}: bounds (at_least, above, at_most, below) need an int or float field, but got {annotation!r}.")
        _check_own_values(where, info)
        out.append(info)
    return tuple(out)


def _check_own_values(where: str, info: HyperparameterInfo) -> None:
    """The default and the search range's ends keep the field's type and bounds; TypeError otherwise."""
    own = {"the default": [info.default]}
    if info.search is not None:
        own["the search range"] = list(info.search.choices) if info.search.choices is not None else [info.search.low, info.search.high]
    for what, values in own.items():
        for value in values:
            try:
                info.check(value)
            except ValueError as exc:
                raise TypeError(f"{where}: {what} breaks the field's declaration: {exc}") from None


def check_value_type(name: str, annotation: Any, value: Any) -> Any:
    """Return ``value`` as a value of ``annotation``; ValueError naming ``name`` otherwise.

    The only conversions are those JSON and YAML make necessary: an int is a float, a whole
    float an int, a list a tuple, an enum's value its member. ``"3"`` is not an int and ``1``
    is not ``True``.
    """
    # Hand-written rather than pydantic: pydantic's lax mode turns "3" into 3 and "yes" into
    # True (a typo in a space would pass), its strict mode refuses JSON's lists for tuples, and
    # either way its messages would need rewriting into this one form.
    inner = _without_none(annotation)
    if value is None:
        if inner is not annotation:
            return None
        raise ValueError(f"`{name}` must be {_describe(annotation)}, but got None.")
    choices = _choices(inner)
    if choices is not None:
        if isinstance(inner, type) and isinstance(value, inner):
            return value
        candidate = int(value) if isinstance(value, float) and value.is_integer() else value
        for choice in choices:
            if candidate == choice and type(candidate) is type(choice):
                return inner(choice) if isinstance(inner, type) else choice
        hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ValueError(f"`{name}` must be {_describe(annotation)}, but got {value!r}.{hint}")
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        if not isinstance(value, (list, tuple)) or (items[-1] is not Ellipsis and len(value) != len(items)):
            raise ValueError(f"`{name}` must be {_describe(annotation)}, but got {value!r}.")
        if items[-1] is Ellipsis:
            items = (items[0],) * len(value)
        return tuple(check_value_type(f"{name}[{i}]", item, v) for i, (item, v) in enumerate(zip(items, value)))
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif inner is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, inner) or (inner is not bool and isinstance(value, bool)):
        raise ValueError(f"`{name}` must be {_describe(annotation)}, but got {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, but got {value!r}.")
    return value


_SCALARS = (int, float, bool, str)


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``), ``annotation`` itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` or an enum allows, in declared order; None for other types."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(member.value for member in annotation)
    return None


def _supported(annotation: Any, top: bool = True) -> bool:
    inner = _without_none(annotation) if top else annotation
    choices = _choices(inner)
    if choices is not None:
        kinds = {type(c) for c in choices}
        return len(kinds) == 1 and kinds <= {str, int}
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        if items[-1:] == (Ellipsis,):
            items = items[:-1]
        return len(items) >= 1 and all(_supported(item, top=False) for item in items)
    return inner in _SCALARS


def _type_name(annotation: Any) -> str:
    choices = _choices(annotation)
    if choices is not None:
        return type(choices[0]).__name__
    if typing.get_origin(annotation) is tuple:
        return "tuple[" + ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(annotation)) + "]"
    return annotation.__name__


def _describe(annotation: Any) -> str:
    """What a value must be, for error messages: ``of type int``, ``one of a, b``, ``a list of int``."""
    inner = _without_none(annotation)
    choices = _choices(inner)
    items = typing.get_args(inner)
    if choices is not None:
        text = f"one of {', '.join(str(c) for c in choices)}"
    elif typing.get_origin(inner) is tuple and items[-1] is Ellipsis:
        text = f"a list of {_type_name(items[0])}"
    elif typing.get_origin(inner) is tuple:
        text = f"a list of {len(items)} values ({', '.join(_type_name(a) for a in items)})"
    else:
        text = f"of type {inner.__name__}"
    return text + (" or null (None)" if inner is not annotation else "")
