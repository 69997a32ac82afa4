"""The packages import one way: errors <- models, tasks <- methods <- search, and errors <- deploy <- methods, search.

Read from the source with ``ast`` (imports inside functions count too), so an import against
the direction fails here before it becomes a circle.
"""

from __future__ import annotations

import ast
import re
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


#: The rooms of ``search/`` and the rooms each may import: the space at the bottom, then one
#: trial, then what a search leaves (exporting a trial of it uses the trial's context), then the
#: driver that runs many trials; the Python API over them, and the CLI on top.
ROOMS: dict[str, set[str]] = {
    "space": set(),
    "trial": {"space"},
    "results": {"space", "trial"},
    "driver": {"space", "trial", "results"},
    "api": {"space", "trial", "results", "driver"},
    "cli": {"space", "trial", "results", "driver", "api"},
}


def _room(module: str) -> str | None:
    """The room of a dotted module name under ``search`` (``search.cli`` is the CLI's)."""
    parts = module.split(".")
    if parts[0] != "search" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ROOMS else None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _our_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in ALLOWED for path in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """Our modules that ``path`` imports anywhere in it (functions too), with the line of each.

    ``from package import name`` counts as importing ``package.name`` when that is a module.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    # Imports for type hints alone (under ``if TYPE_CHECKING:``) never run, so they make no circle.
    hints = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module for alias in node.names]
        else:
            continue
        out.update((name, node.lineno) for name in names if name in modules)
    return out


def test_search_rooms_import_only_the_rooms_below_them() -> None:
    modules = _our_modules()
    wrong = []
    for name, path in modules.items():
        room = _room(name)
        if room is None:
            continue
        for imported, line in imported_modules(path, modules):
            other = _room(imported)
            if other is not None and other != room and other not in ROOMS[room]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {imported} ({other})")
    assert not wrong, "search's rooms import one way (space <- trial <- results <- driver <- api <- cli), but:\n" + "\n".join(wrong)


def test_no_import_circle() -> None:
    """No module of ours reaches itself through imports, function-level imports included."""
    modules = _our_modules()
    graph = {name: {imported for imported, _ in imported_modules(path, modules)} - {name} for name, path in modules.items()}
    # A package's __init__ importing its own modules is how it re-exports them, not a circle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m.startswith(name + ".") and modules[name].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start)):
            pytest.fail("import circle: " + " -> ".join(circle))


def function_level_imports_without_reason(path: Path) -> list[str]:
    """Imports inside a function of ``path`` with no comment on their line or the line above.

    A function-level import is the exception (it keeps ``slimtune pareto`` free of torch and Ray,
    or a module light for a command that does not need it); the comment says which.
    """
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and not above.lstrip().startswith("#"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    return sorted(set(found))


def test_function_level_imports_say_why() -> None:
    found = [
        line
        for path in sorted((ROOT / "search").rglob("*.py"))
        if path.name != "cli.py"
        for line in function_level_imports_without_reason(path)
    ]
    assert not found, "a function-level import in search/ carries a comment saying why it is not at the top:\n" + "\n".join(found)


#: Private Ray and Optuna APIs: a private module or attribute of either library, and the
#: underscore attributes of their objects that slimtune reads (Optuna's trial ids and storage,
#: the state of Ray's OptunaSearch).
PRIVATE_API = re.compile(
    r"\b(?:ray|optuna)(?:\.\w+)*\._(?!_)\w+"
    r"|\.(?:_trial_id|_study_id|_storage|_ot_\w+|_completed_trials|_suggest_from_define_by_run_func|_raylet)\b"
)


def private_api_uses(source: str) -> list[tuple[int, str]]:
    """The lines of ``source`` that use a private Ray or Optuna API, with their numbers."""
    return [(i, line.strip()) for i, line in enumerate(source.splitlines(), 1) if PRIVATE_API.search(line)]


def test_private_ray_and_optuna_apis_stay_in_search_driver_private() -> None:
    """Only ``search/driver/_private.py`` is under the version check; a private API anywhere
    else could break silently with the next Ray or Optuna."""
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line}"
        for path in sorted((ROOT / "search").rglob("*.py"))
        if path.name != "_private.py"
        for i, line in private_api_uses(path.read_text())
    ]
    assert not found, "private Ray/Optuna APIs outside search/driver/_private.py:\n" + "\n".join(found)


def test_the_private_api_check_finds_each_form() -> None:
    lines = [
        "import ray._private.services as services",
        "from ray._raylet import AuthenticationTokenLoader",
        "code = 'import ray, ray._private.ray_constants as c'",
        "trial = optuna.Trial(study, frozen._trial_id)",
        "study._storage.set_trial_user_attr(1, 'a', 2)",
        "from optuna.samplers._tpe import sampler",
    ]
    public = ["from search.driver._private import open_trial", "ray.nodes()", "self._space = space"]
    assert [line for _, line in private_api_uses("\n".join([*lines, *public]))] == lines
