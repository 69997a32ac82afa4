"""Fake-quantized convolution and linear layers shared by the quantization methods.

A :class:`QuantConv2d` / :class:`QuantLinear` is still an ``nn.Conv2d`` / ``nn.Linear`` (so FLOP
counting, torch-pruning and export see an ordinary layer) whose forward quantizes its input and
its weight with pluggable quantizer modules. :meth:`QuantMixin.pack` replaces the float weight by
integer codes plus a scale once training is over; the packed layer dequantizes on the fly and
reports its weight at its real storage size through ``storage_bits``.

Packed layout (:func:`pack_codes`): at 8 bits the codes are stored as they are, one ``int8`` per
weight. Below 8 bits each code ``c`` in ``-qmax..qmax`` is stored as the unsigned ``k``-bit field
``c + qmax`` by the bit packer (:func:`deploy.pack_bits`: a little-endian bit stream of ``uint8``
bytes, two (four) codes per byte at 4 (2) bits, low bits first; 3-bit codes straddle bytes).
A tensor of ``n`` weights then takes ``ceil(n*k/8)`` bytes, so the exported program
(``model.pt2``) shrinks with the bit width. Unpacking uses shifts and masks only, so
``torch.export`` traces it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deploy import pack_bits, unpack_bits

__all__ = [
    "round_ste",
    "qmax",
    "symmetric_quantize",
    "pack_codes",
    "unpack_codes",
    "dequantize_packed",
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


def symmetric_quantize(x: torch.Tensor, bound: torch.Tensor, bits: int, ste: bool = True) -> torch.Tensor:
    """Clamp ``x`` to [-bound, bound] and round to ``2^bits - 1`` uniform levels.

    With ``ste`` the rounding passes gradients straight through; without it (inference, export)
    the same values come from fewer ops.
    """
    levels = qmax(bits)
    bound = bound.clamp_min(1e-8)
    if not ste:
        return torch.round(torch.clamp(x, -bound, bound) * (levels / bound)) * (bound / levels)
    clipped = torch.maximum(torch.minimum(x, bound), -bound)
    return round_ste(clipped * (levels / bound)) * (bound / levels)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Store signed integer codes in ``-qmax..qmax`` at ``bits`` bits each (layout: module docstring).

    Returns:
        ``int8`` codes (8 bits) or a flat ``uint8`` bit stream of ``ceil(numel * bits / 8)`` bytes.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"`2 <= bits <= 8` must hold, but got bits={bits}.")
    flat = codes.detach().reshape(-1).to(torch.int64)
    levels = qmax(bits)
    if flat.numel() and int(flat.abs().max()) > levels:
        raise ValueError(f"codes must lie in -{levels}..{levels} for {bits} bits, but got {int(flat.abs().max())}.")
    if bits == 8:
        return flat.to(torch.int8)
    return pack_bits(flat + levels, bits)  # 0 .. 2^bits - 2: fits in `bits` unsigned bits


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` signed codes, as ``int32``."""
    if bits == 8:
        return packed.to(torch.int32)
    return unpack_bits(packed, bits, numel).to(torch.int32) - qmax(bits)


def dequantize_packed(packed: torch.Tensor, bits: int, shape: tuple[int, ...], scale: torch.Tensor) -> torch.Tensor:
    """The float tensor of ``shape`` that packed codes and their scale stand for.

    Only shifts, masks, reshapes and arithmetic, so it runs inside an exported program; few of
    them, since every op is a node of the exported graph (and bytes of ``model.pt2``).
    """
    numel = math.prod(shape)
    if bits == 8:
        return packed.to(scale.dtype).reshape(shape) * scale
    return (unpack_bits(packed, bits, numel).to(scale.dtype) - qmax(bits)).reshape(shape) * scale


class MaxAbsWeightQuantizer(nn.Module):
    """Symmetric per-tensor weight quantizer with scale max|W| (no learned parameters).

    At 2 bits (ternary codes -1, 0, 1) the bound is at most 1.4 x mean|W|, so that codes are
    nonzero above 0.7 x mean|W|, the threshold of Ternary Weight Networks (arXiv 1605.04711). With
    max|W| alone one large weight rounds every weight under half of it to 0: whole channels went
    to 0, the BatchNorm after a constant channel multiplies its gradient by 1/sqrt(eps), its
    weights jump, raise the max and zero more channels, until the loss is NaN (or the model stays
    at chance).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def bound(self, weight: torch.Tensor) -> torch.Tensor:
        magnitude = weight.detach().abs()
        if self.bits == 2:
            return torch.minimum(magnitude.max(), 1.4 * magnitude.mean())
        return magnitude.max()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return symmetric_quantize(weight, self.bound(weight), self.bits, ste=self.training)


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

    def integer_grid(self) -> tuple[torch.Tensor, int] | None:
        """``(bound, bits)`` of the symmetric grid it rounds to in eval mode; None before the first observation.

        Read by the ONNX form (:mod:`deploy._onnx`), which quantizes with this bound, not a new
        calibration.
        """
        return (self.running_bound.detach(), self.bits) if self.observed else None

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
        return symmetric_quantize(x, self.running_bound, self.bits, ste=self.training)


class QuantMixin:
    """Shared forward and packing logic of the fake-quantized layers."""

    weight_quantizer: nn.Module
    input_quantizer: nn.Module | None

    def _setup_quant(self, weight_quantizer: nn.Module, input_quantizer: nn.Module | None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.packed = False
        #: Bits of the input when a module before this layer quantizes it (PAMS's block input
        #: quantizer feeds the block's first conv); None: the input quantizer's, or 32.
        self.quantized_input_bits: int | None = None
        self._inference_weight: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return self.weight_quantizer.bits

    def operand_bits(self) -> tuple[int, int]:
        """``(weight bits, input bits)`` of this layer's multiply-accumulates.

        Called by :func:`deploy.count_flops` to weigh the layer's MACs in ``bops``. The
        input is 32-bit float unless this layer's input quantizer or the module before it
        (``quantized_input_bits``) quantizes it.
        """
        if self.input_quantizer is not None:
            return self.bits, self.input_quantizer.bits
        return self.bits, self.quantized_input_bits or 32

    def quantized_weight(self) -> torch.Tensor:
        if self._inference_weight is not None and not self.training:
            return self._inference_weight
        if self.packed:
            return dequantize_packed(self._buffers[self._packed_name], self.bits, self.weight_shape, self.weight_scale)
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def cache_inference_weight(self, enabled: bool) -> None:
        """Compute the (dequantized) weight once and use it in every eval-mode forward, or stop.

        Called by :func:`deploy.latency_ms` around its timed passes: a deployed model
        unpacks its codes once when it is loaded, not in every forward. Off (the default), each
        forward unpacks, which keeps the unpacking in an exported program (``model.pt2`` stores
        the packed codes) and follows any change of the codes. The cache is never saved.
        """
        self._inference_weight = None
        if enabled:
            self._inference_weight = self.quantized_weight().detach()

    def __getstate__(self) -> dict:
        # Pickles and deep copies (torch.save of the module, copy.deepcopy) leave the cache out.
        state = super().__getstate__()
        state["_inference_weight"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Layers pickled before these attributes existed.
        self.__dict__.setdefault("_inference_weight", None)
        self.__dict__.setdefault("quantized_input_bits", None)

    @property
    def _packed_name(self) -> str:
        # 8 bits keep the int8 codes in the weight's shape under their historical name.
        return "weight_codes" if self.bits == 8 else "weight_packed"

    @property
    def weight_codes(self) -> torch.Tensor:
        """The packed weight's signed integer codes (``int8``, the weight's shape).

        At 8 bits this is the stored buffer itself; below 8 bits the codes unpacked from
        ``weight_packed``.
        """
        if not self.packed:
            raise AttributeError("weight_codes exists only after pack()")
        if self.bits == 8:
            return self._buffers["weight_codes"]
        return unpack_codes(self.weight_packed, self.bits, math.prod(self.weight_shape)).reshape(self.weight_shape).to(torch.int8)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @torch.no_grad()
    def pack(self) -> None:
        """Replace the float weight by packed codes and one scale; the outputs stay the same.

        8 bits: buffer ``weight_codes``, int8 in the weight's shape. Fewer bits: buffer
        ``weight_packed``, the flat bit stream of the module docstring. The scale
        ``max|W| / qmax`` goes into ``weight_scale``.
        """
        if self.packed:
            return
        codes, scale = self.integer_weight()
        self.weight_shape = tuple(self.weight.shape)
        del self.weight
        packed = pack_codes(codes, self.bits)
        self.register_buffer(self._packed_name, packed.reshape(self.weight_shape) if self.bits == 8 else packed)
        self.register_buffer("weight_scale", scale.reshape(()).to(torch.float32))
        self.packed = True

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's signed integer codes (``int8``, the weight's shape) and their one scale ``max|W| / qmax``.

        What :meth:`pack` stores, and what the ONNX form (:mod:`deploy._onnx`) writes as
        ``int8`` initializers dequantized by ``DequantizeLinear``: below 8 bits, the same trained
        codes in ``-qmax..qmax``, run by ``int8`` kernels.
        """
        if self.packed:
            return self.weight_codes, self.weight_scale
        bound = self.weight_quantizer.bound(self.weight).clamp_min(1e-8)
        scale = bound / qmax(self.bits)
        return torch.round(torch.clamp(self.weight, -bound, bound) / scale).to(torch.int8), scale

    def storage_bits(self) -> dict[str, int]:
        """Bits per element of this layer's low-precision tensors when stored for deployment.

        Packed: every byte of the codes' buffer is stored as it is (8 bits each). Before packing:
        the float weight at the bit width it will be packed to.
        """
        return {self._packed_name: 8} if self.packed else {"weight": self.bits}

    def stored_weight_counts(self) -> dict[str, int]:
        """How many weights each tensor named by :meth:`storage_bits` holds (read by ``count_params``)."""
        if self.packed:
            return {self._packed_name: math.prod(self.weight_shape)}
        return {"weight": self.weight.numel()}


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized input and weight."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: nn.Module, input_quantizer: nn.Module | None) -> QuantConv2d:
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
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
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
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
