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


#: Clock reads of a hand-made timer; methods time through ``deploy.latency_ms``.
_CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time", "time"}


def own_timers_and_mode_restores(path: Path, root: Path = ROOT) -> list[str]:
    """Where ``path`` reads a clock or saves and restores a train/eval mode by hand, one line each.

    A clock read is ``time.<clock>`` or a clock imported from ``time``; a hand-written restore is
    ``name = <module>.training`` or ``<module>.train(name)``, the halves of the
    ``was_training = model.training; model.eval(); ...; model.train(was_training)`` block that
    ``deploy.eval_mode`` replaces (``.train(other.training)``, giving a new module the mode of the
    one it replaces, is no restore).
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "time" and node.attr in _CLOCKS:
            found.append(f"{where} reads the clock time.{node.attr}: time with deploy.latency_ms")
        elif isinstance(node, ast.ImportFrom) and node.module == "time" and any(alias.name in _CLOCKS for alias in node.names):
            found.append(f"{where} imports a clock from time: time with deploy.latency_ms")
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and node.value.attr == "training":
            found.append(f"{where} saves a module's mode by hand: use deploy.eval_mode")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "train"
            and len(node.args) == 1
            and isinstance(node.args[0], ast.Name)
        ):
            found.append(f"{where} restores a module's mode by hand: use deploy.eval_mode")
    return found


def test_methods_time_and_switch_modes_through_deploy() -> None:
    found = [line for path in sorted((ROOT / "methods").rglob("*.py")) for line in own_timers_and_mode_restores(path)]
    assert not found, "methods time and restore modes through deploy, not beside it:\n" + "\n".join(found)


def test_the_check_finds_a_timer_and_a_hand_written_restore(tmp_path: Path) -> None:
    source = tmp_path / "copy.py"
    source.write_text(
        "import time\nfrom time import perf_counter\n"
        "def f(model, x):\n"
        "    was_training = model.training\n    model.eval()\n"
        "    start = time.perf_counter()\n    model(x)\n"
        "    model.train(was_training)\n"
        "    new = type(model)().train(model.training)\n"
        "    return time.perf_counter() - start\n"
    )
    found = own_timers_and_mode_restores(source, tmp_path)
    # The clock import (2), the saved mode (4), both clock reads (6, 10) and the restore (8); not line 9.
    assert sorted(int(line.split(" ", 1)[0].split(":")[1]) for line in found) == [2, 4, 6, 8, 10]
