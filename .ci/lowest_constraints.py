"""Print pip constraints that pin every dependency of pyproject.toml to its declared lower bound.

pip has no "lowest versions" resolution, so ``make lowest`` installs slimtune with this output as
a constraints file (``pip install -c``): each direct dependency, the ``test`` extra's included, at
the version its ``>=`` bound names, so the lowest versions slimtune declares are installed and
tested. A dependency without a ``>=`` bound is an error: it would leave the lowest version unchecked.

    python .ci/lowest_constraints.py [pyproject.toml] > constraints.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

# "name[extra,...] >=1.2, <3  ; marker": the name, then the specifiers up to any marker.
_REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<specs>[^;]*)")


def lower_bounds(pyproject: Path) -> dict[str, str]:
    """The ``>=`` bound of each dependency (``[project] dependencies`` and the ``test`` extra), by name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("test", [])]
    bounds: dict[str, str] = {}
    for text in declared:
        match = _REQUIREMENT.match(text)
        if match is None:
            raise ValueError(f"{pyproject}: cannot read the dependency {text!r}")
        lows = [spec.strip()[2:].strip() for spec in match["specs"].split(",") if spec.strip().startswith(">=")]
        if len(lows) != 1:
            raise ValueError(
                f"{pyproject}: dependency {text!r} needs exactly one '>=' lower bound to be tested at it, e.g. '{match['name']}>=1.0'"
            )
        bounds[match["name"]] = lows[0]
    return bounds


def main(argv: list[str]) -> int:
    pyproject = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        bounds = lower_bounds(pyproject)
    except (OSError, KeyError, ValueError) as error:
        print(f"lowest_constraints: {error}", file=sys.stderr)
        return 2
    for name, version in bounds.items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
