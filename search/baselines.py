"""Trained baselines kept in the results folder, reused by every later search with the same key.

A baseline depends on the task (with its options), the model (with its options), the baseline
settings (epochs or checkpoint file), the training settings its phase uses (batch size,
learning rate, optimizer, weight decay), the seed, the measure settings (its metrics hold a
latency), the kind of device it trains on and the torch version. Those make the key; its hash
names the folder ``<results_dir>/baselines/<hash>/`` holding ``baseline.pt``, ``metrics.json``
and ``key.json`` (the key in full, and the search that trained it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from search.space import SearchSpace

__all__ = ["baseline_key", "cached_baseline", "store_baseline"]


def baseline_key(space: SearchSpace) -> dict[str, Any]:
    """Everything a search's trained baseline and its metrics depend on."""
    import torch

    checkpoint = space.baseline_checkpoint
    return {
        "task": space.task,
        "task_options": space.task_options,
        "model": space.model,
        "model_options": space.model_options,
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


def _folder(results_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(results_dir) / "baselines" / digest


def cached_baseline(results_dir: Path, space: SearchSpace) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path, str] | None:
    """The baseline an earlier search of ``results_dir`` trained with this space's key, if any.

    Called by the driver before it trains a search's baseline.

    Returns:
        The weights, the metrics, the cache folder and the name of the search that trained it;
        None when no baseline with this key is stored.
    """
    import torch

    folder = _folder(results_dir, baseline_key(space))
    if not (folder / "key.json").is_file():
        return None
    state = torch.load(folder / "baseline.pt", weights_only=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    return state, metrics, folder, json.loads((folder / "key.json").read_text())["trained_by"]


def store_baseline(results_dir: Path, space: SearchSpace, state: dict[str, torch.Tensor], metrics: dict[str, Any], search: str) -> Path:
    """Keep a freshly trained baseline for the next searches with the same key; returns its folder.

    ``key.json`` is written last (and atomically): a folder without it is not a cached baseline.
    """
    import torch

    key = baseline_key(space)
    folder = _folder(results_dir, key)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "baseline.pt")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    tmp = folder / f".key.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**key, "trained_by": search}, indent=1, default=str))
    tmp.replace(folder / "key.json")
    return folder
