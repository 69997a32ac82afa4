"""Export a compressed model so it can be deployed and loaded back.

An export directory holds:

- ``model.pt2``: a ``torch.export`` program (deployable without slimtune:
  ``torch.export.load(path).module()``); its byte size is the ``artifact_bytes`` metric;
- ``model.pt``: the ``nn.Module`` itself, architecture plus state dict (pruned shapes, swapped
  layers), loadable with slimtune installed: ``torch.load(path, weights_only=False)``;
- ``state_dict.pt``: the weights alone, for users who rebuild the architecture themselves;
- ``recipe.json``: everything in effect when the trial ran (task, data, model, baseline, training,
  pipeline with every hyperparameter, versions) and its metrics; ``slimtune replay`` retrains
  from it (:mod:`search.recipe`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export_model", "write_recipe", "load_program", "load_module", "check_round_trip", "EXPORT_FILES"]

EXPORT_FILES = ("model.pt2", "model.pt", "state_dict.pt", "recipe.json")


def export_model(model: nn.Module, example_input: torch.Tensor, out_dir: Path, recipe: dict[str, Any] | None = None) -> dict[str, int]:
    """Write the export files into ``out_dir`` and return each file's size in bytes.

    The program is exported with a dynamic batch dimension when the model allows it, and with
    the example's fixed shape otherwise. ``recipe.json`` holds ``recipe`` (``{}`` without one);
    a trial writes its full recipe once its metrics are known (:func:`write_recipe`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    # A batch of 1 would specialise the batch dimension; trace with 2 so it stays dynamic.
    traced_input = example_input if example_input.shape[0] > 1 else torch.cat([example_input, example_input])
    try:
        try:
            program = torch.export.export(model, (traced_input,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        except Exception:  # noqa: BLE001  some models (e.g. with data-dependent shapes) only export statically
            program = torch.export.export(model, (example_input,))
        torch.export.save(program, out_dir / "model.pt2")
        torch.save(model, out_dir / "model.pt")
        torch.save(model.state_dict(), out_dir / "state_dict.pt")
        write_recipe(out_dir, recipe or {})
    finally:
        model.train(was_training)
    return {name: (out_dir / name).stat().st_size for name in EXPORT_FILES}


def write_recipe(out_dir: Path, recipe: dict[str, Any]) -> None:
    """Write ``recipe`` as ``out_dir/recipe.json`` (see :mod:`search.recipe` for a trial's)."""
    (Path(out_dir) / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))


def load_program(out_dir: Path) -> nn.Module:
    """The exported program as a callable module."""
    return torch.export.load(Path(out_dir) / "model.pt2").module()


def load_module(out_dir: Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The pickled ``nn.Module`` (architecture and weights)."""
    return torch.load(Path(out_dir) / "model.pt", map_location=map_location, weights_only=False)


def check_round_trip(out_dir: Path, example_input: torch.Tensor, atol: float = 1e-5) -> float:
    """Reload both artifacts and return the largest output difference between them.

    Raises:
        AssertionError: when the two reloaded models disagree by more than ``atol``.
    """
    module = load_module(out_dir, map_location=example_input.device).eval()
    program = load_program(out_dir)
    with torch.no_grad():
        expected = module(example_input)
        got = program(example_input)
    diff = (expected - got).abs().max().item()
    if diff > atol:
        raise AssertionError(f"the exported program differs from the saved module by {diff:.3g} (> {atol}).")
    return diff
