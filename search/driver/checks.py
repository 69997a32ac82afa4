"""Up-front checks: what would fail a search later is refused before its baseline trains.

Each check raises :class:`~errors.UserError` with one line (the rule, what was found, the fix)
and leaves nothing behind: folders that do not exist yet are not created, only probed.

- :func:`check_resources`: the cluster can run one trial (GPUs, CPUs per trial);
- :func:`check_storage`: the results folder, the MLflow store and Optuna's can be written;
- :func:`check_methods`: the model accepts the task's input and every method works on it (the
  pre-flight of :mod:`search.trial.preflight`, on a real batch);
- :func:`check_files`: the user's files load: the baseline checkpoint (a state dict of the
  space's model) and a sample of every split of the task's data;
- :func:`check_before_baseline`: the last three, in that order, as ``slimtune search`` runs them.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from errors import UserError, plural
from search.space.spec import SearchSpace
from search.trial.context import build_model, load_task
from search.trial.preflight import preflight

__all__ = [
    "check_before_baseline",
    "check_files",
    "check_methods",
    "check_resources",
    "check_storage",
    "check_writable_folder",
    "local_resources",
]

#: Default ports of the database servers an MLflow or Optuna URI may name.
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}

#: Seconds to wait for a tracking server to accept a connection.
CONNECT_TIMEOUT_S = 5.0

#: Examples read from each split by :func:`check_files`, evenly spaced over the split.
SAMPLE_PER_SPLIT = 32


def local_resources() -> dict[str, float]:
    """This machine's CPUs and GPUs, in the form of ``ray.cluster_resources()``, without starting Ray."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_resources(space: SearchSpace, resources: dict[str, float]) -> None:
    """Refuse a space whose trials ask for more than the cluster has; otherwise Tune waits forever.

    Called once the cluster is known: by ``slimtune search`` after Ray starts (with
    ``ray.cluster_resources()``) and by ``slimtune check`` (with :func:`local_resources`).

    Args:
        space: The validated space; its ``budget.cpus_per_trial`` and ``budget.gpus_per_trial`` are checked.
        resources: The cluster's total resources, e.g. ``{"CPU": 16.0, "GPU": 2.0, ...}``.
    """
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    has = f"the cluster has {plural(cpus, 'CPU')} and {plural(gpus, 'GPU')}"
    asked = space.budget.gpus_per_trial
    if asked > gpus:
        fix = "Set budget.gpus_per_trial: 0 to train on CPUs" if gpus == 0 else f"Set budget.gpus_per_trial to at most {gpus:g}"
        raise UserError(
            f"{space.path}: budget.gpus_per_trial: each trial asks for {plural(asked, 'GPU')}, but {has}; "
            f"no trial could ever start. {fix}, or run on a cluster with GPUs (--address)."
        )
    asked = space.budget.cpus_per_trial
    if asked > cpus:
        raise UserError(
            f"{space.path}: budget.cpus_per_trial: each trial asks for {plural(asked, 'CPU')}, but {has}; no trial could "
            f"ever start. Set budget.cpus_per_trial to at most {cpus:g}, or run on a larger cluster (--address)."
        )


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Refuse ``folder`` unless it is, or could be created as, a folder this process can write.

    Nothing is created: the nearest existing folder is probed with a temporary file, which is
    removed. ``what`` names the folder in the error, e.g. ``"--results-dir"``.
    """
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: cannot be a folder, since {existing} is a file. Choose another path.")
    reason = "" if os.access(existing, os.W_OK | os.X_OK) else "permission denied"
    if not reason:
        try:
            with tempfile.TemporaryFile(dir=existing, prefix=".slimtune-probe-"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
    if reason:
        inside = "" if existing == folder else f" (inside {existing}, the nearest existing folder)"
        raise UserError(f"{what} {folder}: cannot write there{inside}: {reason}. Choose a writable folder.")


def _check_store(uri: str, what: str) -> None:
    """A SQLite file must be writable, with its folder (for SQLite's journal); a server must answer."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme == "sqlite":
        database = uri.split(":///", 1)[1] if ":///" in uri else ""
        if database in ("", ":memory:"):
            raise UserError(
                f"{what} {uri}: an in-memory database loses the search when the driver stops. Name a file, e.g. sqlite:///mlflow.db."
            )
        db = Path(database).expanduser()
        check_writable_folder(db.absolute().parent, f"{what} {uri}: the database's folder")
        if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)):
            raise UserError(f"{what} {uri}: {db} is not a writable file. Choose another database path.")
        return
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return
    port = parts.port or _DEFAULT_PORTS[scheme]
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(
            f"{what} {uri}: cannot connect to {parts.hostname}:{port} within {CONNECT_TIMEOUT_S:g} s "
            f"({exc.strerror or type(exc).__name__}). Start the server or fix the URI."
        ) from None


def check_storage(space: SearchSpace, results_dir: str | Path, tracking_uri: str) -> None:
    """Refuse a search whose results folder, MLflow store or Optuna store cannot be written.

    Called before the baseline trains, so that a bad path costs seconds, not a baseline. Servers
    are given :data:`CONNECT_TIMEOUT_S` to answer.

    Args:
        space: The validated space (its ``optuna_storage`` and ``checkpoint_storage`` are checked too).
        results_dir: Where the search's folder will be made (``--results-dir`` or ``output.results_dir``).
        tracking_uri: The MLflow tracking URI in effect (``--tracking-uri`` or ``output.tracking_uri``).
    """
    check_writable_folder(results_dir, "results folder (--results-dir / output.results_dir)")
    _check_store(tracking_uri, "MLflow tracking store (--tracking-uri / output.tracking_uri)")
    if space.optuna_storage:
        _check_store(space.optuna_storage, "Optuna storage (output.optuna_storage)")
    if space.checkpoint_storage and "://" not in space.checkpoint_storage:
        check_writable_folder(space.checkpoint_storage, "checkpoint storage (output.checkpoint_storage)")


def check_methods(space: SearchSpace, log: Callable[[str], None] = print) -> int:
    """Refuse a space whose model rejects the task's input or whose methods fail on the model.

    Runs :func:`search.trial.preflight.preflight` (each method alone at its most aggressive setting,
    then the whole pipeline, on one real batch; seconds on a CPU) and logs one line per check.

    Returns:
        How many pre-flight checks ran (all passed).
    """
    results = preflight(space, log=log)
    failed = [r for r in results if not r.ok]
    if failed:
        details = "; ".join(f"{r.label}: {r.reason}" for r in failed)
        raise UserError(
            f"{space.path}: {len(failed)} of {plural(len(results), 'pre-flight check')} failed, so the trials "
            f"that use {'it' if len(failed) == 1 else 'them'} would fail too: {details}. Remove the methods "
            "involved or narrow their params (the pre-flight tries each param's most aggressive end)."
        )
    return len(results)


def check_files(space: SearchSpace) -> None:
    """Refuse a space whose baseline checkpoint or data files cannot be read.

    Called by ``slimtune check`` and by ``slimtune search`` before it writes anything. The
    checkpoint is loaded as ``torch.load(weights_only=True)`` loads it in the search, and into the
    space's model (the missing and unexpected keys are named); then :data:`SAMPLE_PER_SPLIT`
    examples of each split, evenly spaced, are read. A bad file met later, in a trial's
    training, fails that trial with the file's name (``tasks.imagefolder.read_image``).
    """

    task = load_task(space)
    if space.baseline_checkpoint:
        _check_checkpoint(space, build_model(space, task))
    for split in ("train", "val", "test"):
        dataset = getattr(task, f"{split}_set")
        n = len(dataset)
        for i in sorted({int(i) for i in np.linspace(0, n - 1, min(n, SAMPLE_PER_SPLIT))}):
            try:
                dataset[i]
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001  any failure here would end the search later
                raise UserError(
                    f"task '{space.task}': reading example {i} of the {split} split failed "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}). Check the task's data files."
                ) from None


def _check_checkpoint(space: SearchSpace, model) -> None:
    """The checkpoint must be a state dict that the space's model loads (strictly)."""

    path = space.baseline_checkpoint
    fix = f"Save the trained {space.model}'s weights with torch.save(model.state_dict(), path)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        what = (
            "a pickled object other than tensors (a whole model?)"
            if "weights_only" in text or "global" in text.lower()
            else "not a PyTorch checkpoint"
        )
        raise UserError(f"{space.path}: baseline.checkpoint {path}: {what} ({text[:160]}). {fix}.") from None
    except Exception as exc:  # noqa: BLE001  a text file, a truncated file: all unreadable
        raise UserError(
            f"{space.path}: baseline.checkpoint {path}: not a PyTorch checkpoint ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}). {fix}."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{space.path}: baseline.checkpoint {path}: holds a {type(state).__name__}, not a state dict of tensors. {fix}.")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [
            f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
            if keys
        ]
        options = f" with options {space.model_options}" if space.model_options else ""
        raise UserError(
            f"{space.path}: baseline.checkpoint {path}: not a state dict of model '{space.model}'{options} on task "
            f"'{space.task}': keys {'; '.join(parts)}. Point baseline.checkpoint at weights of this model, or set model to the one it was saved from."
        )


def check_before_baseline(space: SearchSpace, results_dir: str | Path, tracking_uri: str, log: Callable[[str], None] = print) -> None:
    """Every check that ``slimtune search`` runs before it creates anything or trains the baseline.

    Storage first (instant), then the user's files, then the model and methods pre-flight
    (seconds). The resources of the cluster are checked apart, once Ray is up
    (:func:`check_resources`).
    """
    check_storage(space, results_dir, tracking_uri)
    check_files(space)
    check_methods(space, log)
