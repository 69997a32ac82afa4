"""Helpers that look at a model's structure, shared by the methods that change it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from deploy import eval_mode

__all__ = [
    "output_layers",
    "first_layers",
    "dependency_graph",
    "LooseParameter",
    "loose_parameters",
    "pruning_axes",
    "untold_in",
    "layer_calls",
    "shared_layers",
    "ChannelPlan",
    "channel_plan",
    "holds_method_layers",
]


def _one_pass(model: nn.Module, example_input: torch.Tensor, handles: list) -> None:
    """Run ``model`` once on ``example_input`` in eval mode without gradients, then remove ``handles`` (its hooks)."""
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()


def _leaf_calls(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Run ``model`` once and record (name, module, output) of every conv/linear call in order."""
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m, o))))
    _one_pass(model, example_input, handles)
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


def _traced(model: nn.Module, example_input: torch.Tensor, unwrapped: list[tuple[nn.Parameter, int]] | None) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` traced in eval mode, the loose parameters' axes given by ``unwrapped``.

    torch-pruning traces the autograd graph, so frozen parameters are unfrozen while it traces. It
    is told to be quiet about loose parameters: :func:`loose_parameters` gives every one it would
    name an axis, except those whose every dimension has size 1, which it leaves out of the graph
    (they broadcast over any channel count).
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with eval_mode(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, unwrapped_parameters=unwrapped, verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)


@dataclass(frozen=True, eq=False)
class LooseParameter:
    """A parameter held outside every layer torch-pruning knows (a learnt position table, a gate), and the axis its channels lie on.

    torch-pruning removes a coupled channel's entries from such a parameter along one axis, the
    last of size above 1 unless told: wrong for a ``(channels, length)`` table added to a
    ``(batch, channels, length)`` activation.

    Attributes:
        name: Its name in the model (``position``).
        parameter: The parameter.
        axis: The one dimension whose size is the width of the layers torch-pruning ties it to; None
            when no single dimension is (then what it is tied to must be left alone), or when nothing
            ties it to a layer (one forward pass does not read it, so no channel removal reaches it).
        why: Why ``axis`` is None, for what ``slimtune check`` prints; empty otherwise.
        pruning_dim: What torch-pruning is told: ``axis``, or where that is None its own default,
            which then removes nothing (the groups it is in are left alone).
    """

    name: str
    parameter: nn.Parameter
    axis: int | None
    why: str
    pruning_dim: int


def _tied_width(graph: tp.DependencyGraph, parameter: nn.Parameter) -> int | None:
    """The channel count of the layers whose channels the graph couples to ``parameter``'s, or None (none, or several)."""
    group = graph.get_pruning_group(parameter, tp.prune_parameter_out_channels, idxs=[0])
    produced, read = set(), set()
    for dep, _ in group:
        target = dep.target.module
        if isinstance(target, nn.Parameter) or not isinstance(target, nn.Module):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            produced.add(graph.get_out_channels(target))
        elif graph.is_in_channel_pruning_fn(dep.handler):
            read.add(graph.get_in_channels(target))
    # What a layer writes is the channel count; what one reads may be flattened (channels x positions).
    widths = (produced or read) - {None}
    return next(iter(widths)) if len(widths) == 1 else None


def _loose_in(model: nn.Module, graph: tp.DependencyGraph) -> tuple[LooseParameter, ...]:
    names = {id(p): name for name, p in model.named_parameters()}
    loose = []
    for parameter, default in graph.unwrapped_parameters:
        name, shape = names[id(parameter)], tuple(parameter.shape)
        if parameter not in graph.module2node:
            loose.append(LooseParameter(name, parameter, None, "one forward pass does not read it", default))
            continue
        width = _tied_width(graph, parameter)
        axes = [d for d, size in enumerate(shape) if size == width]
        if len(axes) == 1:
            loose.append(LooseParameter(name, parameter, axes[0], "", axes[0]))
        elif width is None:
            loose.append(LooseParameter(name, parameter, None, "the layers tied to it do not share one width", default))
        else:
            which = "none of its axes has" if not axes else f"{len(axes)} of its axes have"
            loose.append(LooseParameter(name, parameter, None, f"{which} the width of the layers tied to it, {width}", default))
    return tuple(loose)


def loose_parameters(model: nn.Module, example_input: torch.Tensor) -> tuple[LooseParameter, ...]:
    """The parameters of ``model`` outside torch-pruning's layers (with a dimension above 1), each with its channel axis."""
    return _loose_in(model, _traced(model, example_input, None))


def pruning_axes(loose: tuple[LooseParameter, ...]) -> list[tuple[nn.Parameter, int]]:
    """torch-pruning's ``unwrapped_parameters`` (a pruner's or a graph's) for the parameters ``loose``."""
    return [(lp.parameter, lp.pruning_dim) for lp in loose]


def untold_in(group: tp.Group, loose: tuple[LooseParameter, ...]) -> LooseParameter | None:
    """The first parameter of ``loose`` in ``group`` whose channel axis is unknown: removing the group's channels would cut it wrongly."""
    unknown = {id(lp.parameter): lp for lp in loose if lp.axis is None}
    return next((unknown[id(dep.target.module)] for dep, _ in group if id(dep.target.module) in unknown), None)


def _graph_and_loose(model: nn.Module, example_input: torch.Tensor) -> tuple[tp.DependencyGraph, tuple[LooseParameter, ...]]:
    graph = _traced(model, example_input, None)
    loose = _loose_in(model, graph)
    if any(lp.axis is not None and lp.axis != default for lp, (_, default) in zip(loose, graph.unwrapped_parameters)):
        graph = _traced(model, example_input, pruning_axes(loose))  # traced again: a parameter's axis sets its width in the graph
    return graph, loose


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of coupled channels, traced in eval mode (BN statistics untouched), with the
    channel axis of every loose parameter (:class:`LooseParameter`) given."""
    return _graph_and_loose(model, example_input)[0]


def holds_method_layers(model: nn.Module) -> bool:
    """Whether an earlier method of the pipeline put its own layers into ``model`` (clustered, cheap, quantized ones).

    A method that finds nothing of its kind on such a model leaves it as it is: the pipeline's order
    is checked by :func:`methods.check_pipeline`, and the user's model did have layers of its kind.
    """
    return any(type(m).__module__.startswith("methods.") for m in model.modules())


def layer_calls(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """How many times each module holding parameters of its own runs in one eval-mode pass on ``example_input``.

    A module missing from the result is not reached by that pass (a branch taken only in
    training mode, or for another input); one counted more than once shares its weights
    between several places of the network (a layer called twice, a recurrent step).
    """
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(lambda m, i, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)))
    _one_pass(model, example_input, handles)
    return counts


def shared_layers(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """The modules with parameters that one forward pass runs more than once (shared weights), with their call counts."""
    return {name: n for name, n in layer_calls(model, example_input).items() if n > 1}


@dataclass(frozen=True)
class ChannelPlan:
    """Which conv/linear layers lose output channels under torch-pruning, and why the others do not.

    Attributes:
        prunable: Layers whose output channels can be removed (with every channel coupled to them).
        left_alone: ``(layer, reason)`` for every other conv/linear layer and attention module.
    """

    prunable: tuple[str, ...]
    left_alone: tuple[tuple[str, str], ...]


def _kind_of_trouble(module: nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention):
        return "multi-head attention (its heads split the embedding, so its width is left as it is)"
    if isinstance(module, nn.RNNBase):
        return "a torch.nn recurrent layer"
    return None


def channel_plan(model: nn.Module, example_input: torch.Tensor) -> ChannelPlan:
    """Decide which layers' output channels torch-pruning may remove safely on ``model``.

    Left alone: the classifier (its outputs are the classes); every layer whose channel group
    (torch-pruning's dependency graph) holds a module that one forward pass runs more than once
    (shared weights, a recurrent step: the graph couples its calls inconsistently and removes
    their channels once per call), an attention module or a ``torch.nn`` recurrent layer; and
    every layer when the traced pass does not reach some of them (a forward that branches on
    the mode or the input), since what their channels are coupled to cannot be seen.
    """
    calls = layer_calls(model, example_input)
    troubles = {name: why for name, m in model.named_modules() if (why := _kind_of_trouble(m)) is not None}
    left: dict[str, str] = {name: why for name, why in troubles.items()}
    layers = {}
    for name, m in model.named_modules():
        owner = next((t for t in troubles if name.startswith(t + ".")), None)
        if owner is not None:  # its weights are read by the module that holds it (attention's out_proj)
            left[name] = f"part of '{owner}', {troubles[owner]}"
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            layers[name] = m
    unreached = [name for name in layers if name not in calls]
    if unreached:
        shown = ", ".join(f"'{n}'" for n in unreached[:3]) + (f" and {len(unreached) - 3} more" if len(unreached) > 3 else "")
        why = f"one forward pass does not reach {shown}, so what their channels are coupled to cannot be traced"
        return ChannelPlan((), tuple((name, why) for name in layers) + tuple(left.items()))
    for name in output_layers(model, example_input):
        left[name] = "the classifier: its outputs are the classes"
    names = {m: n for n, m in model.named_modules()}
    graph, loose = _graph_and_loose(model, example_input)
    prunable = []
    for name, layer in layers.items():
        if name in left:
            continue
        if layer not in graph.module2node:
            left[name] = "not in torch-pruning's traced graph"
            continue
        prune = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(layer, prune, idxs=[0])
        coupled = [names[dep.target.module] for dep, _ in group if dep.target.module in names]
        shared = [n for n in coupled if calls.get(n, 0) > 1]
        trouble = [n for n in coupled if n in troubles]
        untold = untold_in(group, loose)
        if trouble:
            left[name] = f"its channels are coupled to '{trouble[0]}', {troubles[trouble[0]]}"
        elif untold is not None:
            shape = tuple(untold.parameter.shape)
            left[name] = (
                f"its channels are coupled to the parameter '{untold.name}' {shape}, whose channel axis cannot be told: {untold.why}"
            )
        elif shared:
            left[name] = (
                f"its channels are coupled to '{shared[0]}', which runs {calls[shared[0]]} times per forward pass (shared weights or a recurrent step)"
            )
        else:
            prunable.append(name)
    return ChannelPlan(tuple(prunable), tuple(left.items()))
