"""Cheap convolutions: replace every 3x3 convolution of a model by a cheap spatial op plus a 1x1.

From "Training CNNs with cheap convolutions and online distillation" (Xie et al., arXiv
1909.13063), written from the paper's description. A 3x3
convolution ``C_in -> C_out`` becomes :class:`CheapConv`: a spatial op that keeps ``C_in``
channels followed by a 1x1 convolution ``C_in -> C_out`` that carries the channel change:

* ``"dw"``: depthwise 3x3 (``groups = C_in``), ``9 C_in`` weights;
* ``"shift"``: :class:`Shift`, no weights and no arithmetic;
* ``"group"``: grouped 3x3 with ``g`` groups, ``9 C_in^2 / g`` weights (``g`` falls back to the
  largest divisor of ``C_in`` that is at most ``g``).

Choices, with the reasons:

* **BatchNorm**: no BN is added. The BN that follows the original convolution (``bn1``/``bn2`` of
  a ResNet block) now follows the 1x1 and is the reference's "BN + ReLU after the pointwise";
  there is no BN between the spatial op and the 1x1. This reproduces the reference's derived
  ResNet-56 sizes exactly (0.120M DW, 0.102M Shift with option-B shortcuts).
* **Stride**: by default (``stride_on="spatial"``) on the spatial op for ``dw``/``group`` and on
  the 1x1 for ``shift`` (a strided 1x1 reads every ``s``-th shifted pixel). Subsampling
  commutes with the 1x1 and with the shift, so every placement computes the same function and
  keeps the original convolution's output shape for every stride, padding and dilation; the
  spatial op is the cheapest place. ``stride_on="pointwise"`` is the reference's placement
  (spatial op at full resolution, strided 1x1): same outputs, more MACs, kept so that the
  reference's derived MACs can be reproduced. The reference also moves a ResNet block's
  downsampling stride from its first to its *second* cheap pair, so the first pair runs at full
  resolution; that changes the architecture, which a per-convolution swap does not do. Hence
  ResNet-56 costs less here (DW 19.2M, Shift 14.6M MACs with option-B shortcuts) than the
  reference's 20.5M and 15.4M; the parameters are the same.
* **Stem**: by default the convolutions that read the raw image are kept (``skip``), as the
  reference replaces only the convolutions inside the residual blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CHEAP_CONVS", "CheapConvKind", "STRIDE_PLACES", "shift", "Shift", "CheapConv", "replace_3x3_convs", "cheap_groups"]

#: Kinds of cheap convolution, the most compressing first.
CheapConvKind = Literal["shift", "dw", "group"]
CHEAP_CONVS: tuple[str, ...] = get_args(CheapConvKind)
#: Where a :class:`CheapConv` subsamples: on the spatial op (cheapest) or on the 1x1 (reference).
STRIDE_PLACES = ("spatial", "pointwise")


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def shift(x: torch.Tensor, padding: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1), reverse: bool = False) -> torch.Tensor:
    """The 3x3 shift of :class:`Shift`: one zero padding, then windows read from it, no arithmetic.

    Args:
        x: ``(N, C, H, W)``.
        padding: Zeros added on each side (negative: rows/columns cropped), as a 3x3 conv's.
        dilation: Pixels per shift step.
        reverse: Move every channel the opposite way.

    Returns:
        ``(N, C, H + 2 * padding - 2 * dilation, W + 2 * padding - 2 * dilation)``.
    """
    (ph, pw), (dh, dw) = padding, dilation
    n, channels, height, width = x.shape
    out_h, out_w = height + 2 * ph - 2 * dh, width + 2 * pw - 2 * dw
    # Contiguous (a no-op unless x is channels-last): the strides below assume channels outermost.
    padded = F.pad(x, (pw, pw, ph, ph)).contiguous()
    sn, sc, sh, sw = padded.stride()
    sign = -1 if reverse else 1
    # out[c, y, x] = padded[c, y + d(1 - dy), x + d(1 - dx)]. With c = 9g + 3ky + kx, dy = ky - 1 and
    # dx = kx - 1, the window's start d(1 - dy) is linear in ky (and in kx), so all nine windows
    # of every group are one strided view (g, ky, kx, y, x) of the padded tensor: a single
    # as_strided instead of 9 slices and a stack per layer, which keeps export graphs small.
    moved = 9 * (channels // 9)
    parts = []
    if moved:
        windows = padded.as_strided(
            (n, moved // 9, 3, 3, out_h, out_w),
            (sn, 9 * sc, 3 * sc - sign * dh * sh, sc - sign * dw * sw, sh, sw),
            padded.storage_offset() + (1 + sign) * (dh * sh + dw * sw),
        )
        parts.append(windows.reshape(n, moved, out_h, out_w))
    if moved < channels:
        parts.append(padded[:, moved:, dh : dh + out_h, dw : dw + out_w])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _ShiftFunction(torch.autograd.Function):
    """The shift as one autograd node whose backward is the reverse shift.

    Autograd could differentiate :func:`shift` by itself; the single node is there for graph
    tracers. Torch-pruning reads the autograd graph to couple channels: it takes this node for
    one channel-wise op (which the shift is), whereas on the strided view, reshape and
    concatenation inside :func:`shift` it mis-maps channels or does not finish tracing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
        ctx.padding, ctx.dilation = padding, dilation
        return shift(x, padding, dilation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # out[i] = in[i + d(1 - dy) - p], so grad_in[j] = grad_out[j - d(1 - dy) + p]: the shift by
        # the opposite offsets with padding 2d - p (cropped where negative), back to the input size.
        (ph, pw), (dh, dw) = ctx.padding, ctx.dilation
        return shift(grad, (2 * dh - ph, 2 * dw - pw), ctx.dilation, reverse=True), None, None


class Shift(nn.Module):
    """Parameter-free 3x3 shift: each channel's map moves by one of the nine 3x3 offsets.

    Channel ``c < 9 * floor(C / 9)`` moves by ``dx = (c mod 3) - 1`` columns and
    ``dy = (floor(c / 3) mod 3) - 1`` rows (``out[c, y, x] = in[c, y - dy*d, x - dx*d]``, zeros
    where that falls outside); the last ``C mod 9`` channels are not moved. It is the
    one-hot-kernel 3x3 convolution of the same ``padding`` and ``dilation`` (``d``), so the
    output size is ``H + 2 * padding - 2 * d``; with the usual ``padding = dilation = 1`` the
    map keeps its size.

    Zero padding, strided views and copies only (:func:`shift`): no arithmetic, so 0 FLOPs for
    any counter, and it runs on every device. The backward pass is the reverse shift.

    Args:
        padding: Zeros added on each side, as a 3x3 convolution's ``padding``.
        dilation: Distance in pixels of one shift step.
    """

    def __init__(self, padding: int | tuple[int, int] = 1, dilation: int | tuple[int, int] = 1) -> None:
        super().__init__()
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ShiftFunction.apply(x, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, dilation={self.dilation}"


def cheap_groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (grouped convs need one)."""
    groups = max(1, min(groups, channels))
    while channels % groups:
        groups -= 1
    return groups


class CheapConv(nn.Module):
    """A cheap spatial op keeping ``in_channels`` followed by a 1x1 convolution to ``out_channels``.

    Stands in for a 3x3 ``nn.Conv2d`` with the same output shape (see the module docstring for
    where the stride goes). The 1x1 carries the original convolution's bias, if any.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kind: ``"dw"``, ``"shift"`` or ``"group"``.
        groups: Groups of the ``"group"`` kind (reduced to a divisor of ``in_channels``).
        stride: Stride of the replaced convolution.
        padding: Padding of the replaced convolution.
        dilation: Dilation of the replaced convolution.
        bias: Whether the 1x1 has a bias.
        padding_mode: Padding mode of the dw/group convolution (the shift always fills zeros).
        stride_on: ``"spatial"`` or ``"pointwise"`` (a shift's stride is always on the 1x1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kind: str,
        groups: int = 2,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        stride_on: str = "spatial",
    ) -> None:
        super().__init__()
        if kind not in CHEAP_CONVS:
            raise ValueError(f"`kind` must be one of {', '.join(CHEAP_CONVS)}, but got {kind!r}.")
        if stride_on not in STRIDE_PLACES:
            raise ValueError(f"`stride_on` must be one of {', '.join(STRIDE_PLACES)}, but got {stride_on!r}.")
        self.kind = kind
        on_pointwise = kind == "shift" or stride_on == "pointwise"
        spatial_stride, pointwise_stride = (1, stride) if on_pointwise else (stride, 1)
        if kind == "shift":
            self.spatial: nn.Module = Shift(padding, dilation)
        else:
            g = in_channels if kind == "dw" else cheap_groups(in_channels, groups)
            self.spatial = nn.Conv2d(
                in_channels,
                in_channels,
                3,
                stride=spatial_stride,
                padding=padding,
                dilation=dilation,
                groups=g,
                bias=False,
                padding_mode=padding_mode,
            )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, stride=pointwise_stride, bias=bias)

    @classmethod
    def like(cls, conv: nn.Conv2d, kind: str, groups: int = 2, stride_on: str = "spatial") -> CheapConv:
        """A cheap replacement of ``conv`` (a 3x3, ``groups=1`` convolution) on its device and dtype."""
        if isinstance(conv.padding, str):
            # "same" for a 3x3 is the dilation on each side; "valid" is no padding.
            padding = conv.dilation if conv.padding == "same" else (0, 0)
        else:
            padding = conv.padding
        cheap = cls(
            conv.in_channels,
            conv.out_channels,
            kind,
            groups,
            conv.stride,
            padding,
            conv.dilation,
            conv.bias is not None,
            conv.padding_mode,
            stride_on,
        )
        return cheap.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.spatial(x))


def _is_replaceable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d  # not a subclass (a quantized conv keeps its own forward)
        and module.kernel_size == (3, 3)
        and module.groups == 1
    )


def replace_3x3_convs(model: nn.Module, kind: str, groups: int = 2, skip: Iterable[str] = (), stride_on: str = "spatial") -> list[str]:
    """Replace, in place, every 3x3 ``nn.Conv2d`` with ``groups=1`` by a :class:`CheapConv`.

    Args:
        model: Any model; its 3x3 convolutions are found by module type, wherever they sit.
        kind: ``"dw"``, ``"shift"`` or ``"group"``.
        groups: Groups of the ``"group"`` kind.
        skip: Names of convolutions to keep, e.g. the stem from
            :func:`methods._surgery.first_layers`.
        stride_on: Where each :class:`CheapConv` subsamples (see the module docstring).

    Returns:
        The names of the replaced convolutions, in module order.
    """
    skip = set(skip)
    names = [name for name, m in model.named_modules() if _is_replaceable(m) and name not in skip]
    for name in names:
        model.set_submodule(name, CheapConv.like(model.get_submodule(name), kind, groups, stride_on))
    return names
