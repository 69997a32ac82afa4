"""Fake-quantized convolution and linear layers shared by the quantization methods.

A :class:`QuantConv2d` / :class:`QuantLinear` is still an ``nn.Conv2d`` / ``nn.Linear`` (so FLOP
counting, torch-pruning and export see an ordinary layer) whose forward quantizes its input and
its weight with pluggable quantizer modules. :meth:`QuantMixin.pack` replaces the float weight by
integer codes plus a scale once training is over; the packed layer dequantizes on the fly and
reports its weight at its real bit width through ``storage_bits``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "round_ste",
    "symmetric_quantize",
    "MaxAbsWeightQuantizer",
    "RunningMaxActivationQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "swap_to_quantized",
    "quantized_layers",
]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer with a straight-through gradient of 1."""
    return x + (torch.round(x) - x).detach()


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed ``bits``-bit quantizer: levels -qmax..qmax (2^bits - 1 of them)."""
    return 2 ** (bits - 1) - 1


def symmetric_quantize(x: torch.Tensor, bound: torch.Tensor, bits: int) -> torch.Tensor:
    """Clamp ``x`` to [-bound, bound] and round to ``2^bits - 1`` uniform levels (STE rounding)."""
    levels = qmax(bits)
    bound = bound.clamp_min(1e-8)
    clipped = torch.maximum(torch.minimum(x, bound), -bound)
    return round_ste(clipped * (levels / bound)) * (bound / levels)


class MaxAbsWeightQuantizer(nn.Module):
    """Symmetric per-tensor weight quantizer with scale max|W| (no learned parameters)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def bound(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs().max()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return symmetric_quantize(weight, self.bound(weight), self.bits)


class RunningMaxActivationQuantizer(nn.Module):
    """Symmetric activation quantizer whose bound is a running average of the batch max|x|.

    The bound is observed in training mode (momentum 0.1, like BatchNorm's statistics) and
    frozen in eval mode; before the first observation the input passes through unchanged.
    """

    def __init__(self, bits: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("running_bound", torch.zeros(()))
        # A Python flag, not a buffer: torch.export cannot branch on a tensor's value.
        self.observed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            batch_max = x.detach().abs().max()
            if self.observed:
                self.running_bound.mul_(1 - self.momentum).add_(self.momentum * batch_max)
            else:
                self.running_bound.copy_(batch_max)
                self.observed = True
        if not self.observed:
            return x
        return symmetric_quantize(x, self.running_bound, self.bits)


class QuantMixin:
    """Shared forward and packing logic of the fake-quantized layers."""

    weight_quantizer: nn.Module
    input_quantizer: nn.Module | None

    def _setup_quant(self, weight_quantizer: nn.Module, input_quantizer: nn.Module | None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.packed = False

    @property
    def bits(self) -> int:
        return self.weight_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        if self.packed:
            return self.weight_codes.to(self.weight_scale.dtype) * self.weight_scale
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @torch.no_grad()
    def pack(self) -> None:
        """Replace the float weight by int8 codes and one scale; the outputs stay the same."""
        if self.packed:
            return
        bound = self.weight_quantizer.bound(self.weight).clamp_min(1e-8)
        scale = bound / qmax(self.bits)
        codes = torch.round(torch.clamp(self.weight, -bound, bound) / scale).to(torch.int8)
        del self.weight
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale.reshape(()).to(torch.float32))
        self.packed = True

    def storage_bits(self) -> dict[str, int]:
        """Bit width of each tensor of this layer when stored for deployment."""
        name = "weight_codes" if self.packed else "weight"
        return {name: self.bits}


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized input and weight."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: nn.Module, input_quantizer: nn.Module | None) -> QuantConv2d:
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        layer.load_state_dict(conv.state_dict())
        layer._setup_quant(weight_quantizer, input_quantizer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with quantized input and weight."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: nn.Module, input_quantizer: nn.Module | None) -> QuantLinear:
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        layer.load_state_dict(linear.state_dict())
        layer._setup_quant(weight_quantizer, input_quantizer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


def quantized_layers(model: nn.Module) -> list[QuantMixin]:
    """All fake-quantized layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, QuantMixin)]


def swap_to_quantized(model: nn.Module, make_quantizers, skip: set[str] = frozenset()) -> list[str]:
    """Replace every ``nn.Conv2d`` / ``nn.Linear`` not named in ``skip`` by its quantized twin.

    Args:
        model: Changed in place.
        make_quantizers: ``make_quantizers(name, layer) -> (weight_quantizer, input_quantizer)``.
        skip: Qualified names of layers that stay in floating point.

    Returns:
        The qualified names of the swapped layers.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in skip or isinstance(child, QuantMixin):
                continue
            if type(child) is nn.Conv2d:
                setattr(module, child_name, QuantConv2d.from_float(child, *make_quantizers(full, child)))
                swapped.append(full)
            elif type(child) is nn.Linear:
                setattr(module, child_name, QuantLinear.from_float(child, *make_quantizers(full, child)))
                swapped.append(full)
    return swapped
