"""The gated convolution of decouple (:mod:`methods.decouple`): modules, where gates go, and what a gated network costs.

:class:`ArchitectureControl` (the ACM) maps a convolution's input to a binary encoding of its
filters, :class:`GatedConv` multiplies the convolution's (batch-normed) output by it and, in its
dynamic form (:func:`set_dynamic`), computes only the open filters. :func:`find_gate_sites`,
:func:`insert_gates` and :func:`remove_inactive_filters` decide and do the surgery;
:func:`collect_encodings`, :func:`expected_macs`, :func:`static_macs` and :func:`latencies`
measure a gated network on data.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from deploy import count_flops, eval_mode, latency_ms
from methods._surgery import loose_parameters, pruning_axes
from methods.gal import find_mask_sites

__all__ = [
    "ArchitectureControl",
    "GatedConv",
    "Encodings",
    "find_gate_sites",
    "insert_gates",
    "gated_convs",
    "collect_encodings",
    "remove_inactive_filters",
    "set_dynamic",
    "expected_macs",
    "static_macs",
    "latencies",
]


# ----------------------------------------------------------------------------------------------
# Modules: the ACM and the gated convolution.
# ----------------------------------------------------------------------------------------------


class ArchitectureControl(nn.Module):
    """The ACM: pooled input -> FC -> ReLU -> FC -> sigmoid -> binary encoding (straight-through).

    Returns ``(batch, out_channels)``: 1 for an open filter, 0 for a closed one. In training mode
    the gradient is that of the sigmoid (straight-through); in eval mode the exact 0/1 values.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, threshold: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        self.threshold = threshold
        with torch.no_grad():
            self.fc2.bias.fill_(math.log(threshold / (1.0 - threshold)) + 1.0)  # open at the start

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid before binarisation, ``(batch, out_channels)``."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.probabilities(x)
        hard = (s > self.threshold).to(s.dtype)
        if not self.training:
            return hard
        return hard + (s - s.detach())  # exactly 0/1 forward (s - s is 0), the sigmoid's gradient backward


class GatedConv(nn.Module):
    """``gate(x) * BN(conv(x))``, the gate from an :class:`ArchitectureControl` on the same input.

    With ``dynamic`` set, in eval mode only the filters open for some sample of the batch are
    computed, from the input channels that are nonzero somewhere in the batch; the others are
    zeros. The result is the same function (batch norm applied from its running statistics).

    Args:
        conv: The convolution (``groups == 1``).
        bn: The affine batch norm that followed it, or None.
        acm: The gate.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, acm: ArchitectureControl) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.acm = acm
        self.dynamic = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.acm(x)
        if self.dynamic and not self.training:
            return self._open_filters_only(x, gate)
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        return out * gate[:, :, None, None]

    @staticmethod
    def _first(size: int, device: torch.device) -> torch.Tensor:
        return torch.arange(size, device=device) == 0

    def _open_filters_only(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        # Channel 0 always runs, so no shape is empty when every gate (or input) is zero; it is
        # zero then too, and a data-independent shape needs no branch in the exported graph.
        outputs = torch.nonzero((gate.amax(0) > 0) | self._first(gate.shape[1], gate.device)).squeeze(1)
        inputs = torch.nonzero((x.abs().amax((0, 2, 3)) > 0) | self._first(x.shape[1], x.device)).squeeze(1)
        weight = conv.weight.index_select(0, outputs).index_select(1, inputs)
        bias = conv.bias.index_select(0, outputs) if conv.bias is not None else None
        out = F.conv2d(x.index_select(1, inputs), weight, bias, conv.stride, conv.padding, conv.dilation)
        if self.bn is not None:
            bn = self.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            out = out * scale.index_select(0, outputs)[None, :, None, None] + shift.index_select(0, outputs)[None, :, None, None]
        out = out * gate.index_select(1, outputs)[:, :, None, None]
        full = out.new_zeros(x.shape[0], conv.out_channels, out.shape[2], out.shape[3])
        return full.index_copy(1, outputs, out)


def gated_convs(model: nn.Module) -> dict[str, GatedConv]:
    """The model's gated convolutions by module name, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GatedConv)}


def set_dynamic(model: nn.Module, dynamic: bool) -> None:
    """Make every gated conv of ``model`` the dynamic (skip closed filters) or the static form."""
    for m in gated_convs(model).values():
        m.dynamic = dynamic


# ----------------------------------------------------------------------------------------------
# Deciding where gates go; doing the insertion and the removal.
# ----------------------------------------------------------------------------------------------


def find_gate_sites(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str | None]]:
    """``(conv, batch norm or None)`` for every conv whose output channels can be removed on their own.

    The same units as gal's ``channel`` masks (torch-pruning's dependency graph); convolutions
    with ``groups > 1`` or a padding other than zeros are left out. Empty when the model has none (a gated pipeline then
    gates nothing).
    """
    try:
        units = find_mask_sites(model, example_input, "channel").channels
    except ValueError:
        return []
    sites = []
    for conv_name, scaled in units:
        conv = model.get_submodule(conv_name)
        if conv.groups != 1 or conv.padding_mode != "zeros":  # the dynamic form's gather assumes both
            continue
        sites.append((conv_name, None if scaled == conv_name else scaled))
    return sites


def insert_gates(model: nn.Module, sites: list[tuple[str, str | None]], acm_reduction: int, threshold: float) -> None:
    """Replace each site's conv by a :class:`GatedConv` (holding the conv and its batch norm) and the batch norm by an identity."""
    for conv_name, bn_name in sites:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name) if bn_name is not None else None
        acm = ArchitectureControl(conv.in_channels, conv.out_channels, max(4, conv.out_channels // acm_reduction), threshold)
        acm.to(conv.weight.device)
        model.set_submodule(conv_name, GatedConv(conv, bn, acm))
        if bn_name is not None:
            model.set_submodule(bn_name, nn.Identity())


def remove_inactive_filters(
    model: nn.Module, sites: list[tuple[str, str | None]], keep: dict[str, list[int]], example_input: torch.Tensor
) -> int:
    """Physically remove every filter of each gated conv that ``keep[conv name]`` does not list; returns how many.

    The gated convs are unwrapped into their conv and batch norm, torch-pruning removes the
    filters with every channel that reads them (the next layers' inputs), the removed inputs
    of a gated conv are removed from its ACM's first layer too, and the gates are put back.
    """
    gated = gated_convs(model)
    acms = {name: gated[name].acm for name, _ in sites}
    for conv_name, bn_name in sites:
        model.set_submodule(conv_name, gated[conv_name].conv)
        if bn_name is not None:
            model.set_submodule(bn_name, gated[conv_name].bn)
    conv_of = {id(model.get_submodule(name)): name for name, _ in sites}
    axes = pruning_axes(loose_parameters(model, example_input))
    with eval_mode(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, unwrapped_parameters=axes, verbose=False)
    removed = 0
    for conv_name, _ in sites:
        conv = model.get_submodule(conv_name)
        kept = set(keep[conv_name])
        drop = [i for i in range(conv.out_channels) if i not in kept]
        if not drop:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop)
        for dep, idxs in group:
            target = dep.target.module
            if id(target) in conv_of and graph.is_in_channel_pruning_fn(dep.handler):
                _drop_columns(acms[conv_of[id(target)]].fc1, idxs)
        group.prune()
        _drop_rows(acms[conv_name].fc2, drop)
        removed += len(drop)
    for conv_name, bn_name in sites:
        bn = model.get_submodule(bn_name) if bn_name is not None else None
        model.set_submodule(conv_name, GatedConv(model.get_submodule(conv_name), bn, acms[conv_name]))
        if bn_name is not None:
            model.set_submodule(bn_name, nn.Identity())
    return removed


def _drop_rows(linear: nn.Linear, drop: list[int]) -> None:
    """Remove the output features ``drop`` of ``linear``."""
    dropped = set(drop)
    kept = [i for i in range(linear.out_features) if i not in dropped]
    linear.weight = nn.Parameter(linear.weight.detach()[kept].clone())
    linear.bias = nn.Parameter(linear.bias.detach()[kept].clone())
    linear.out_features = len(kept)


def _drop_columns(linear: nn.Linear, drop: list[int]) -> None:
    """Remove the input features ``drop`` of ``linear``."""
    dropped = set(drop)
    kept = [i for i in range(linear.in_features) if i not in dropped]
    linear.weight = nn.Parameter(linear.weight.detach()[:, kept].clone())
    linear.in_features = len(kept)


# ----------------------------------------------------------------------------------------------
# Measuring: encodings on data, expected MACs, latency.
# ----------------------------------------------------------------------------------------------


@dataclass
class Encodings:
    """The binary encodings of a data set's inputs.

    Attributes:
        layers: ``{gated conv name: (N, C_out) bool}``: which filters were open for each input.
        targets: ``(N,)`` labels.
        predictions: ``(N,)`` the model's predicted classes.
    """

    layers: dict[str, torch.Tensor]
    targets: torch.Tensor
    predictions: torch.Tensor

    @property
    def paths(self) -> torch.Tensor:
        """``(N, total filters)`` float: the concatenated encodings, one row per input."""
        return torch.cat([v.float() for v in self.layers.values()], dim=1)


def _record_gates(model: nn.Module, found: dict[str, list[torch.Tensor]]) -> list[Any]:
    handles = []
    for name, m in gated_convs(model).items():
        found[name] = []
        handles.append(m.acm.register_forward_hook(lambda mod, args, out, name=name: found[name].append(out.detach().cpu() > 0.5)))
    return handles


@torch.no_grad()
def collect_encodings(model: nn.Module, loader: Any, device: torch.device | str) -> Encodings:
    """Run ``model`` in eval mode over ``loader`` and record every input's encodings, labels and predictions."""
    found: dict[str, list[torch.Tensor]] = {}
    handles = _record_gates(model, found)
    targets, predictions = [], []
    try:
        with eval_mode(model):
            for inputs, labels in loader:
                outputs = model(inputs.to(device))
                predictions.append(outputs.argmax(1).cpu())
                targets.append(labels.cpu())
    finally:
        for h in handles:
            h.remove()
    layers = {name: torch.cat(v) for name, v in found.items() if v}
    return Encodings(layers, torch.cat(targets), torch.cat(predictions))


def _conv_macs(conv: nn.Conv2d, inputs: torch.Tensor | int, outputs: torch.Tensor | int, out_pixels: int) -> Any:
    kh, kw = conv.kernel_size
    return inputs * outputs * kh * kw * out_pixels


@torch.no_grad()
def expected_macs(model: nn.Module, loader: Any, device: torch.device | str, static_macs: float) -> float:
    """Expected MACs per sample of the dynamic form over ``loader``'s inputs.

    ``static_macs`` (the FLOP counter's figure for the static form at batch size 1) less, for
    every gated conv, its full cost and plus what it computes for each sample: the open filters
    times the sample's nonzero input channels times kernel size times output pixels. The ACMs'
    layers are in ``static_macs``.
    """
    per_sample: list[torch.Tensor] = []
    full = 0.0
    handles = []
    shapes: dict[str, int] = {}
    for name, m in gated_convs(model).items():

        def hook(mod: GatedConv, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            x = args[0]
            gate = mod.acm(x)
            pixels = out.shape[2] * out.shape[3]
            shapes[name] = pixels
            # At least one channel each way runs (GatedConv._open_filters_only).
            active_in = (x.abs().amax((2, 3)) > 0).sum(1).clamp_min(1)
            per_sample.append(_conv_macs(mod.conv, active_in, gate.sum(1).clamp_min(1), pixels).double().cpu())

        handles.append(m.register_forward_hook(hook))
    total, count = 0.0, 0
    try:
        with eval_mode(model):
            for inputs, _ in loader:
                per_sample.clear()
                model(inputs.to(device))
                total += float(torch.stack(per_sample).sum())
                count += inputs.shape[0]
    finally:
        for h in handles:
            h.remove()
    for name, m in gated_convs(model).items():
        full += _conv_macs(m.conv, m.conv.in_channels, m.conv.out_channels, shapes.get(name, 0))
    return static_macs - full + total / max(count, 1)


def static_macs(model: nn.Module, example_input: torch.Tensor) -> float:
    """MACs of one eval-mode pass at batch size 1, as the trial counts them (:func:`deploy.count_flops`)."""
    return float(count_flops(model, example_input).macs)


def _per_sample(model: nn.Module) -> Any:
    return lambda x: torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])


def latencies(model: nn.Module, batch: torch.Tensor, repeats: int = 10) -> dict[str, float]:
    """CPU latency of both forms at batch size 1, and of the per-batch union against a per-sample loop on ``batch``.

    Runs on a CPU copy of ``model`` in eval mode. Keys: ``latency_ms_static``,
    ``latency_ms_dynamic`` (batch 1), ``latency_ms_static_batch``, ``latency_ms_union_batch``
    and ``latency_ms_per_sample_batch`` (the whole ``batch``).
    """
    cpu = copy.deepcopy(model).cpu().eval()
    batch = batch.cpu()
    few = max(3, repeats // 3)
    out: dict[str, float] = {}
    # The trial's timer (deploy.latency_ms), after two warm-up passes, at the threads as set.
    set_dynamic(cpu, False)
    out["latency_ms_static"] = latency_ms(cpu, batch[:1], repeats, warmup=2)
    out["latency_ms_static_batch"] = latency_ms(cpu, batch, few, warmup=2)
    set_dynamic(cpu, True)
    out["latency_ms_dynamic"] = latency_ms(cpu, batch[:1], repeats, warmup=2)
    out["latency_ms_union_batch"] = latency_ms(cpu, batch, few, warmup=2)
    out["latency_ms_per_sample_batch"] = latency_ms(_per_sample(cpu), batch, few, warmup=2)
    return out
