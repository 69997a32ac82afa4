"""Trained baselines kept in the results folder, reused by every later search with the same key.

A baseline depends on the task (with its options), its data, the model (with its options) and
its code, the baseline settings (epochs or checkpoint file), the training settings its phase
uses (batch size, learning rate, optimizer, weight decay), the seed, the measure settings (its
metrics hold a latency), the kind of device it trains on and the torch version. The data is
keyed by a listing of every file under each path the task's options name (relative path, size
and modification time: cheap, and changed by swapping two class folders), the source file of
the task's factory and the versions of the packages that file imports (where data ships in a
package: scikit-learn's digits, scikit-image's images); the model by the source file of its
factory (torchvision's version for its models). Those make the key; its hash
names the folder ``<results_dir>/baselines/<hash>/`` holding ``baseline.pt``, ``metrics.json``
and ``key.json`` (the key in full, and the search that trained it).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision

from errors.user_code import is_object, user_object
from models import model_factory
from models.torchvision_models import create_torchvision_model
from tasks import task_factory

if TYPE_CHECKING:
    import torch

    from search.space.spec import SearchSpace

__all__ = ["baseline_key", "cached_baseline", "describe_key", "store_baseline"]


def baseline_key(space: SearchSpace) -> dict[str, Any]:
    """Everything a search's trained baseline and its metrics depend on."""
    checkpoint = space.baseline_checkpoint
    return {
        "task": space.task,
        "task_options": space.task_options,
        "data": _data_key(space),
        "model": space.model,
        "model_options": space.model_options,
        "model_code": _model_code(space.model),
        "baseline_epochs": space.baseline_epochs if checkpoint is None else 0,
        "baseline_checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest() if checkpoint else None,
        "batch_size": space.batch_size,
        "lr": space.lr,
        "optimizer": space.optimizer,
        "weight_decay": space.weight_decay,
        "seed": space.seed,
        "latency_batch_size": space.latency_batch_size,
        "latency_repeats": space.latency_repeats,
        "device": "gpu" if space.budget.gpus_per_trial > 0 else "cpu",
        "torch": torch.__version__,
    }


def describe_key(folder: Path) -> str:
    """What the key of the baseline cached in ``folder`` covers, for the line that says it was reused."""
    data = json.loads((Path(folder) / "key.json").read_text())["data"]
    files = sum(listing["files"] for listing in data["paths"].values())
    covered = (
        [f"{len(data['paths'])} data path(s) with {files} files by relative path, size and modification time"] if data["paths"] else []
    )
    covered += [f"package versions {', '.join(f'{p} {v}' for p, v in data['packages'].items())}"] if data["packages"] else []
    return (
        "same task and options, " + ", ".join([*covered, "task and model code"]) + ", model options, baseline and training settings, seed"
    )


def _data_key(space: SearchSpace) -> dict[str, Any]:
    """The task's data as far as it can be known cheaply: listings of its paths, its code, its packages."""

    if is_object(space.task):
        # A task object pickles with its data (an instance) or its code (a class): its digest is the key.
        return {"paths": {}, "task_code": user_object(space.task).description["pickle_sha256"], "packages": {}}
    factory = task_factory(space.task)
    # The defaults count too: cifar10's root is ./data unless the space names another.
    options = {p.name: p.default for p in inspect.signature(factory).parameters.values() if p.default is not inspect.Parameter.empty}
    options.update(space.task_options)
    paths = {}
    for name, value in sorted(options.items()):
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            paths[name] = _listing(Path(value).expanduser())
    source = inspect.getsourcefile(factory)
    return {"paths": paths, "task_code": _file_digest(source), "packages": _imported_versions(source)}


def _listing(path: Path) -> dict[str, Any]:
    """A digest of every file under ``path``: relative path, size and modification time (ns)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "sha256": digest.hexdigest()}


def _file_digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def _imported_versions(source: str | None) -> dict[str, str]:
    """The versions of the installed distributions whose modules ``source`` imports (in functions too)."""
    if not source:
        return {}
    modules = set()
    for node in ast.walk(ast.parse(Path(source).read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    distributions = metadata.packages_distributions()
    # This repository's packages are covered by their source files, not by a version.
    own = Path(__file__).resolve().parents[2]
    versions = {}
    for module in sorted(m for m in modules if not (own / m).is_dir()):
        for dist in distributions.get(module, []):
            versions[dist] = metadata.version(dist)
    return versions


def _model_code(name: str) -> dict[str, Any]:
    """The model's code: the source file of its factory, or torchvision's version for its models."""

    if is_object(name):
        # The pickled object: a changed class (or other trained weights) is another baseline.
        return {"object": user_object(name).description["pickle_sha256"]}
    factory = model_factory(name)
    if factory is None:
        return {"torchvision": torchvision.__version__, "wrapper": _file_digest(inspect.getsourcefile(create_torchvision_model))}
    return {"source": _file_digest(inspect.getsourcefile(factory))}


def _folder(results_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(results_dir) / "baselines" / digest


def cached_baseline(results_dir: Path, key: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path, str] | None:
    """The baseline an earlier search of ``results_dir`` trained with ``key`` (:func:`baseline_key`), if any.

    Called by the driver before it trains a search's baseline.

    Returns:
        The weights, the metrics, the cache folder and the name of the search that trained it;
        None when no baseline with this key is stored.
    """
    folder = _folder(results_dir, key)
    if not (folder / "key.json").is_file():
        return None
    state = torch.load(folder / "baseline.pt", weights_only=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    return state, metrics, folder, json.loads((folder / "key.json").read_text())["trained_by"]


def store_baseline(results_dir: Path, key: dict[str, Any], state: dict[str, torch.Tensor], metrics: dict[str, Any], search: str) -> Path:
    """Keep a freshly trained baseline for the next searches with the same ``key`` (:func:`baseline_key`); returns its folder.

    ``key.json`` is written last (and atomically): a folder without it is not a cached baseline.
    """
    folder = _folder(results_dir, key)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "baseline.pt")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    tmp = folder / f".key.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**key, "trained_by": search}, indent=1, default=str))
    tmp.replace(folder / "key.json")
    return folder
