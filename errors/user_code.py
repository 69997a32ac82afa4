"""A user's own code named by an import reference: ``package.module:attr`` or ``path/to/file.py:attr``.

The one resolver that the model and task registries, and through them the trials, the Ray
workers, ``export``, ``replay`` and ``profile``, use to load a user's model or task. A space
names such code as ``model: {import: REF}`` (``task:`` likewise); from then on the model or
task is known by the name ``import:REF`` with the file made absolute (:func:`import_name`).

A file is imported as the module named after its stem with its folder on ``sys.path``, as
``python file.py`` would (its sibling modules import, and a pickled model of it loads wherever
that folder is on the path). On a Ray cluster the folder travels as one of the runtime
environment's ``py_modules``; a worker that lacks the absolute path finds it there
(:func:`import_ref`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import keyword
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from errors import UserError, did_you_mean

__all__ = [
    "IMPORT_PREFIX",
    "is_import",
    "import_name",
    "name_from_command_line",
    "absolute_ref",
    "import_ref",
    "ref_files",
    "code_digests",
    "ref_roots",
]

#: The prefix of a model or task name that is an import reference.
IMPORT_PREFIX = "import:"


def is_import(name: str) -> bool:
    """Whether a model or task name is an import reference (``import:REF``)."""
    return isinstance(name, str) and name.startswith(IMPORT_PREFIX)


def import_name(ref: str) -> str:
    """The model or task name under which ``ref`` (absolute) is known."""
    return IMPORT_PREFIX + ref


def name_from_command_line(text: str, base: Path) -> str:
    """A model or task as a command line gives it: a registered name, ``file.py:attr`` (relative to
    ``base``) or ``import:REF``; a reference comes back as its ``import:`` name, made absolute."""
    if is_import(text) or ".py:" in text:
        return import_name(absolute_ref(text.removeprefix(IMPORT_PREFIX), base))
    return text


def _split(ref: str) -> tuple[str, str]:
    """``(module or file, attr)``; UserError when ``ref`` is not of either form."""
    ref = ref.removeprefix(IMPORT_PREFIX)
    target, colon, attr = ref.rpartition(":")
    if not colon or not target or not attr.isidentifier():
        raise UserError(
            f"import reference {ref!r} must read 'package.module:attr' or 'path/to/file.py:attr' (a class or a function of that module)."
        )
    return target, attr


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def absolute_ref(ref: Any, base: Path) -> str:
    """``ref`` with its file made absolute, relative to ``base`` (the space file's folder).

    Raises:
        UserError: ``ref`` is not text of either form, or its file does not exist (with the
            ``.py`` files of that folder that are close).
    """
    if not isinstance(ref, str):
        raise UserError(f"an import reference must be text such as 'model.py:Net', but got {ref!r}.")
    target, attr = _split(ref)
    if not _is_file(target):
        parts = target.split(".")
        if not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
            raise UserError(f"import reference {ref!r}: {target!r} is neither a module name nor a .py file.")
        return f"{target}:{attr}"
    path = (base / Path(target).expanduser()).resolve()
    if not path.is_file():
        folder = path.parent
        known = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
        raise UserError(f"import reference {ref!r}: no such file {path}.{did_you_mean(path.name, known)}")
    return f"{path}:{attr}"


def _module_of_file(path: Path) -> Any:
    """Import ``path`` as the module named after its stem, its folder on ``sys.path``."""
    if not path.is_file():
        # On a cluster's worker the folder arrived as a py_module named after it.
        spec = importlib.util.find_spec(path.parent.name) if path.parent.name.isidentifier() else None
        shipped = [Path(p) / path.name for p in (spec.submodule_search_locations or [])] if spec else []
        found = next((p for p in shipped if p.is_file()), None)
        if found is None:
            raise UserError(f"{path}: no such file on this machine; the file an import reference names must exist where the search runs.")
        path = found
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
            return loaded
        raise UserError(
            f"{path}: imports as module '{name}', but another module of that name is already loaded "
            f"({getattr(loaded, '__file__', None) or 'built in'}); rename the file."
        )
    if str(path.parent) not in sys.path:
        # Its sibling modules import, and a model pickled from it loads again by module name.
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path}: cannot be imported as a Python module; name it NAME.py.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001  the user's own code fails in its own way
        del sys.modules[name]
        raise UserError(f"{path}: fails to import: {_last_line(exc)}") from None
    return module


def _module(target: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            parent, _, last = exc.name.rpartition(".")
            known = _submodules(parent)
            raise UserError(
                f"no module '{exc.name}' (importing '{target}').{did_you_mean(last, known)} Is its package installed or on PYTHONPATH?"
            ) from None
        raise UserError(f"module '{target}' fails to import: {_last_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001  the user's own code fails in its own way
        raise UserError(f"module '{target}' fails to import: {_last_line(exc)}") from None


def _submodules(parent: str) -> list[str]:
    """Names importable under ``parent`` (top-level modules when empty), for close matches."""
    import pkgutil  # noqa: PLC0415  only on the error path

    if not parent:
        return [m.name for m in pkgutil.iter_modules()]
    try:
        package = importlib.import_module(parent)
    except Exception:  # noqa: BLE001  no suggestions then
        return []
    return [m.name for m in pkgutil.iter_modules(getattr(package, "__path__", []))]


def _last_line(exc: BaseException) -> str:
    """The last line of the exception's traceback: ``NameError: name 'x' is not defined``."""
    return " ".join(traceback.format_exception_only(type(exc), exc)[-1].split())


def import_ref(ref: str) -> Any:
    """The object ``ref`` (``import:`` optional) names, its module imported once per process.

    Raises:
        UserError: One line naming the module or file: it does not exist, fails to import (its
            exception's last line), or has no such attribute (with close matches).
    """
    target, attr = _split(ref)
    module = _module_of_file(Path(target)) if _is_file(target) else _module(target)
    if not hasattr(module, attr):
        public = [n for n in vars(module) if not n.startswith("_")]
        where = getattr(module, "__file__", None) or target
        raise UserError(f"{where} has no attribute '{attr}'.{did_you_mean(attr, public)}")
    return getattr(module, attr)


def ref_files(ref: str) -> list[Path]:
    """The user's source file that ``ref`` names: the ``.py`` file, or the module's file."""
    target, _ = _split(ref)
    if _is_file(target):
        return [Path(target)]
    module = _module(target)
    source = getattr(module, "__file__", None)
    return [Path(source)] if source else []


def code_digests(ref: str) -> dict[str, str]:
    """SHA-256 of each user file of ``ref``, by path: recorded with a trial, compared at replay."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in ref_files(ref) if path.is_file()}


def ref_roots(ref: str) -> list[Path]:
    """What carries ``ref``'s code to another machine (Ray's ``py_modules``).

    A file's folder; a module's top-level package folder, or its file for a module outside a
    package; nothing for one installed in site-packages, which every worker has already.
    """
    target, _ = _split(ref)
    if _is_file(target):
        return [Path(target).parent]
    spec = importlib.util.find_spec(target.split(".")[0])
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return []
    root = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return []
    return [root]
