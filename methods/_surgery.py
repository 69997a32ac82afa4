"""Helpers that look at a model's structure, shared by the methods that change it."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from deploy import eval_mode

__all__ = ["output_layers", "first_layers", "dependency_graph"]


def _leaf_calls(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Run ``model`` once and record (name, module, output) of every conv/linear call in order."""
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(
                module.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m, o)))
            )
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return calls


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers whose output is the model's output (the classifier).

    Their output channels are the classes, so no method may remove or change them blindly.
    """
    calls = _leaf_calls(model, example_input)
    if not calls:
        return []
    return [calls[-1][0]]


def first_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers that read the raw input."""
    calls = _leaf_calls(model, example_input)
    return [calls[0][0]] if calls else []


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of coupled channels, traced in eval mode (BN statistics untouched).

    torch-pruning traces the autograd graph, so frozen parameters are unfrozen while it traces.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with eval_mode(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    finally:
        for p in frozen:
            p.requires_grad_(False)
