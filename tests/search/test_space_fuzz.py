"""Mutated copies of the shipped spaces through `slimtune check`'s parser: a UserError of one line, never a traceback.

A seeded mutator (no hypothesis: it is not a dependency) changes either the text (bytes
flipped, lines dropped, doubled or swapped, YAML syntax inserted) or the parsed document (a
value at a random key path replaced by a value of another type, a key renamed or removed), then
loads the file as ``slimtune check`` does (:func:`search.space.spec.load_space` and the command
line's overrides), without the pre-flight training.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from errors import UserError
from search.space.spec import load_space

SPACES = sorted((Path(__file__).resolve().parents[2] / "spaces").glob("*.yaml"))

#: Values of every YAML type, and of the wrong kind for most keys.
VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    7,
    2**70,
    1e308,
    -1e-9,
    float("nan"),
    float("inf"),
    "",
    "x",
    "search",
    "nsga2",
    "min",
    "max",
    "accuracy",
    "l1_filter",
    "accuracy_drop <= 0.02",
    "macs >= 1e999",
    "sqlite:///x.db",
    [],
    [1, 2],
    ["a"],
    [None],
    {},
    {"low": 1, "high": 0},
    {"choices": []},
    {"choices": [[1]]},
    {"low": "a"},
    {"name": None},
    {"name": "digits", "options": []},
    {1: 2},
    {"optional": "yes"},
    {"params": {"bits": "search"}},
    {"low": 0, "high": 1, "log": True},
    {"low": 1, "high": 2, "step": 0},
    {"low": 1, "high": 2, "step": -1},
    {"low": float("nan"), "high": 1},
    {"low": 1, "high": float("inf")},
    {"choices": [1, "a", None, [2]]},
    {"low": 1, "high": 3, "log": "no"},
    {"choices": "ab"},
    {"low": True, "high": False},
    {"choices": [{}]},
    {"task": "sr", "model": "edsr_small"},
    {"ratio": {"low": 0.5, "high": 0.1}},
    ["accuracy_drop <= nan"],
]

#: Text to insert at a random place: YAML syntax, tags, anchors, odd characters.
SNIPPETS = [
    "[",
    "]",
    "{",
    "}",
    ":",
    ": ",
    "- ",
    "\t",
    "&a ",
    "*a",
    "*nope",
    "<<: *a\n",
    "!!python/object:os.system ",
    "!!binary ",
    "? [a, b]\n",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    '"',
    "'",
    "#",
    "\\",
    "\u00e9",
    "\ufeff",
    "\x85",
    "~",
    "!!set ",
    "!!int 'x'",
    "!!float ",
    "!!timestamp 2020-01-01",
    "=",
    "|\n",
    ">-\n",
    "0x1F",
    "1_000",
    ".inf",
    ".nan",
]


def _value(rng: random.Random) -> Any:
    # A copy: a later mutation must not change the shared example (or make the document a cycle).
    return copy.deepcopy(rng.choice(VALUES))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a parsed document, containers included."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _mutate_document(rng: random.Random, data: Any) -> Any:
    paths = _paths(data)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        if not path:
            return _value(rng)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = rng.random()
        if action < 0.6:
            parent[key] = _value(rng)
        elif isinstance(parent, dict) and action < 0.8:
            value = parent.pop(key)
            parent[rng.choice(["name", "task", "methods", "x", 3, None, f"{key}_"])] = value
        elif isinstance(parent, dict):
            parent.pop(key)
        else:
            parent.append(_value(rng))
        paths = _paths(data)
    return data


def _mutate_text(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randint(1, 4)):
        action = rng.random()
        if action < 0.3 and lines:
            i = rng.randrange(len(lines))
            cut = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:cut] + rng.choice(SNIPPETS) + lines[i][cut:]
        elif action < 0.45 and lines:
            del lines[rng.randrange(len(lines))]
        elif action < 0.6 and lines:
            i = rng.randrange(len(lines))
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif action < 0.7 and lines:
            i = rng.randrange(len(lines))
            lines[i] = " " * rng.randint(0, 6) + lines[i].lstrip()
        elif action < 0.8 and len(lines) > 1:
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            raw = bytearray("".join(lines).encode())
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            return bytes(raw)
    return "".join(lines).encode()


def _check(path: Path) -> None:
    """What `slimtune check` does before its pre-flight: load, then apply the (absent) overrides."""
    load_space(path).with_overrides(name=None, trials=None, tracking_uri=None, results_dir=None)


@pytest.mark.parametrize("seed", range(3))
def test_mutated_spaces_give_one_line_user_errors_only(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    outcomes = {"valid": 0, "refused": 0}
    for i in range(100):
        source = rng.choice(SPACES)
        text = source.read_text()
        if rng.random() < 0.5:
            raw = _mutate_text(rng, text)
        else:
            data = _mutate_document(rng, yaml.safe_load(text))
            raw = yaml.safe_dump(data, allow_unicode=True).encode() if rng.random() < 0.5 else repr(data).encode()
        path = tmp_path / f"m{i}.yaml"
        path.write_bytes(raw)
        try:
            _check(path)
            outcomes["valid"] += 1
        except UserError as exc:
            message = str(exc)
            assert message and "\n" not in message, (source.name, raw[:2000], message)
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001  a crash is what this test exists to find
            pytest.fail(f"{source.name} mutated (seed {seed}, case {i}) raised {type(exc).__name__}: {exc}\n{raw[:2000]!r}")
    # The mutator reaches the parser's checks, not only the YAML reader.
    assert outcomes["refused"] >= 50, outcomes
