"""RDN (Zhang et al., "Residual Dense Network for Image Super-Resolution", 2018).

Shallow features (two 3x3 convs) -> ``D`` residual dense blocks (:class:`RDB`: ``C`` densely
connected conv-ReLU layers of growth ``G``, a 1x1 local feature fusion and a local skip) ->
global feature fusion (1x1 then 3x3 conv over all block outputs) plus the first shallow
features -> ``body_out`` (an identity, where a method can read the features) -> sub-pixel
upsampler -> 3x3 conv. As in the common reference implementation there is no mean shift.

Config B of the paper is ``D=16, C=8, G=64`` with ``G0=64`` channels between blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from models._registry import register_model
from models.edsr import check_scale, conv3x3

__all__ = ["RDBConv", "RDB", "RDN", "rdn", "rdn_small"]


class RDBConv(nn.Module):
    """One dense layer: ``cat(x, relu(conv3x3(x)))``."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, growth)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.act(self.conv(x))], dim=1)


class RDB(nn.Module):
    """Residual dense block: ``x + lff(dense layers(x))``."""

    def __init__(self, channels: int, growth: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[RDBConv(channels + i * growth, growth) for i in range(layers)])
        self.lff = nn.Conv2d(channels + layers * growth, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lff(self.convs(x)) + x


class RDN(nn.Module):
    """RDN for one upscaling factor.

    Args:
        scale: Upscaling factor, 2, 3 or 4.
        in_channels: Channels of the input and output images.
        blocks: ``D``, residual dense blocks.
        layers: ``C``, conv layers per block.
        growth: ``G``, channels each dense layer adds.
        channels: ``G0``, channels between blocks.
    """

    def __init__(self, scale: int, in_channels: int = 3, blocks: int = 16, layers: int = 8, growth: int = 64, channels: int = 64) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        self.sfe1 = conv3x3(in_channels, channels)
        self.sfe2 = conv3x3(channels, channels)
        self.rdbs = nn.ModuleList([RDB(channels, growth, layers) for _ in range(blocks)])
        self.gff = nn.Sequential(nn.Conv2d(blocks * channels, channels, 1), conv3x3(channels, channels))
        self.body_out = nn.Identity()
        if scale == 4:
            up: list[nn.Module] = [
                conv3x3(channels, growth * 4),
                nn.PixelShuffle(2),
                conv3x3(growth, growth * 4),
                nn.PixelShuffle(2),
            ]
        else:
            up = [conv3x3(channels, growth * scale * scale), nn.PixelShuffle(scale)]
        self.upsample = nn.Sequential(*up, conv3x3(growth, in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.sfe1(x)
        x = self.sfe2(shallow)
        outputs = []
        for block in self.rdbs:
            x = block(x)
            outputs.append(x)
        features = self.body_out(self.gff(torch.cat(outputs, dim=1)) + shallow)
        return self.upsample(features)


@register_model("rdn")
def rdn(
    scale: int = 2,
    in_channels: int = 3,
    blocks: int = 16,
    layers: int = 8,
    growth: int = 64,
    channels: int = 64,
    rgb_range: float = 255.0,
) -> RDN:
    """RDN config B: D=16, C=8, G=64 (22.1M parameters at x2). ``rgb_range`` is accepted and unused (no mean shift)."""
    return RDN(scale, in_channels, blocks, layers, growth, channels)


@register_model("rdn_small")
def rdn_small(
    scale: int = 2,
    in_channels: int = 3,
    blocks: int = 4,
    layers: int = 4,
    growth: int = 16,
    channels: int = 32,
    rgb_range: float = 255.0,
) -> RDN:
    """A CPU-sized RDN: D=4, C=4, G=16, G0=32. ``rgb_range`` is accepted and unused (no mean shift)."""
    return RDN(scale, in_channels, blocks, layers, growth, channels)
