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
import inspect
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
    "OBJECT_PREFIX",
    "UserObject",
    "is_object",
    "python_object",
    "described_object",
    "user_object",
    "object_value",
    "adopt_object",
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

    A file's folder; a module's top-level package folder (a namespace package's too: a folder
    without ``__init__.py``), or its file for a module outside a package; nothing for one
    installed in site-packages, which every worker has already.
    """
    target, _ = _split(ref)
    if _is_file(target):
        return [Path(target).parent]
    spec = importlib.util.find_spec(target.split(".")[0])
    if spec is None or spec.origin in ("built-in", "frozen"):
        return []
    if spec.origin is None:  # a namespace package: its folders, of which the module's holds it
        module = importlib.util.find_spec(target)
        folders = [Path(f) for f in spec.submodule_search_locations or []]
        held = [f for f in folders if module is not None and module.origin and Path(module.origin).is_relative_to(f)]
        root = (held or folders or [None])[0]
        if root is None:
            return []
    else:
        root = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return []
    return [root]


# ----------------------------------------------------------------------------------------------
# A Python object in place of an import reference (``search.api.search(space, model=Net)``).
# ----------------------------------------------------------------------------------------------

#: The prefix of a model or task name that is a Python object handed to the Python API.
OBJECT_PREFIX = "object:"

#: Objects of this process by name: those handed to the API here, those that arrived pickled
#: inside a space (a Ray worker), and those a stored search only describes (``payload`` None).
_OBJECTS: dict[str, UserObject] = {}


def is_object(name: str) -> bool:
    """Whether a model or task name is a Python object handed to the API (``object:...``)."""
    return isinstance(name, str) and name.startswith(OBJECT_PREFIX)


class UserObject:
    """A user's class, function or instance, pickled once (the check that it can travel) and named by its digest.

    The pickle travels inside the space to every Ray worker; unpickling a ``UserObject`` there
    registers it, so that :func:`object_value` finds it by name in any process that received the
    space. A stored search keeps only its description (:meth:`describe`): there the object is
    absent and :func:`object_value` says how to pass it again.
    """

    def __init__(self, description: dict[str, Any], payload: bytes | None) -> None:
        self.description = description
        self.payload = payload
        self._value: Any = None

    @property
    def name(self) -> str:
        return self.description["name"]

    def describe(self) -> dict[str, Any]:
        """What the object was, for the manifest and ``recipe.json``: name, key, module, qualname, source file and digests."""
        return dict(self.description)

    def value(self) -> Any:
        """The object, unpickled on first use in this process; UserError when only its description is here."""
        if self._value is None:
            if self.payload is None:
                raise _absent(self.name, self.description)
            import ray.cloudpickle  # noqa: PLC0415  errors/ stays free of Ray until an object is used

            self._value = ray.cloudpickle.loads(self.payload)
            _expose_main(self._value)
        return self._value

    def __getstate__(self) -> dict[str, Any]:
        return {"description": self.description, "payload": self.payload}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["description"], state["payload"])
        # A worker that receives the space receives the object: known by name from now on.
        if self.payload is not None or self.name not in _OBJECTS:
            _OBJECTS[self.name] = self


def _expose_main(value: Any) -> None:
    """A class or function of a notebook (``__main__``) arrives by value: put it where ``pickle`` looks
    for it, so that the trial's ``model.pt`` (a plain pickle) can be written in this process."""
    main = sys.modules.get("__main__")
    for obj in (value, type(value)):
        qualname = getattr(obj, "__qualname__", "")
        if getattr(obj, "__module__", None) == "__main__" and qualname.isidentifier() and main is not None:
            if getattr(main, qualname, None) is None:
                setattr(main, qualname, obj)


def python_object(obj: Any, key: str, facts: dict[str, Any] | None = None) -> str:
    """Register ``obj`` (given as ``key``, ``model`` or ``task``) and return its name ``object:MODULE.QUALNAME@DIGEST``.

    ``facts`` are what a stored search must know without the object (a task's kind and metric
    directions). The object is pickled here with Ray's cloudpickle, as Ray sends it to workers.

    Raises:
        UserError: ``obj`` cannot be pickled; the message names it and says how to pass it instead.
    """
    import ray.cloudpickle  # noqa: PLC0415  errors/ stays free of Ray until an object is used

    holder = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
    module = getattr(holder, "__module__", None) or "?"
    qualname = getattr(holder, "__qualname__", type(holder).__name__)
    shown = f"{module}.{qualname}" + ("" if holder is obj else "()")
    try:
        payload = ray.cloudpickle.dumps(obj)
    except Exception as exc:  # noqa: BLE001  anything a user's object holds may refuse to pickle
        raise UserError(
            f"{key}={shown} cannot be sent to Ray workers: pickling it fails ({_last_line(exc)}). Define it at the top "
            f"level of a .py file and pass it as {key}={{'import': 'file.py:{qualname.split('.')[0]}'}}, or keep "
            "what does not pickle (locks, open files, connections) out of it."
        ) from None
    source = _source_file(holder)
    digest = hashlib.sha256(payload).hexdigest()
    description = {
        "name": f"{OBJECT_PREFIX}{shown}@{digest[:12]}",
        "key": key,
        "module": module,
        "qualname": qualname,
        "instance": holder is not obj,
        "source": str(source) if source else None,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
        "pickle_sha256": digest,
        **(facts or {}),
    }
    entry = UserObject(description, payload)
    entry._value = obj
    _OBJECTS[entry.name] = entry
    return entry.name


def _source_file(holder: Any) -> Path | None:
    try:
        path = inspect.getsourcefile(holder)
    except (TypeError, OSError):
        return None
    return Path(path).resolve() if path and Path(path).is_file() else None


def described_object(description: dict[str, Any]) -> str:
    """The name of an object a stored search describes; registered without its value unless this process has it."""
    name = description.get("name")
    if not is_object(name):
        raise UserError(f"an object's description must carry its name 'object:...', but got {name!r}.")
    if name not in _OBJECTS:
        _OBJECTS[name] = UserObject(dict(description), None)
    return name


def user_object(name: str) -> UserObject:
    """The registered object ``name``; UserError when this process has never seen it."""
    if name not in _OBJECTS:
        raise _absent(name, None)
    return _OBJECTS[name]


def _absent(name: str, description: dict[str, Any] | None) -> UserError:
    """What to do when a search's Python object is needed where only its name or description is."""
    key = (description or {}).get("key", "model")
    what = f" ({description['module']}.{description['qualname']})" if description else ""
    return UserError(
        f"{key} '{name}' was a Python object{what} handed to search.api.search(), and this process does not have it "
        f"(the command line and `slimtune replay` cannot rebuild it). Pass it again from Python: "
        f"search.api.load(NAME, {key}=...) (export, any form) or search.api.resume(NAME, {key}=...)."
    )


def object_value(name: str) -> Any:
    """The Python object ``name`` stands for (:meth:`UserObject.value`)."""
    return user_object(name).value()


def adopt_object(name: str, obj: Any) -> None:
    """Give a stored search's object ``name`` its value again (``search.api.load(NAME, model=...)``)."""
    entry = user_object(name)
    import ray.cloudpickle  # noqa: PLC0415  errors/ stays free of Ray until an object is used

    try:
        payload = ray.cloudpickle.dumps(obj)
    except Exception as exc:  # noqa: BLE001  as in python_object
        raise UserError(f"{entry.description['key']}: the object cannot be pickled ({_last_line(exc)}).") from None
    entry.payload, entry._value = payload, obj
