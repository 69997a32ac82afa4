"""CIFAR ResNets of He et al. (2016), section 4.2: three stages of 16/32/64 channels.

Two shortcut kinds for the blocks that change shape:

* ``"A"`` (the paper's CIFAR choice, and the default): parameter-free; subsample by the
  stride and append zero channels. ResNet-56 then has 853,018 parameters and 125.49M MACs
  at 32x32.
* ``"B"``: a strided 1x1 convolution followed by batch norm.

Option A is written so that torch-pruning can prune through it: the zero channels are
``x * 0`` rather than a fresh ``zeros`` tensor, so the dependency graph sees them as
derived from ``x`` and removes zero channel ``C + i`` together with input channel ``i``.
With ``F.pad`` or ``new_zeros`` torch-pruning loses track of the padded channels and the
pruned block no longer adds up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from errors import unknown_name
from models._registry import register_model

__all__ = ["BasicBlock", "ZeroPadShortcut", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

SHORTCUTS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and double the channels with zeros."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # x * 0 instead of zeros: see the module docstring (keeps torch-pruning's graph connected).
        return torch.cat([x, x * 0], dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut: ``relu(residual(x) + shortcut(x))``.

    The residual branch is ``conv1 -> bn1 -> relu -> conv2 -> bn2``; methods that scale or
    gate a whole block act on the output of ``bn2`` (or of :meth:`residual`).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _make_shortcut(in_channels, out_channels, stride, shortcut)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch alone, before the addition."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


def _make_shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module:
    if kind not in SHORTCUTS:
        raise unknown_name("shortcut", kind, SHORTCUTS)
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        if out_channels != 2 * in_channels:
            raise ValueError(f"option-A shortcut needs out_channels = 2 * in_channels, got {in_channels} -> {out_channels}.")
        return ZeroPadShortcut(stride)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class CifarResNet(nn.Module):
    """3x3 stem, stages of :class:`BasicBlock`, global average pooling, linear classifier.

    Args:
        blocks_per_stage: Number of blocks in each stage.
        widths: Channels of each stage; the stem has ``widths[0]``.
        strides: Stride of each stage's first block.
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        shortcut: ``"A"`` (zero padding) or ``"B"`` (1x1 convolution).
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for num_blocks, width, stride in zip(blocks_per_stage, widths, strides, strict=True):
            blocks = []
            for i in range(num_blocks):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _cifar_resnet(depth: int, num_classes: int, in_channels: int, shortcut: str) -> CifarResNet:
    # depth = 6n + 2: n blocks of two convs per stage, plus stem and classifier.
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), (16, 32, 64), (1, 2, 2), num_classes, in_channels, shortcut)


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters with option A)."""
    return _cifar_resnet(20, num_classes, in_channels, shortcut)


@register_model("resnet32")
def resnet32(num_classes: int, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-32 (0.46M parameters with option A)."""
    return _cifar_resnet(32, num_classes, in_channels, shortcut)


@register_model("resnet44")
def resnet44(num_classes: int, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-44 (0.66M parameters with option A)."""
    return _cifar_resnet(44, num_classes, in_channels, shortcut)


@register_model("resnet56")
def resnet56(num_classes: int, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-56 (0.85M parameters with option A)."""
    return _cifar_resnet(56, num_classes, in_channels, shortcut)


@register_model("resnet110")
def resnet110(num_classes: int, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-110 (1.7M parameters with option A)."""
    return _cifar_resnet(110, num_classes, in_channels, shortcut)
