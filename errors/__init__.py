"""Errors a user can act on.

A :class:`UserError` ends a command with its message and exit code 2, never with a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input that the user can fix: the message states the rule, the value received and the fix."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for close matches of ``name`` in ``known``, or "" when none is close."""
    matches = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    """Build the error for an unknown registry name, listing what exists and the closest matches."""
    known = sorted(known)
    return UserError(f"unknown {kind} '{name}'.{did_you_mean(name, known)} Known {kind}s: {', '.join(known)}.")


def plural(count: float, noun: str, plural_form: str | None = None) -> str:
    """Return "1 method", "2 methods", "0.5 GPUs" (``plural_form`` for nouns that do not take an "s")."""
    shown = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{shown} {noun if count == 1 else plural_form or noun + 's'}"
