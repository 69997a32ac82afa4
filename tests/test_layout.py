"""The packages import one way: errors <- models, tasks <- methods <- search, and errors <- deploy <- methods, search.

Read from the source with ``ast`` (imports inside functions count too), so an import against
the direction fails here before it becomes a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Each package and the packages of ours it may import.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "models": {"errors"},
    "tasks": {"errors"},
    "deploy": {"errors"},
    "methods": {"errors", "models", "tasks", "deploy"},
    "search": {"errors", "models", "tasks", "methods", "deploy"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Our top-level packages that ``path`` imports, with the line of each import."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out.update((name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in ALLOWED)
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for imported, line in imported_packages(path):
            if imported != package and imported not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of ours'}, but:\n" + "\n".join(wrong)


def test_every_package_is_listed_in_pyproject() -> None:
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(ALLOWED) <= set(listed), f"pyproject.toml's packages lack {sorted(set(ALLOWED) - set(listed))}"
